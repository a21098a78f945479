"""Synchronous expert parallelism on spawned gloo ranks equals the single-device model."""

import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import moedit
from _models import STARVED, routing_counts, tiny_model
from moedit.pipeline import PassResult, layers_of
from moedit.runtime import ops
from moedit.runtime.comm import STALL_REPORT_S
from moedit.runtime.sampling import initial_noise, rectified_flow_sample
from moedit.tracer import trace

LABELS = [1, 2, 3, 4, 5]  # 5 images: shards of 3+2 on 2 ranks, 2+1+1+1 on 4
STEPS, CFG = 3, 1.5


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(5, 4, 8, 8, generator=gen), torch.rand(5, generator=gen), torch.tensor([0, 3, 9, 3, 10])


def _plan(world, **runtime):
    return moedit.Plan(expert_parallel={"degree": world}, runtime=runtime)


def _parity_worker(rank, world):
    compiled = moedit.compile(tiny_model(), _plan(world))
    with compiled.to_runtime() as runtime:
        x, t, y = _batch()
        held = [name for name, _ in compiled.graph(rank).named_parameters() if ".experts." in name]
        return {"denoise": runtime.denoise(x, t, y), "sample": runtime.sample(LABELS, STEPS, CFG, seed=7),
                "held": held, "steps": len(runtime.step_times)}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_sync_ep_equals_the_single_device_model(spawn, world):
    model = tiny_model()
    x, t, y = _batch()
    counts = routing_counts(model, x, t, y)
    assert counts[list(STARVED)].sum() == 0 and counts.min() == 0 < counts.max(), "routing must be uneven"
    with torch.no_grad():
        expected_denoise = model(x, t, y)
        expected_sample = rectified_flow_sample(model, initial_noise(5, 4, 8, seed=7), torch.tensor(LABELS),
                                                steps=STEPS, cfg_scale=CFG, null_class=10)
    for rank, result in enumerate(spawn(world, _parity_worker)):
        torch.testing.assert_close(result["denoise"], expected_denoise, rtol=0, atol=1e-5)
        torch.testing.assert_close(result["sample"], expected_sample, rtol=0, atol=1e-5)
        held = sorted({int(n.split(".experts.")[1].split(".")[0]) for n in result["held"]})
        assert held == list(range(rank, 8, world)), "a rank must hold exactly its own experts"
        assert result["steps"] == STEPS


def _mismatch_worker(rank, world):
    try:
        moedit.compile(tiny_model(), _plan(4)).to_runtime()
    except moedit.PlanError as err:
        return str(err)
    return None


def test_world_size_mismatch_is_a_clear_error(spawn):
    for message in spawn(2, _mismatch_worker):
        assert message is not None and "compiled for 4 ranks but the process group has 2" in message
        assert "--nproc_per_node=4" in message


def _stalled_peer_worker(rank, world):
    runtime = moedit.compile(tiny_model(), _plan(world, timeout_s=2)).to_runtime()
    if rank == 1:
        time.sleep(8)  # never joins the exchange
        return None
    x, t, y = _batch()
    start = time.monotonic()
    try:
        runtime.denoise(x, t, y)
    except moedit.CollectiveError as err:
        return time.monotonic() - start, str(err)
    return None


def test_a_stalled_rank_makes_the_others_fail_within_the_timeout(spawn):
    result = spawn(2, _stalled_peer_worker)[0]
    assert result is not None, "rank 0 finished although its peer never joined"
    elapsed, message = result
    # the timeout, then up to STALL_REPORT_S for the other ranks to say they timed out too
    assert elapsed < 2 + STALL_REPORT_S + 3, f"rank 0 waited {elapsed:.1f} s for a stalled peer with a 2 s timeout"
    assert "exchange counts of MoE layer 0 on mesh axis 'ep' failed at diffusion step 0 (sync program)" in message
    assert "runtime.timeout_s = 2" in message and "rank(s) 1 did not join" in message


