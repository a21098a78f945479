"""Quality metrics for generated digits, from a small classifier trained on the real ones.

    accuracy      share of images the classifier assigns to the requested class
    fd_digits     Fréchet distance between classifier features of generated and real test
                  images (FID's formula on a digits classifier's penultimate layer)
    relative_l2   ||a - b|| / ||b||, e.g. a plan's images against the synchronous plan's
    psnr          peak signal-to-noise ratio in dB (inf if identical)
    summarize     mean, sample std and count of a metric measured over seeds

Images are clamped to [-1, 1] before they reach the classifier (the sampler may overshoot);
`relative_l2` and `psnr` compare the tensors as given.

Shape legend: B batch, D feature dims (128).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import nn

from .pretrained import checkpoint_path, digits_dataset

FEATURE_DIMS = 128


class DigitsClassifier(nn.Module):
    """A small CNN for [B,1,16,16] digits in [-1, 1] -> logits [B,10]; `features` is its
    [B,D] penultimate layer, the embedding `fd_digits` compares."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIMS), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIMS, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(images.clamp(-1, 1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def classifier_path() -> str:
    return checkpoint_path("digits_classifier")


def classifier(device=None) -> DigitsClassifier:
    """The shipped classifier (trained by examples/train_digits.py), eval mode."""
    path = classifier_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the digits classifier is missing ({path}); "
                                "create it with `python examples/train_digits.py`")
    model = DigitsClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval().to(device) if device is not None else model.eval()


def real_digits(split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Real digits preprocessed as for training: ([N,1,16,16] in [-1, 1], labels [N]).
    `split` is "train", "test" (the classifier's held-out 20 %) or "all"."""
    return digits_dataset(split)


def _on_device_of(clf: nn.Module, images: torch.Tensor) -> torch.Tensor:
    return images.detach().to(next(clf.parameters()).device, torch.float32)


@torch.no_grad()
def accuracy(images: torch.Tensor, labels, clf: DigitsClassifier | None = None) -> float:
    """Share of `images` [B,1,16,16] that `clf` (default: the shipped one) labels as `labels` [B]."""
    clf = clf or classifier()
    predicted = clf(_on_device_of(clf, images)).argmax(dim=1).cpu()
    return (predicted == torch.as_tensor(labels).cpu()).float().mean().item()


# [Note: Fréchet distance without a matrix square root of a non-symmetric product]
# FID writes the cross term as Tr((S_a S_b)^(1/2)) and takes scipy's sqrtm of S_a S_b.
# Classifier features after a ReLU have dead units, so S_a and S_b are singular and sqrtm
# warns, returns complex noise or NaNs. The same trace is the nuclear norm (sum of singular
# values) of S_a^(1/2) S_b^(1/2): its Gram matrix S_a^(1/2) S_b S_a^(1/2) is similar to
# S_a S_b. Square roots of the symmetric PSD covariances come from `eigh` (negative round-off
# eigenvalues clipped to 0) and an SVD is accurate to machine precision, so identical feature
# sets give FD ~ 1e-12 relative to Tr(S) and nothing imaginary appears.


def _psd_sqrt(cov: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between Gaussians fitted to feature
    sets [B_a,D] and [B_b,D], in float64; see [Note: Fréchet distance without a matrix square root]."""
    a, b = feats_a.detach().cpu().double().numpy(), feats_b.detach().cpu().double().numpy()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two [B,D] feature sets with the same D and B >= 2, got {a.shape} and {b.shape}")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    cross = np.linalg.svd(_psd_sqrt(cov_a) @ _psd_sqrt(cov_b), compute_uv=False).sum()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(max(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * cross, 0.0))


@torch.no_grad()
def fd_digits(images: torch.Tensor, clf: DigitsClassifier | None = None, reference: torch.Tensor | None = None) -> float:
    """Fréchet distance between classifier features of `images` [B,1,16,16] and of the real
    test digits (or of `reference` images). Depends on B: compare equal-sized batches."""
    clf = clf or classifier()
    if reference is None:
        reference, _ = real_digits("test")
    return frechet_distance(clf.features(_on_device_of(clf, images)), clf.features(_on_device_of(clf, reference)))


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (b is the reference)."""
    return ((a.detach().cpu().double() - b.detach().cpu().double()).norm() / b.detach().cpu().double().norm()).item()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    """10 log10(data_range^2 / MSE) in dB; data_range 2 suits images in [-1, 1]; inf if a == b."""
    mse = ((a.detach().cpu().double() - b.detach().cpu().double()) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def summarize(values) -> dict:
    """{"mean", "std" (sample, n - 1; 0 for one value), "n"} of a metric measured over seeds."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize needs at least one value")
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}
