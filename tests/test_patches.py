"""Patch parallelism (DistriFusion) and PipeFusion: exact on synchronous steps, and on stale
steps every attention reads exactly the K/V the pass claims.

The probes watch each attention's fresh q/k/v (`sp_qkv`) and the K/V buffer it attends to
(`sp_attend`) on every rank, with a different input at every step, and rebuild the buffer
from the fresh K/V of the step the rule names:
* patch parallelism: another patch's K/V at step t is what that patch's rank computed at
  step t-1, its own is step t's (all of them step t's on synchronous steps);
* PipeFusion: patch p's attention at step t reads step t's K/V for patches 0..p and step
  t-1's for the patches after p (all of step t on synchronous steps, one patch of every token).
"""

import pytest
import torch

import moedit
from _models import tiny_model
from moedit.planner.costs import Hardware
from moedit.plan import PlanError
from moedit.runtime.sampling import initial_noise, rectified_flow_sample
from moedit.runtime.sequence_ops import piece_bounds
from moedit.planner.simulate import replay, simulate
from moedit.verify import verify_collective_order

LABELS = [1, 2, 3, 4, 5]
STEPS, CFG = 3, 1.5
ALL_WARM = {"warmup_steps": 50}  # every step synchronous

EXACT = {  # world -> name -> (model depth, plan)
    2: {
        "patch 2": (2, dict(patch_parallel={"degree": 2, **ALL_WARM}, expert_parallel={"degree": 2})),
        "patch 2, experts on 1": (2, dict(patch_parallel={"degree": 2, **ALL_WARM})),
        "pipefusion 2 x 4 patches": (2, dict(pipefusion={"degree": 2, "patches": 4, **ALL_WARM})),
        "patch 2, overlap schedule": (2, dict(patch_parallel={"degree": 2, **ALL_WARM}, expert_parallel={"degree": 2},
                                              schedule={"policy": "overlap"})),
        "patch 2 + interweaved": (2, dict(patch_parallel={"degree": 2, **ALL_WARM}, expert_parallel={"degree": 2},
                                          staleness={"mode": "interweaved", **ALL_WARM})),
    },
    4: {
        "patch 4": (2, dict(patch_parallel={"degree": 4, **ALL_WARM}, expert_parallel={"degree": 4})),
        "cfg 2 x patch 2": (2, dict(cfg_parallel=True, patch_parallel={"degree": 2, **ALL_WARM},
                                    expert_parallel={"degree": 4})),
        "pipefusion 2, experts over 2 (data 2)": (2, dict(pipefusion={"degree": 2, **ALL_WARM},
                                                          expert_parallel={"degree": 2})),
        "pipefusion 4, depth 5": (5, dict(pipefusion={"degree": 4, "patches": 3, **ALL_WARM})),
    },
}


def _batch(step=0):
    gen = torch.Generator().manual_seed(1 + step)
    t = 0.95 - 0.1 * step + 0.05 * torch.rand(5, generator=gen)  # falling, as a sampler's timesteps do
    return torch.randn(5, 4, 8, 8, generator=gen), t, torch.tensor([0, 3, 9, 3, 10])


def _exact_worker(rank, world):
    results = {}
    for name, (depth, plan) in EXACT[world].items():
        compiled = moedit.compile(tiny_model(depth=depth), moedit.Plan(**plan))
        with compiled.to_runtime() as runtime:
            runtime.reset(steps=1)  # a one-step sample (see [Note: samples] in moedit/runtime/executor.py)
            results[name] = {"denoise": runtime.denoise(*_batch()),
                             "sample": runtime.sample(LABELS, STEPS, CFG, seed=7)}
    return results


def _reference(depth):
    model = tiny_model(depth=depth)
    with torch.no_grad():
        return {"denoise": model(*_batch()),
                "sample": rectified_flow_sample(model, initial_noise(5, 4, 8, seed=7), torch.tensor(LABELS),
                                                steps=STEPS, cfg_scale=CFG, null_class=10)}


@pytest.mark.parametrize("world", [2, 4])
def test_synchronous_steps_equal_the_single_device_model(spawn, world):
    expected = {depth: _reference(depth) for depth in {depth for depth, _ in EXACT[world].values()}}
    for rank, results in enumerate(spawn(world, _exact_worker, timeout_s=300)):
        assert set(results) == set(EXACT[world])
        for name, result in results.items():
            reference = expected[EXACT[world][name][0]]
            for what in ("denoise", "sample"):
                torch.testing.assert_close(result[what], reference[what], rtol=0, atol=1e-5,
                                           msg=lambda m: f"{name}, {what}, rank {rank}: {m}")


