"""Tiny models with weights that make routing matter, shared by the tests."""

from __future__ import annotations

import torch

from moedit.models import dit_moe

STARVED = (6, 7)  # experts that receive no token in `tiny_model`


@torch.no_grad()
def tiny_model(seed: int = 0, **overrides):
    """The tiny DiT-MoE with random weights everywhere (adaLN-Zero's zeros would make every
    block the identity), and experts 6 and 7 starved: a large shift on hidden unit 0 before
    each MoE layer, read only by those experts' gate rows with a negative sign."""
    model = dit_moe("tiny", **overrides)
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        scale = param.shape[-1] ** -0.5 if param.dim() > 1 else 0.1
        param.copy_(torch.randn(param.shape, generator=gen) * scale)
    hidden = model.config.hidden_size
    for block in model.blocks:
        block.adaLN_modulation[-1].bias[3 * hidden] = 10.0  # shift_mlp of hidden unit 0
        gate = block.moe.gate.weight
        gate[:, 0] = 0.0
        gate[list(STARVED), 0] = -1.0
    return model


def routing_counts(model, x, t, y) -> torch.Tensor:
    """Tokens per expert, summed over the MoE layers, in one reference forward pass."""
    counts = torch.zeros(model.config.num_experts, dtype=torch.long)

    def hook(_module, _inputs, output):
        counts.add_(torch.bincount(output[0].reshape(-1), minlength=counts.numel()))

    handles = [block.moe.gate.register_forward_hook(hook) for block in model.blocks]
    with torch.no_grad():
        model(x, t, y)
    for handle in handles:
        handle.remove()
    return counts


@torch.no_grad()
def tiny_scmoe(seed: int = 0, **overrides):
    """The tiny ScMoE (models/scmoe.py) with random weights everywhere, Pos-2 unless overridden."""
    from moedit.models.scmoe import scmoe

    model = scmoe("tiny", **overrides)
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        scale = param.shape[-1] ** -0.5 if param.dim() > 1 else 0.1
        param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return model
