"""`moedit.parallelize(pipe, plan)`: unmodified diffusers pipelines (HiDream-I1, which batches
its CFG halves, and NucleusMoE-Image, which calls the transformer twice a step), tiny and
random, with the prompt given as embeddings; images against the eager pipeline's. See
[Note: pipeline samples] in moedit/parallelize.py and [Note: streams] in
moedit/runtime/executor.py."""

import pytest
import torch

import moedit

pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install -e '.[test]'")
pytest.importorskip("transformers", reason="diffusers' pipelines need transformers: pip install -e '.[test]'")
from _diffusers import (flux_pipeline, flux_prompt, hidream_pipeline, hidream_prompt, nucleus_pipeline,  # noqa: E402
                        nucleus_prompt)
from _models import tiny_model  # noqa: E402

PIPELINES = {"hidream": (hidream_pipeline, hidream_prompt), "nucleus": (nucleus_pipeline, nucleus_prompt),
             "flux": (flux_pipeline, flux_prompt)}
STEPS = 4
SYNC_EP = {"expert_parallel": {"degree": 2}}
ULYSSES = {"sequence_parallel": {"ulysses": 2}, "expert_parallel": {"degree": 2}}  # experts over the token split
DICE = {"expert_parallel": {"degree": 2}, "staleness": {"mode": "interweaved", "warmup_steps": 1},
        "selective_sync": {"strategy": "deep"}}  # (NucleusMoE's expert choice refuses conditional_comm)


def _images(pipe, prompt, seed: int) -> torch.Tensor:
    return pipe(**prompt(seed), height=16, width=16, num_inference_steps=STEPS, guidance_scale=3.0, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def _eager(name: str, seeds: list[int]) -> list[torch.Tensor]:
    build, prompt = PIPELINES[name]
    pipe = build()
    return [_images(pipe, prompt, seed) for seed in seeds]


def _worker(rank, world, name, plans):
    """Each plan's images for its seeds, one pipeline call each, on a pipeline of its own."""
    build, prompt = PIPELINES[name]
    images = []
    for plan, seeds in plans:
        pipe = moedit.parallelize(build(), moedit.Plan(**plan))
        images.append([_images(pipe, prompt, seed) for seed in seeds])
        pipe.transformer.close()
    return images


@pytest.mark.parametrize("name", ["hidream", "nucleus"])
def test_parallelize_gives_the_eager_pipelines_images(spawn, name):
    """Sync EP and Ulysses 2: each call's images equal the eager pipeline's; a DICE-style plan's
    are close, not identical, and a later call with the first call's seed gives the first
    call's images: nothing the previous image left is read."""
    eager = _eager(name, [0, 1])
    assert all(image.std() > 0.01 for image in eager)
    ranks = spawn(2, _worker, name, [(SYNC_EP, [0, 1]), (DICE, [0, 1, 0]), (ULYSSES, [1])])
    for exact, stale, ulysses in ranks:
        for got, want in zip(exact + ulysses, eager + eager[1:], strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        seeds_apart = float((eager[1] - eager[0]).norm() / eager[0].norm())
        for got, want in zip(stale, eager):
            error = float((got - want).norm() / want.norm())
            assert torch.isfinite(got).all() and 0 < error < 0.2 * seeds_apart, (error, seeds_apart)
        assert torch.equal(stale[2], stale[0])
    assert all(torch.equal(rank[1][0], ranks[0][1][0]) for rank in ranks)  # every rank returns the same images


def test_a_dense_pipeline_under_ulysses(spawn):
    """Flux's pipeline (dense; its position ids have no batch axis, registered as such)."""
    [eager] = _eager("flux", [0])
    for [[image]] in spawn(2, _worker, "flux", [({"sequence_parallel": {"ulysses": 2}}, [0])]):
        torch.testing.assert_close(image, eager, rtol=0, atol=1e-4)


def test_a_one_rank_plan_runs_in_one_process():
    pipe = moedit.parallelize(hidream_pipeline(), moedit.Plan())
    torch.testing.assert_close(_images(pipe, hidream_prompt, 0), _eager("hidream", [0])[0], rtol=0, atol=1e-5)
    assert pipe.transformer.config.in_channels == 4 and type(pipe).__name__ == "HiDreamImagePipeline"
    pipe.transformer.close()


def _different_latents_worker(rank, world):
    pipe = moedit.parallelize(hidream_pipeline(), moedit.Plan(**SYNC_EP))
    try:
        _images(pipe, hidream_prompt, rank)  # each rank its own seed
    except ValueError as err:
        return str(err)
    finally:
        pipe.transformer.close()


def _different_guidance_worker(rank, world):
    pipe = moedit.parallelize(hidream_pipeline(), SYNC_EP)  # (a plan's keyword arguments as a dict)
    try:
        pipe(**hidream_prompt(0), num_inference_steps=STEPS, guidance_scale=2.0 + rank, output_type="pt",
             generator=torch.Generator().manual_seed(0))
    except ValueError as err:
        return str(err)
    finally:
        pipe.transformer.close()


def test_ranks_given_different_calls_are_told_what_differs(spawn):
    """Other seeds (so other latents) or another guidance scale (which the transformer's first
    call does not show) on one rank: every rank stops, naming the pipeline call."""
    for worker in (_different_latents_worker, _different_guidance_worker):
        for message in spawn(2, worker):
            assert "the arguments of pipe(...) differ between rank" in message and "generator=" in message


def test_bad_pipelines_and_plans_fail_before_the_first_step():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), norm_num_groups=4,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), layers_per_block=1)
    with pytest.raises(moedit.PlanError, match="DDPMPipeline has no `transformer` module .*unet"):
        moedit.parallelize(DDPMPipeline(unet, DDPMScheduler()), moedit.Plan())
    with pytest.raises(moedit.PlanError, match=r"needs 2 rank\(s\) .* but 1 were launched; .*--nproc_per_node=2"):
        moedit.parallelize(hidream_pipeline(), moedit.Plan(**SYNC_EP))
    pipe = moedit.parallelize(hidream_pipeline(), moedit.Plan())
    with pytest.raises(moedit.PlanError, match="parallelized already"):
        moedit.parallelize(pipe, moedit.Plan())
    with pytest.raises(moedit.PlanError, match="takes a pipeline, not a model .*moedit.compile"):
        moedit.parallelize(pipe.transformer.model, moedit.Plan())


