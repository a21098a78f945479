"""Samplers: `SAMPLERS[name](denoise, z, y, steps=..., cfg_scale=..., null_class=..., noise=...,
on_step=...)` turns the noise `z` into latents, calling `denoise(z, t, y)` once per step.

Rectified flow ("rflow", DiT-MoE XL and G): z_t = (1 - t) x + t noise, the model predicts
v = noise - x, and Euler steps go from t = 1 to t = 0 (`z -= dt * v`), as in DiT-MoE's rflow code.

Gaussian diffusion ("ddpm", "ddim"; DiT and DiT-MoE S and B): DiT's linear beta schedule over
1000 training steps, respaced to fewer steps as DiT's `space_timesteps` does; the model predicts
the noise (eps) and, with `learn_sigma`, a variance; t is the training timestep (0..999).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int], torch.Tensor]  # step (0-based) -> the noise that step adds


def guided_output(denoise: DenoiseFn, z, t, y, cfg_scale: float, null_class: int, in_channels: int):
    """One model evaluation with classifier-free guidance, cond and uncond batched together:
    (the first `in_channels` output channels, guided; the conditional half's other channels).

    See [Note: guidance and the learned variance].
    """
    if cfg_scale == 1.0:
        out = denoise(z, t, y)
        return out[:, :in_channels], out[:, in_channels:]
    out = denoise(torch.cat([z, z]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null_class)]))
    cond, uncond = out.chunk(2)
    guided = uncond[:, :in_channels] + cfg_scale * (cond[:, :in_channels] - uncond[:, :in_channels])
    return guided, cond[:, in_channels:]


def guided_velocity(denoise: DenoiseFn, z, t, y, cfg_scale: float, null_class: int, in_channels: int):
    """The guided velocity (every channel, as DiT-MoE's rectified-flow sampler guides it); the
    `learn_sigma` half of the output, if any, is dropped."""
    return guided_output(denoise, z, t, y, cfg_scale, null_class, in_channels)[0]


def initial_noise(batch: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """The starting latents for a global batch: drawn on the CPU from `seed`, so the same seed
    gives the same images whatever the device or the number of ranks."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, size, size, generator=generator)


def step_noise(batch: int, channels: int, size: int, seed: int) -> NoiseFn:
    """`noise(step)`: the noise a stochastic sampler adds at `step`, for the whole global batch.

    Drawn on the CPU from a generator seeded by (`seed`, `step`) through numpy's SeedSequence,
    so it does not depend on the device, the number of ranks or the order of the calls, and
    is independent of `initial_noise(..., seed)`. Each rank keeps its shard of the batch.
    """
    def noise(step: int) -> torch.Tensor:
        key = int(np.random.SeedSequence(seed % 2**64, spawn_key=(step,)).generate_state(1, np.uint64)[0])
        return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(key))

    return noise


@torch.no_grad()
def rectified_flow_sample(denoise: DenoiseFn, z: torch.Tensor, y: torch.Tensor, *, steps: int,
                          cfg_scale: float, null_class: int, noise: NoiseFn | None = None,
                          on_step: Callable[[int, torch.Tensor], None] | None = None):
    """Euler integration of the rectified-flow ODE from noise `z` (t = 1) to data (t = 0).

    `on_step(i, z)` is called after step i (0-based) with the updated latents. Deterministic:
    `noise` is not used.
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


# [Note: guidance and the learned variance]
# DiT's forward_with_cfg guides only the first 3 of the 4 eps channels (kept "for exact
# reproducibility" of its first results; its own comment calls guiding all channels the
# standard approach) and passes the other channels of each half through. moedit guides every
# eps channel (the first in_channels), as the rectified-flow sampler guides every velocity
# channel, so the latents of the two samplers are guided alike. The learned variance is not
# guided: it is the conditional half's, which is what DiT's sampler keeps for the images it
# returns (the conditional half of its doubled batch).

NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 1e-4, 0.02  # DiT's "linear" schedule at 1000 steps


def respaced_timesteps(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The training timesteps DiT samples at for `steps` steps, ascending: evenly spaced from 0
    to T - 1 and rounded (DiT's `space_timesteps` with one section: a float stride added up,
    then Python's round)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"Gaussian diffusion takes 1..{num_train_timesteps} steps (its training timesteps), "
                         f"got {steps}")
    stride = 1.0 if steps == 1 else (num_train_timesteps - 1) / (steps - 1)
    kept, position = [], 0.0
    for _ in range(steps):
        kept.append(round(position))
        position += stride
    return kept


@dataclasses.dataclass(frozen=True)
class GaussianSchedule:
    """DiT's diffusion respaced to the training `timesteps` it keeps (ascending), in float64.
    Schedule index i goes from `timesteps[i]` to `timesteps[i - 1]` (index 0: to the data)."""

    timesteps: np.ndarray  # int64: what the model is told
    alphas_cumprod: np.ndarray  # at the kept timesteps
    alphas_cumprod_prev: np.ndarray  # at the kept timestep before; 1 before the first

    @property
    def betas(self) -> np.ndarray:
        """The respaced betas: 1 - alphas_cumprod[t_i] / alphas_cumprod[t_(i-1)]."""
        return 1.0 - self.alphas_cumprod / self.alphas_cumprod_prev

    @property
    def posterior_variance(self) -> np.ndarray:
        """The variance of q(x_(i-1) | x_i, x_0) (DiT's "fixed small")."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)


def gaussian_schedule(steps: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS, beta_start: float = BETA_START,
                      beta_end: float = BETA_END) -> GaussianSchedule:
    """A linear beta schedule over `num_train_timesteps`, respaced to `steps` (see `respaced_timesteps`)."""
    kept = np.array(respaced_timesteps(steps, num_train_timesteps), dtype=np.int64)
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)
    alphas_cumprod = np.cumprod(1.0 - betas)[kept]
    return GaussianSchedule(kept, alphas_cumprod, np.append(1.0, alphas_cumprod[:-1]))


def _predict(denoise: DenoiseFn, z, y, schedule: GaussianSchedule, i: int, cfg_scale: float, null_class: int):
    """(predicted x_0, guided eps, the conditional variance channels) at schedule index i."""
    # Integer timesteps in float32 (exact up to 2^24; bfloat16 would turn 999 into 1000).
    t = torch.full((z.shape[0],), float(schedule.timesteps[i]), device=z.device, dtype=torch.float32)
    eps, rest = guided_output(denoise, z, t, y, cfg_scale, null_class, z.shape[1])
    a = float(schedule.alphas_cumprod[i])
    return math.sqrt(1.0 / a) * z - math.sqrt(1.0 / a - 1.0) * eps, eps, rest


def _ddpm_std(rest: torch.Tensor, beta: float, posterior: float, fixed_variance: str, channels: int):
    """The standard deviation of a DDPM step's noise: learned when the model outputs it, else fixed."""
    if rest.shape[1] == channels:  # learn_sigma: v in [-1, 1] interpolates the log variance
        frac = (rest + 1) / 2
        return torch.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(posterior)))
    if rest.shape[1] == 0:
        return math.sqrt(beta if fixed_variance == "large" else posterior)
    raise ValueError(f"the model outputs {channels + rest.shape[1]} channels for {channels}-channel latents; "
                     f"DDPM needs {channels} (fixed variance) or {2 * channels} (learn_sigma)")


