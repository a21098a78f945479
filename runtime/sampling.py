"""Samplers. Rectified flow: z_t = (1 - t) x + t noise, the model predicts v = noise - x,
and Euler steps go from t = 1 to t = 0 (`z -= dt * v`), as in DiT-MoE's rflow code."""

from __future__ import annotations

from typing import Callable

import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def guided_velocity(denoise: DenoiseFn, z, t, y, cfg_scale: float, null_class: int, in_channels: int):
    """One model evaluation with classifier-free guidance, cond and uncond batched together.

    Guidance applies to every velocity channel (DiT-MoE's rectified-flow sampler); the
    `learn_sigma` half of the output, if any, is dropped.
    """
    if cfg_scale == 1.0:
        return denoise(z, t, y)[:, :in_channels]
    out = denoise(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = out[:, :in_channels].chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def initial_noise(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """The starting latents for a global batch: drawn on the CPU from `seed`, so the same seed
    gives the same images whatever the device or the number of ranks."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=generator)


@torch.no_grad()
def rectified_flow_sample(denoise: DenoiseFn, z: torch.Tensor, y: torch.Tensor, *, steps: int,
                          cfg_scale: float, null_class: int, on_step: Callable[[int, torch.Tensor], None] | None = None):
    """Euler integration of the rectified-flow ODE from noise `z` (t = 1) to data (t = 0).

    `on_step(i, z)` is called after step i (0-based) with the updated latents.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    dt = 1.0 / steps
    for i in range(steps, 0, -1):
        t = torch.full((z.shape[0],), i / steps, device=z.device, dtype=z.dtype)
        z = z - dt * guided_velocity(denoise, z, t, y, cfg_scale, null_class, z.shape[1])
        if on_step is not None:
            on_step(steps - i, z)
    return z