class _Branchy(torch.nn.Module):
    """A transformer whose forward branches on its input's values: moedit cannot capture it."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, hidden_states, timestep):
        return (self.proj(hidden_states) if (hidden_states > 0).any() else hidden_states,)


class _Pipeline:
    def __init__(self):
        self.transformer, self.scheduler = _Branchy(), type("Scheduler", (), {"timesteps": torch.ones(2)})()


def test_a_transformer_moedit_cannot_capture_is_named():
    pipe = moedit.parallelize(_Pipeline(), moedit.Plan())
    with pytest.raises(moedit.PlanError, match=r"cannot capture the pipeline's transformer \(_Branchy\)"):
        pipe.transformer(torch.ones(1, 4), torch.ones(1))


# -- streams: one sample, two calls a step (see [Note: streams]) ------------------------------

def _streams_worker(rank, world):
    """Two streams interleaved, step by step, against each one run alone in a sample of its own."""
    plan = moedit.Plan(expert_parallel={"degree": world}, staleness={"mode": "displaced", "warmup_steps": 1})
    compiled = moedit.compile(tiny_model(), plan)
    gen = torch.Generator().manual_seed(0)
    inputs = [[(torch.randn(4, 4, 8, 8, generator=gen), torch.full((4,), 900.0 - 100 * step),
                torch.arange(4) + 4 * stream) for step in range(3)] for stream in range(2)]
    with compiled.to_runtime() as runner:
        alone = []
        for stream in inputs:
            runner.reset(steps=3)
            alone.append([runner.denoise(*call) for call in stream])
        runner.reset(steps=3)
        together = [[], []]
        for step in range(3):
            for stream in (0, 1):
                runner.stream(stream)
                together[stream].append(runner.denoise(*inputs[stream][step]))
        log = [kind.name for kind in runner.step_log]
    return alone, together, log


def test_each_stream_reads_only_what_its_own_earlier_steps_left(spawn):
    for alone, together, log in spawn(2, _streams_worker):
        assert log == ["sync", "async", "async"]  # stream 1's own step counter
        for stream in (0, 1):
            for got, want in zip(together[stream], alone[stream], strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        assert not torch.allclose(alone[0][2], alone[1][2])