STALL_SCRIPT = """
import sys, time, torch, moedit
sys.path.insert(0, {tests!r})
from _models import tiny_model
plan = moedit.Plan(expert_parallel={{"degree": 4}}, runtime={{"timeout_s": 5}})
runtime = moedit.compile(tiny_model(), plan).to_runtime()
if runtime.rank == 2:
    time.sleep(120)  # stops answering
runtime.sample([1, 2, 3, 4], steps=3, cfg_scale=1.5)
"""


def test_every_rank_exits_within_the_timeout_when_a_peer_stops_answering(tmp_path):
    script = tmp_path / "stall.py"
    script.write_text(STALL_SCRIPT.format(tests=str(pathlib.Path(__file__).parent)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", str(script)]
    start = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert elapsed < 5 + 30, f"the ranks took {elapsed:.0f} s to exit with a 5 s collective timeout"
    assert "failed at diffusion step 0 (sync program)" in proc.stderr, proc.stderr[-3000:]
    assert "(runtime.timeout_s = 5)" in proc.stderr
    assert "rank(s) 2 did not join" in proc.stderr and "rank(s) 0" not in proc.stderr, proc.stderr[-3000:]


def _sequential_worker(rank, world):
    images = []
    for mode in ("sync", "interweaved", "sync", "interweaved"):
        # the first runtime may create the default group; closing one must leave it for the next
        plan = moedit.Plan(expert_parallel={"degree": world}, staleness={"mode": mode})
        with moedit.compile(tiny_model(), plan).to_runtime() as runtime:
            mesh = runtime.state.mesh
            assert mesh.channels == (["main"] if mode == "sync" else ["counts", "main", "stale"])
            groups = [mesh.group("ep", channel) for channel in mesh.channels]
            assert dist.group.WORLD not in groups and len(set(map(id, groups))) == len(groups)
            images.append(runtime.sample(LABELS, STEPS, CFG, seed=7))
        assert dist.is_initialized()
    return images


@pytest.mark.parametrize("group_from", ["moedit", "caller"])
def test_two_runtimes_one_after_the_other(spawn, group_from):
    for sync, stale, sync_again, stale_again in spawn(2, _sequential_worker, init_group=group_from == "caller",
                                                        timeout_s=90):
        torch.testing.assert_close(sync_again, sync, rtol=0, atol=0)
        torch.testing.assert_close(stale_again, stale, rtol=0, atol=0)


def _steps(n):
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(4, 4, 8, 8, generator=gen), 0.95 - 0.1 * step + 0.05 * torch.rand(4, generator=gen),
             torch.randint(0, 10, (4,), generator=gen)) for step in range(n)]  # timesteps fall, as a sampler's


def _side_by_side_worker(rank, world):
    plan = moedit.Plan(expert_parallel={"degree": world}, staleness={"mode": "displaced"},
                       conditional_comm={"interval": 2, "drop": "random"})
    compiled = moedit.compile(tiny_model(), plan)
    inputs_a, inputs_b = _steps(5), _steps(5)[::-1]
    alone = []
    with compiled.to_runtime() as runtime:
        runtime.reset(steps=5, seed=1)
        alone = [runtime.denoise(*inputs) for inputs in inputs_a]
    a, b = compiled.to_runtime(), compiled.to_runtime()
    a.reset(steps=5, seed=1)
    b.reset(steps=5, seed=2)
    together = []
    for step in range(5):  # interleaved: each runtime's caches and groups must stay its own
        together.append(a.denoise(*inputs_a[step]))
        b.denoise(*inputs_b[step])
    a.close()
    b.close()
    return alone, together


def test_two_runtimes_of_one_compiled_model_side_by_side(spawn):
    for alone, together in spawn(2, _side_by_side_worker):
        for step, (x, y) in enumerate(zip(alone, together)):
            torch.testing.assert_close(y, x, rtol=0, atol=0, msg=lambda m: f"step {step}: {m}")


