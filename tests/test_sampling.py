"""The samplers: DDPM and DDIM against diffusers' schedulers and DiT's respacing formulas,
guidance, the world-size-independent noise, and `Runtime.sample` against the eager model."""

import numpy as np
import pytest
import torch

import moedit
from _models import tiny_model
from moedit.runtime.sampling import (SAMPLERS, ddim_sample, ddpm_sample, gaussian_schedule, guided_output,
                                     initial_noise, respaced_timesteps, step_noise)

diffusers = pytest.importorskip("diffusers")

B, C, S = 3, 2, 4  # toy latents
LABELS = torch.tensor([0, 1, 2])
LINEAR = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False)


def _toy(learn_sigma: bool):
    """A fixed denoiser of (z, t, y): eps, and with `learn_sigma` a variance value in [-1, 1]."""

    def denoise(z, t, y):
        s = (t.to(z.dtype) / 1000)[:, None, None, None]
        eps = torch.tanh(0.5 * z + s) + 0.1 * y.to(z.dtype)[:, None, None, None]
        return torch.cat([eps, torch.sin(z - 2 * s)], dim=1) if learn_sigma else eps

    return denoise


def _latents(dtype):
    return torch.randn(B, C, S, S, generator=torch.Generator().manual_seed(0), dtype=dtype)


def _in_float64(scheduler):
    """The scheduler with its (identical) schedule in float64 rather than float32, so that the
    comparison is of the formulas, not of float32 rounding in a 1000-term cumulative product."""
    scheduler.alphas_cumprod = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    scheduler.one = scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def test_respaced_timesteps_are_dits():
    # DiT's space_timesteps(1000, [n]): evenly spaced over 0..999, rounded.
    assert respaced_timesteps(250) == [round(i * 999 / 249) for i in range(250)]
    assert respaced_timesteps(250)[:6] == [0, 4, 8, 12, 16, 20] and respaced_timesteps(250)[-1] == 999
    assert respaced_timesteps(3) == [0, 500, 999]  # 499.5 rounds to even
    assert respaced_timesteps(1000) == list(range(1000))
    with pytest.raises(ValueError, match=r"1\.\.1000 steps .* got 1001"):
        respaced_timesteps(1001)


def test_respaced_schedule_follows_the_formulas():
    betas = np.linspace(1e-4, 0.02, 1000)
    alphas_cumprod = np.cumprod(1 - betas)
    kept = respaced_timesteps(250)
    schedule = gaussian_schedule(250)
    assert schedule.timesteps.tolist() == kept
    respaced = [1 - alphas_cumprod[t] / (alphas_cumprod[s] if i else 1.0)
                for i, (s, t) in enumerate(zip([None] + kept[:-1], kept))]
    np.testing.assert_allclose(schedule.betas, respaced, rtol=1e-12)
    np.testing.assert_allclose(np.cumprod(1 - schedule.betas), alphas_cumprod[kept], rtol=1e-12)
    posterior = [respaced[i] * (1 - alphas_cumprod[kept[i - 1]]) / (1 - alphas_cumprod[kept[i]]) for i in range(1, 250)]
    np.testing.assert_allclose(schedule.posterior_variance[1:], posterior, rtol=1e-12)
    np.testing.assert_allclose(gaussian_schedule(1000).betas, betas, rtol=1e-12)  # no respacing at 1000 steps


def _diffusers_ddpm(variance_type, steps, z, denoise, dtype):
    scheduler = diffusers.DDPMScheduler(variance_type=variance_type, **LINEAR)
    if dtype == torch.float64:
        _in_float64(scheduler)
    scheduler.set_timesteps(timesteps=respaced_timesteps(steps)[::-1])  # DiT's respacing, as custom timesteps
    generator = torch.Generator().manual_seed(1)
    for t in scheduler.timesteps:
        z = scheduler.step(denoise(z, torch.full((B,), float(t)), LABELS), t, z, generator=generator).prev_sample
    return z


def _sequential_noise(dtype):
    """The noise diffusers draws: one tensor per step from a generator, in step order."""
    generator, calls = torch.Generator().manual_seed(1), []

    def noise(step):
        assert step == len(calls), "noise must be drawn once per step, in order"
        calls.append(step)
        return torch.randn(B, C, S, S, generator=generator, dtype=dtype)

    return noise


@pytest.mark.parametrize("variance_type, learn_sigma, fixed_variance", [
    ("learned_range", True, None), ("fixed_large", False, "large"), ("fixed_small", False, "small")])
@pytest.mark.parametrize("steps, dtype, rtol", [(25, torch.float64, 1e-12), (1000, torch.float64, 1e-12),
                                                (25, torch.float32, 1e-5)])
def test_ddpm_matches_diffusers(variance_type, learn_sigma, fixed_variance, steps, dtype, rtol):
    denoise = _toy(learn_sigma)
    expected = _diffusers_ddpm(variance_type, steps, _latents(dtype), denoise, dtype)
    kwargs = {} if fixed_variance is None else {"fixed_variance": fixed_variance}
    out = ddpm_sample(denoise, _latents(dtype), LABELS, steps=steps, cfg_scale=1.0, null_class=3,
                      noise=_sequential_noise(dtype), **kwargs)
    assert (out - expected).abs().max() <= rtol * expected.abs().max()


