"""Models trained here and shipped with the package, and the data they were trained on.

`digits-scmoe`: the ScMoE variant (models/scmoe.py) at the same size: top-1 routed experts
reading the previous block's post-attention residual (Pos-2), the shared expert gated by
CG-1; trained the same way for the same number of steps.

`digits`: a class-conditional DiT-MoE (6 blocks, every block MoE with 8 SwiGLU experts,
top-2, and a shared expert twice as wide as H = 64; 1.6 M parameters, 3.3 MB in float16)
trained with rectified flow on scikit-learn's 8x8 digits, upscaled to 16x16.
`python examples/train_digits.py` reproduces the checkpoint and the classifier behind
`moedit.metrics`; `checkpoints/digits.json` records how it went.
"""

from __future__ import annotations

import json
import logging
import os
import re

import torch
import torch.nn.functional as F

from .checkpoint import load_checkpoint
from .dit_moe import CONFIG_NAMES, DiTMoE, DiTMoEConfig, config_names, dit_moe
from .scmoe import ScMoEConfig, ScMoEDiT

log = logging.getLogger(__name__)

CHECKPOINTS = os.path.join(os.path.dirname(__file__), "checkpoints")

# Every DiTMoEConfig field is spelled out, so a change of the library's defaults cannot
# silently change the architecture a shipped checkpoint was trained with.
PRETRAINED = {
    "digits": dict(input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=6, num_heads=4, mlp_ratio=2,
                   class_dropout_prob=0.1, num_classes=10, learn_sigma=False, num_experts=8, num_experts_per_tok=2,
                   qk_norm=False, num_shared_expert_ratio=2),
    # ScMoE (models/scmoe.py) at the same size: top-1 routed experts read block l-1's
    # post-attention residual (Pos-2), the shared expert has the CG-1 gate.
    "digits-scmoe": dict(input_size=16, patch_size=2, in_channels=1, hidden_size=64, depth=6, num_heads=4,
                         mlp_ratio=2, class_dropout_prob=0.1, num_classes=10, learn_sigma=False, num_experts=8,
                         num_experts_per_tok=1, qk_norm=False, num_shared_expert_ratio=2, shortcut_position=2,
                         shared_gate=True),
}
# Default sampling settings, checked in checkpoints/digits.json (100 images, 3 seeds). cfg 1.5
# keeps FD-digits at its cfg-1.0 level while lifting accuracy from ~90 % to ~99 %; cfg >= 2
# trades diversity for nothing (FD doubles). 25 Euler steps: 10 and 50 score the same.
SAMPLING = {"digits": dict(steps=25, cfg_scale=1.5), "digits-scmoe": dict(steps=25, cfg_scale=1.5)}
# Reference configs sample as the public DiT-MoE checkpoints of their size were trained: S and
# B with DiT's Gaussian diffusion (DDPM over 250 respaced steps, as DiT-MoE's sample.py), XL and
# G with rectified flow (50 Euler steps). cfg 1.5 is DiT's FID setting. Other names: rflow, 25 steps.
REFERENCE_SAMPLING = {"S": dict(sampler="ddpm", steps=250, cfg_scale=1.5),
                      "B": dict(sampler="ddpm", steps=250, cfg_scale=1.5),
                      "XL": dict(sampler="rflow", steps=50, cfg_scale=1.5),
                      "G": dict(sampler="rflow", steps=50, cfg_scale=1.5)}
_SIZE = re.compile(r"^(?:dit-moe-)?(S|B|L|XL|G)(?:/|$)", re.IGNORECASE)


def sampling_defaults(name: str) -> dict:
    """Sampler, steps and cfg scale for model `name`: a shipped model's (SAMPLING, rectified
    flow), a reference config's by its size (REFERENCE_SAMPLING), else rflow with 25 steps."""
    if name in SAMPLING:
        return dict(sampler="rflow", **SAMPLING[name])
    size, fallback = _SIZE.match(name), dict(sampler="rflow", steps=25, cfg_scale=1.5)
    return dict(REFERENCE_SAMPLING.get(size.group(1).upper(), fallback) if size else fallback)