def _swap_in_process_1(gm, ctx):
    """A faulty pass that differs between processes (not between ranks built in one process)."""
    if os.environ["RANK"] == "1":
        first, second = [n for n in gm.graph.nodes if n.target is ops.exchange_start][:2]
        first.update_kwarg("name", "combine")
        second.update_kwarg("name", "dispatch")
    return PassResult(gm, os.environ["RANK"] == "1", [])


def _divergent_worker(rank, world):
    model = tiny_model()
    traced = trace(model)
    compiled = moedit.CompiledModel(model, _plan(world), traced, layers_of(traced),
                                    pipeline=moedit.compiled.PIPELINE + [_swap_in_process_1])
    try:
        compiled.to_runtime()
    except RuntimeError as err:
        return str(err)
    return None


def test_collective_order_that_differs_between_processes_fails_on_every_rank_before_any_exchange(spawn):
    for message in spawn(2, _divergent_worker):
        assert message is not None and "in a different order in the sync program" in message


# A third-party MoE layer with a different structure, described by an adapter.
class ThirdPartyMoE(nn.Module):
    def __init__(self, hidden=16, experts=4):
        super().__init__()
        self.router = nn.Linear(hidden, experts)
        self.ffns = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 32), nn.GELU(), nn.Linear(32, hidden))
                                  for _ in range(experts))

    def forward(self, x):
        tokens = x.flatten(0, -2)
        weights, ids = self.router(tokens).softmax(-1).topk(2, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(tokens)
        for e, ffn in enumerate(self.ffns):
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            out.index_add_(0, token, ffn(tokens[token]) * weights[token, slot, None])
        return out.reshape(x.shape)


class ThirdPartyAdapter(moedit.MoEAdapter):
    def route(self, moe, tokens):
        weights, ids = moe.router(tokens).softmax(-1).topk(2, dim=-1)
        return ids, weights / weights.sum(-1, keepdim=True)

    def experts(self, moe):
        return list(moe.ffns)

    def top_k(self, moe):
        return 2


moedit.register_adapter(ThirdPartyMoE, ThirdPartyAdapter())


class ThirdPartyModel(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp, self.moe1, self.moe2 = nn.Linear(8, 16), ThirdPartyMoE(), ThirdPartyMoE()

    def forward(self, x):
        h = self.inp(x)
        h = h + self.moe1(h)
        return h + self.moe2(torch.tanh(h))


def _adapter_worker(rank, world):
    with moedit.compile(ThirdPartyModel().eval(), _plan(world)).to_runtime() as runtime:
        return runtime.denoise(torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(3)))


def test_a_registered_third_party_moe_layer_runs_expert_parallel(spawn):
    x = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ThirdPartyModel().eval()(x)
    for output in spawn(2, _adapter_worker):
        torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


def _failed_start_worker(rank, world):
    from torch.distributed import distributed_c10d

    import moedit.runtime.executor as executor

    compiled = moedit.compile(tiny_model(depth=2), moedit.Plan(expert_parallel={"degree": world}))
    groups = len(distributed_c10d._world.pg_map)  # the default group, made by the test's spawner

    def broken_ready(*_args):
        raise RuntimeError("failed while readying the programs")

    executor._ready = broken_ready  # fails after the runtime made its own groups
    try:
        compiled.to_runtime()
    except RuntimeError as err:
        assert "readying" in str(err)
    return groups, len(distributed_c10d._world.pg_map)


def test_a_start_that_fails_after_making_its_groups_leaves_them(spawn):
    for before, after in spawn(2, _failed_start_worker):
        assert after == before


def test_a_closed_runtime_says_so():
    runner = moedit.compile(tiny_model(depth=2), moedit.Plan()).to_runtime()
    runner.close()
    runner.close()  # a second close does nothing
    with pytest.raises(RuntimeError, match="this runtime is closed; start a new one with compiled.to_runtime"):
        runner.denoise(*_batch())