# -- staleness probes ---------------------------------------------------------------

PROBE_STEPS = 5
PROBES = {  # world -> name -> (model depth, plan)
    2: {"patch": (2, dict(patch_parallel={"degree": 2}, expert_parallel={"degree": 2}, staleness={"sync_every": 3})),
        "pipefusion": (2, dict(pipefusion={"degree": 2, "patches": 3}, staleness={"sync_every": 3}))},
    4: {"patch": (2, dict(patch_parallel={"degree": 4}, expert_parallel={"degree": 4},  # and DICE on the MoE layers
                          staleness={"mode": "interweaved"})),
        "pipefusion": (4, dict(pipefusion={"degree": 2, "patches": 4}, expert_parallel={"degree": 2}))},
}


def _probe_worker(rank, world, name):
    depth, plan = PROBES[world][name]
    runtime = moedit.compile(tiny_model(depth=depth), moedit.Plan(**plan)).to_runtime()
    fresh, used, step = {}, {}, [0]
    for gm in runtime.programs.values():
        for block in range(depth):
            try:
                attn = gm.get_submodule(f"blocks.{block}.attn")
            except AttributeError:
                continue  # another stage's block
            attn.sp_qkv.register_forward_hook(  # (q, kv) under patch parallelism, stacked q/k/v under PipeFusion
                lambda _m, _i, out, b=block: fresh.setdefault((b, step[0]), []).append(
                    out[1].clone() if isinstance(out, tuple) else out[1:].clone()))
            attn.sp_attend.register_forward_hook(
                lambda _m, inputs, _o, b=block: used.setdefault((b, step[0]), []).append(inputs[1].clone()))
    runtime.reset(steps=PROBE_STEPS)
    for step[0] in range(PROBE_STEPS):
        runtime.denoise(*_batch(step[0]))
    runtime.close()
    return fresh, used, [kind.name for kind in runtime.step_log]


def _tokens(kv, start, stop):
    return kv[..., start:stop, :]


@pytest.mark.parametrize("world", [2, 4])
def test_patch_parallel_reads_other_patches_kv_from_the_step_before(spawn, world):
    ranks = spawn(world, _probe_worker, "patch", timeout_s=240)
    log = ranks[0][2]
    assert "async" in log, "the probe needs stale steps"
    checked = differs = 0
    for rank, (fresh, used, _) in enumerate(ranks):
        for (block, t), [kv] in used.items():
            for patch in range(world):
                start, stop = piece_bounds(kv.shape[-2], world, patch)
                source = t if log[t] == "sync" or patch == rank else t - 1
                torch.testing.assert_close(_tokens(kv, start, stop), ranks[patch][0][block, source][0], rtol=0,
                                           atol=0, msg=lambda m: f"rank {rank}, block {block}, step {t}, patch {patch}")
                if source != t:
                    differs += not torch.equal(_tokens(kv, start, stop), ranks[patch][0][block, t][0])
                checked += 1
    assert checked == world * 2 * PROBE_STEPS * world
    assert differs > 0, "stale K/V must differ from this step's, or the probe proves nothing"


@pytest.mark.parametrize("world", [2, 4])
def test_pipefusion_reads_earlier_patches_of_this_step_and_later_ones_of_the_step_before(spawn, world):
    depth, plan = PROBES[world]["pipefusion"]
    patches, stages = plan["pipefusion"]["patches"], plan["pipefusion"]["degree"]
    ranks = spawn(world, _probe_worker, "pipefusion", timeout_s=240)
    log = ranks[0][2]
    assert log[:3] == ["sync", "async", "async"], "stale steps after a synchronous one and after a stale one"
    differs = 0
    for rank, (fresh, used, _) in enumerate(ranks):
        mesh = moedit.Plan(**plan).mesh
        stage = mesh.index("pipefusion", rank)
        blocks = {block for block, _ in used}
        assert blocks == set(range(*piece_bounds(depth, stages, stage))), f"rank {rank} runs only its stage's blocks"
        for (block, t), calls in used.items():
            if log[t] == "sync":
                assert len(calls) == 1 and torch.equal(calls[0], fresh[block, t][0])
                continue
            assert len(calls) == patches
            for p, kv in enumerate(calls):
                for q in range(patches):
                    start, stop = piece_bounds(kv.shape[-2], patches, q)
                    if q <= p:
                        expected = fresh[block, t][q]
                    elif log[t - 1] == "sync":
                        expected = _tokens(fresh[block, t - 1][0], start, stop)
                    else:
                        expected = fresh[block, t - 1][q]
                    torch.testing.assert_close(_tokens(kv, start, stop), expected, rtol=0, atol=0,
                                               msg=lambda m: f"rank {rank}, block {block}, step {t}, patch {p}/{q}")
                    if q > p:
                        differs += not torch.equal(expected, fresh[block, t][q])
    assert differs > 0, "stale K/V must differ from this step's, or the probe proves nothing"