# DDIMScheduler steps from t to t - 1000 // n; that is DiT's spacing for 1000 steps and for
# 10 (0, 111, ..., 999: a stride of 1000 // 9), so those are driven with DiT's timesteps.
@pytest.mark.parametrize("steps, num_inference_steps", [(10, 9), (1000, 1000)])
@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_ddim_matches_diffusers(steps, num_inference_steps, dtype, rtol):
    denoise = _toy(learn_sigma=True)  # DDIM ignores the variance channels
    scheduler = diffusers.DDIMScheduler(set_alpha_to_one=True, **LINEAR)
    if dtype == torch.float64:
        _in_float64(scheduler)
    scheduler.set_timesteps(num_inference_steps)
    expected = _latents(dtype)
    for t in respaced_timesteps(steps)[::-1]:
        eps = denoise(expected, torch.full((B,), float(t)), LABELS)[:, :C]
        expected = scheduler.step(eps, t, expected, eta=0.0).prev_sample
    out = ddim_sample(denoise, _latents(dtype), LABELS, steps=steps, cfg_scale=1.0, null_class=3)
    assert (out - expected).abs().max() <= rtol * expected.abs().max()


def test_guidance_applies_to_every_eps_channel_and_keeps_the_conditional_variance():
    denoise = _toy(learn_sigma=True)
    z, t = _latents(torch.float32), torch.full((B,), 500.0)
    eps, variance = guided_output(denoise, z, t, LABELS, 4.0, 3, C)
    cond, uncond = denoise(z, t, LABELS), denoise(z, t, torch.full_like(LABELS, 3))
    torch.testing.assert_close(eps, uncond[:, :C] + 4.0 * (cond[:, :C] - uncond[:, :C]))
    torch.testing.assert_close(variance, cond[:, C:])


def test_ddpm_refuses_a_model_with_odd_channels_and_missing_noise():
    def three_channels(z, t, y):
        return torch.cat([z, z[:, :1]], dim=1)

    with pytest.raises(ValueError, match=r"outputs 3 channels for 2-channel latents; DDPM needs 2 .* or 4"):
        ddpm_sample(three_channels, _latents(torch.float32), LABELS, steps=2, cfg_scale=1.0, null_class=3,
                    noise=step_noise(B, C, S, seed=0))
    with pytest.raises(ValueError, match="pass noise=step_noise"):
        ddpm_sample(_toy(True), _latents(torch.float32), LABELS, steps=2, cfg_scale=1.0, null_class=3)


def test_step_noise_depends_only_on_the_seed_and_the_step():
    noise = step_noise(4, C, S, seed=7)
    torch.testing.assert_close(noise(3), step_noise(4, C, S, seed=7)(3), rtol=0, atol=0)  # whatever came before
    assert not torch.equal(noise(3), noise(4))
    assert not torch.equal(noise(0), initial_noise(4, C, S, seed=7))
    assert not torch.equal(noise(0), step_noise(4, C, S, seed=8)(0))


def _sample(model, sampler, steps, cfg_scale, seed, labels):
    batch, cfg = len(labels), model.config
    return SAMPLERS[sampler](model, initial_noise(batch, cfg.in_channels, cfg.input_size, seed), torch.tensor(labels),
                             steps=steps, cfg_scale=cfg_scale, null_class=cfg.num_classes,
                             noise=step_noise(batch, cfg.in_channels, cfg.input_size, seed))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_runtime_sample_equals_the_eager_sampler(sampler):
    model = tiny_model()  # learn_sigma: 8 output channels, so DDPM uses the learned variance
    with torch.no_grad():
        expected = _sample(model, sampler, 4, 1.5, 7, [1, 2, 3])
    with moedit.compile(model, moedit.Plan()).to_runtime() as runtime:
        out = runtime.sample([1, 2, 3], steps=4, cfg_scale=1.5, seed=7, sampler=sampler)
        with pytest.raises(ValueError, match=r"unknown sampler 'euler'; use one of \['ddim', 'ddpm', 'rflow'\]"):
            runtime.sample([1], steps=2, sampler="euler")
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def _ddpm_worker(rank, world):
    plan = moedit.Plan(expert_parallel={"degree": world})
    with moedit.compile(tiny_model(), plan).to_runtime() as runtime:
        return runtime.sample([1, 2, 3, 4, 5], steps=3, cfg_scale=1.5, seed=7, sampler="ddpm")


def test_ddpm_noise_does_not_depend_on_the_number_of_ranks(spawn):
    with torch.no_grad():
        expected = _sample(tiny_model(), "ddpm", 3, 1.5, 7, [1, 2, 3, 4, 5])
    for out in spawn(2, _ddpm_worker):  # shards of 3 + 2 images, each rank with its rows of the global noise
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