@torch.no_grad()
def ddpm_sample(denoise: DenoiseFn, z: torch.Tensor, y: torch.Tensor, *, steps: int, cfg_scale: float,
                null_class: int, noise: NoiseFn | None = None,
                on_step: Callable[[int, torch.Tensor], None] | None = None, fixed_variance: str = "large"):
    """DDPM ancestral sampling from noise `z` over `steps` respaced steps (DiT's p_sample_loop,
    unclipped), with guidance as in [Note: guidance and the learned variance].

    A model that outputs 2 x C channels (`learn_sigma`) gives the variance: log variance =
    frac log(beta) + (1 - frac) log(posterior variance), frac = (v + 1) / 2. One that outputs
    C gets a fixed one: beta ("large", DiT's choice) or the posterior variance ("small").
    `noise(step)` is the noise added after `step` (0-based; the last step adds none), with
    z's rows: `step_noise` for the global batch, sharded like z. `on_step(step, z)` as in
    `rectified_flow_sample`.
    """
    if noise is None:
        raise ValueError("ddpm_sample adds noise at every step but the last: pass noise=step_noise(batch, channels, "
                         "size, seed) (each rank its shard, like z)")
    if fixed_variance not in ("large", "small"):
        raise ValueError(f"fixed_variance must be 'large' or 'small', got {fixed_variance!r}")
    schedule = gaussian_schedule(steps)
    betas, posterior = schedule.betas, schedule.posterior_variance
    for step, i in enumerate(reversed(range(steps))):
        x0, _, rest = _predict(denoise, z, y, schedule, i, cfg_scale, null_class)
        a, a_prev, beta = (float(v[i]) for v in (schedule.alphas_cumprod, schedule.alphas_cumprod_prev, betas))
        z = beta * math.sqrt(a_prev) / (1 - a) * x0 + (1 - a_prev) * math.sqrt(1 - beta) / (1 - a) * z
        if i > 0:
            z = z + _ddpm_std(rest, beta, float(posterior[i]), fixed_variance, z.shape[1]) * noise(step).to(z)
        if on_step is not None:
            on_step(step, z)
    return z


@torch.no_grad()
def ddim_sample(denoise: DenoiseFn, z: torch.Tensor, y: torch.Tensor, *, steps: int, cfg_scale: float,
                null_class: int, noise: NoiseFn | None = None,
                on_step: Callable[[int, torch.Tensor], None] | None = None):
    """DDIM with eta = 0 from noise `z` over `steps` respaced steps (DiT's ddim_sample_loop,
    unclipped). Deterministic: `noise` and a learned variance are not used. DiT recomputes
    eps from the predicted x_0, which without clipping is the model's eps; this uses it as is.
    """
    schedule = gaussian_schedule(steps)
    for step, i in enumerate(reversed(range(steps))):
        x0, eps, _ = _predict(denoise, z, y, schedule, i, cfg_scale, null_class)
        a_prev = float(schedule.alphas_cumprod_prev[i])
        z = math.sqrt(a_prev) * x0 + math.sqrt(1.0 - a_prev) * eps
        if on_step is not None:
            on_step(step, z)
    return z


# name -> sampler; every one takes (denoise, z, y, *, steps, cfg_scale, null_class, noise, on_step).
SAMPLERS = {"rflow": rectified_flow_sample, "ddpm": ddpm_sample, "ddim": ddim_sample}