# -- programs and plans (no process group) ------------------------------------------

def test_a_pipefusion_rank_holds_only_its_stage():
    compiled = moedit.compile(tiny_model(depth=4), moedit.Plan(pipefusion={"degree": 2}))
    compiled.check_collective_order()
    for rank, blocks in ((0, {"0", "1"}), (1, {"2", "3"})):
        for kind in compiled.kinds:
            keys = compiled.graph(rank, kind).state_dict()
            assert {k.split(".")[1] for k in keys if k.startswith("blocks.")} == blocks
    code = compiled.graph(1, "async").code
    assert "recv_start" in code and "send_start" not in code and "broadcast_start" in code
    assert "send_start" in compiled.graph(0, "async").code


@pytest.mark.parametrize("plan, message", [
    (dict(patch_parallel={"degree": 2}, sequence_parallel={"ulysses": 2}), "one way at a time"),
    (dict(pipefusion={"degree": 2}, staleness={"mode": "displaced"}), "set staleness.mode: sync"),
    (dict(pipefusion={"degree": 2}, schedule={"policy": "overlap"}), "keep schedule.policy"),
    (dict(patch_parallel={"degree": 2, "warmup_steps": 2}, staleness={"mode": "interweaved"},
          expert_parallel={"degree": 2}), r"must equal staleness.warmup_steps \(1\)"),
    (dict(patch_parallel={"degree": 2}, shortcut={"enabled": True}), "does not combine with shortcut"),
    (dict(patch_parallel={"degree": 2, "warmup_steps": 0}), "greater than or equal to 1"),
])
def test_plans_that_do_not_combine_are_refused(plan, message):
    with pytest.raises(PlanError, match=message):
        moedit.Plan(**plan)


@pytest.mark.parametrize("plan, message", [
    (dict(patch_parallel={"degree": 3}, expert_parallel={"degree": 1}), r"must divide the tokens per image \(16\)"),
    (dict(pipefusion={"degree": 3}), r"must not exceed the blocks \(2\)"),
])
def test_degrees_the_model_cannot_take_are_refused(plan, message):
    with pytest.raises(PlanError, match=message):
        moedit.compile(tiny_model(), moedit.Plan(**plan))


def test_the_simulator_replays_the_pipeline_and_the_stale_gathers():
    """Every rank's sends meet the next stage's receives, so the replay finishes; PipeFusion's
    stage 0 moves only activations, a fraction of what patch parallelism gathers."""
    sent = {}
    for name, plan in (("patch", dict(patch_parallel={"degree": 2}, expert_parallel={"degree": 2})),
                       ("pipefusion", dict(pipefusion={"degree": 2, "patches": 4}))):
        compiled = moedit.compile(tiny_model(depth=4), moedit.Plan(**plan))
        prediction = simulate(replay(compiled, 4), Hardware.load("l40-pcie-8"), steps=3)
        assert prediction.mean_step_s > 0
        sent[name] = prediction.sent_bytes[-1]
    assert 0 < sent["pipefusion"] < sent["patch"]


def test_point_to_point_sends_must_meet_their_receives():
    layout = moedit.Plan(pipefusion={"degree": 2}).mesh
    sends = {("pipefusion", "p2p"): ["send to 1, tag 0", "send to 1, tag 1"]}
    verify_collective_order({0: sends, 1: {("pipefusion", "p2p"): ["receive from 0, tag 0",
                                                                    "receive from 0, tag 1"]}}, "async", layout)
    with pytest.raises(RuntimeError, match=r"sends to rank 1 .* tags \['0', '1'\], but rank 1 receives .* \['0'\]"):
        verify_collective_order({0: sends, 1: {("pipefusion", "p2p"): ["receive from 0, tag 0"]}}, "async", layout)
