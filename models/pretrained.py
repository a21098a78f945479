"""Models trained here and shipped with the package, and the data they were trained on.

`digits`: a class-conditional DiT-MoE (6 blocks, every block MoE with 8 experts, top-2,
and a shared expert) trained with rectified flow on scikit-learn's 8x8 digits, upscaled
to 16x16. `examples/train_digits.py` reproduces the checkpoint.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint
from .dit_moe import DiTMoE, DiTMoEConfig

CHECKPOINTS = os.path.join(os.path.dirname(__file__), "checkpoints")

PRETRAINED = {
    "digits": dict(input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=6, num_heads=4, mlp_ratio=2,
                   num_classes=10, learn_sigma=False, num_experts=8, num_experts_per_tok=2),
}
# Sampling settings the shipped model was checked with (see checkpoints/digits.json).
SAMPLING = {"digits": dict(steps=25, cfg_scale=2.0)}


def checkpoint_path(name: str) -> str:
    return os.path.join(CHECKPOINTS, f"{name}.pt")


def pretrained(name: str = "digits", *, load: bool = True, device=None) -> DiTMoE:
    """The shipped model `name` in eval mode, float32. `load=False` skips reading the weights
    (use it under `torch.device("meta")` when only the shapes matter)."""
    if name not in PRETRAINED:
        raise ValueError(f"no pretrained model {name!r}; available: {sorted(PRETRAINED)}")
    model = DiTMoE(DiTMoEConfig(**PRETRAINED[name])).eval()
    if load:
        path = checkpoint_path(name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"the {name} checkpoint is missing ({path}); "
                                    f"create it with `python examples/train_digits.py`")
        load_checkpoint(model, path)
    return model.to(device) if device is not None else model


def training_record(name: str = "digits") -> dict:
    """What train_digits.py recorded next to the checkpoint (time, steps, loss, accuracy)."""
    with open(os.path.join(CHECKPOINTS, f"{name}.json")) as f:
        return json.load(f)


def digits_dataset(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as ([N,1,16,16] in [-1, 1], labels [N]).

    Splits are fixed: a seeded permutation, the first 80 % "train", the rest "test".
    """
    from sklearn.datasets import load_digits

    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False) * 2 - 1
    labels = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(labels))
    chosen = {"all": order, "train": order[:cut], "test": order[cut:]}[split]
    return images[chosen], labels[chosen]