# Every name `load_model` accepts, in one line (for --model's help and the unknown-name error).
NAMES_HELP = f"{', '.join(PRETRAINED)} (trained, shipped) or a reference config with random weights: {CONFIG_NAMES}"


def model_names() -> list[str]:
    """Every name `load_model` accepts: the shipped models, then the reference configs."""
    return [*PRETRAINED, *config_names()]


def checkpoint_path(name: str) -> str:
    return os.path.join(CHECKPOINTS, f"{name}.pt")


def pretrained_config(name: str = "digits") -> DiTMoEConfig:
    """The architecture of shipped model `name` (what train_digits.py builds and trains)."""
    if name not in PRETRAINED:
        raise ValueError(f"no pretrained model {name!r}; available: {sorted(PRETRAINED)}")
    fields = PRETRAINED[name]
    return (ScMoEConfig if "shortcut_position" in fields else DiTMoEConfig)(**fields)


def build(cfg: DiTMoEConfig) -> DiTMoE:
    """The model family `cfg` describes, with fresh weights, in train mode."""
    return ScMoEDiT(cfg) if isinstance(cfg, ScMoEConfig) else DiTMoE(cfg)


def pretrained(name: str = "digits", device=None, *, load: bool = True) -> DiTMoE:
    """The shipped model `name` in eval mode, float32 (the checkpoint is float16).
    `load=False` skips reading the weights (use it under `torch.device("meta")` when only
    the shapes matter)."""
    model = build(pretrained_config(name)).eval()
    if load:
        path = checkpoint_path(name)
        if not os.path.isfile(path):
            how = "" if name == "digits" else f" --model {name}"
            raise FileNotFoundError(f"the {name} checkpoint is missing ({path}); "
                                    f"create it with `python examples/train_digits.py{how}`")
        load_checkpoint(model, path)
    return model.to(device) if device is not None else model


def load_model(name: str, checkpoint: str | None = None, device: str | torch.device = "cpu", **overrides):
    """A shipped pretrained model by name ("digits"), or a reference config ("S/2-8E2A",
    "tiny", ...) with DiT constructor-argument `overrides`, with random weights unless
    `checkpoint` names a state-dict file. On the meta device nothing is allocated or
    loaded (enough for compiling and explain())."""
    meta = torch.device(device).type == "meta"
    if name not in PRETRAINED and name not in config_names() and name.lower() not in config_names():
        raise ValueError(f"unknown model {name!r}; use one of: {NAMES_HELP} (`moedit models` lists each with its "
                         "size)")
    if name in PRETRAINED and overrides:
        raise ValueError(f"{name} is a trained model; its config cannot be overridden ({sorted(overrides)})")
    if name in PRETRAINED:
        if meta:
            with torch.device("meta"):
                return pretrained(name, load=False)
        model = pretrained(name, device=device)
    else:
        with torch.device(device):
            model = dit_moe(name, **overrides)
    if checkpoint is not None and not meta:
        load_checkpoint(model, checkpoint)
    elif name not in PRETRAINED and not meta:
        log.warning("model %s has random weights; pass --checkpoint to load trained ones", name)
    return model


def training_record(name: str = "digits") -> dict:
    """What train_digits.py recorded next to the checkpoint (time, steps, loss, accuracy)."""
    with open(os.path.join(CHECKPOINTS, f"{name}.json")) as f:
        return json.load(f)


def digits_dataset(split: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits, bilinearly upscaled, as ([N,1,16,16] in [-1, 1], labels [N]).

    The one place the digits are preprocessed: training, the classifier and the metrics all
    read them here. Splits are fixed: "test" is a stratified 20 % (360 images, seed 0),
    "train" the other 1437, "all" both.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("all", "train", "test"):
        raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False) * 2 - 1
    labels = torch.tensor(data.target, dtype=torch.long)
    if split == "all":
        return images, labels
    train, test = train_test_split(range(len(labels)), test_size=0.2, random_state=0, stratify=data.target)
    chosen = torch.tensor(train if split == "train" else test)
    return images[chosen], labels[chosen]
