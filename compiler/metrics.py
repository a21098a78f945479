"""Quality metrics for generated digits, from a small classifier trained on the real ones.

    accuracy      share of images the classifier assigns to the requested class
    fd_digits     Fréchet distance between classifier features of generated and real test
                  images (FID's formula on a digits classifier's penultimate layer)
    relative_l2   ||a - b|| / ||b||, e.g. a plan's images against the synchronous plan's
    psnr          peak signal-to-noise ratio in dB for images in [-1, 1] (inf if identical)

Images are clamped to [-1, 1] before they reach the classifier.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from scipy import linalg
from torch import nn

from moedit.models.pretrained import CHECKPOINTS, digits_dataset


class DigitsClassifier(nn.Module):
    """A small CNN for [B,1,16,16] digits in [-1, 1]; `features` is its 128-wide penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, 128), nn.ReLU())
        self.head = nn.Linear(128, 10)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(images.clamp(-1, 1)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def classifier_path() -> str:
    return os.path.join(CHECKPOINTS, "digits_classifier.pt")


def classifier() -> DigitsClassifier:
    """The shipped classifier, eval mode."""
    path = classifier_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"the digits classifier is missing ({path}); "
                                "create it with `python examples/train_digits.py`")
    model = DigitsClassifier()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@torch.no_grad()
def accuracy(images: torch.Tensor, labels, clf: DigitsClassifier | None = None) -> float:
    clf = clf or classifier()
    predicted = clf(images.float()).argmax(dim=1)
    return (predicted == torch.as_tensor(labels)).float().mean().item()


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of Gaussians fitted to two feature sets."""
    a, b = feats_a.double().numpy(), feats_b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root, _ = linalg.sqrtm(cov_a @ cov_b, disp=False)
    if not np.isfinite(root).all():  # singular product: regularise, as FID implementations do
        eps = 1e-6 * np.eye(len(cov_a))
        root = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    root = root.real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))


@torch.no_grad()
def fd_digits(images: torch.Tensor, clf: DigitsClassifier | None = None, reference: torch.Tensor | None = None) -> float:
    """Fréchet distance of `images` to the real test digits (or to `reference` images)."""
    clf = clf or classifier()
    if reference is None:
        reference, _ = digits_dataset("test")
    return frechet_distance(clf.features(images.float()), clf.features(reference.float()))


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> float:
    mse = ((a.double().clamp(-1, 1) - b.double().clamp(-1, 1)) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(data_range ** 2 / mse)


def summarize(values) -> dict:
    """Mean, sample standard deviation and count, for a metric measured over seeds."""
    values = [float(v) for v in values]
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "n": len(values)}
