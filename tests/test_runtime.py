"""Synchronous expert parallelism on spawned gloo ranks equals the single-device model."""

import time

import pytest
import torch
from torch import nn

import moedit
from _models import STARVED, routing_counts, tiny_model
from moedit.models import initial_noise, rectified_flow_sample

LABELS = [1, 2, 3, 4, 5]  # 5 images: shards of 3+2 on 2 ranks, 2+1+1+1 on 4
STEPS, CFG = 3, 1.5


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(5, 4, 8, 8, generator=gen), torch.rand(5, generator=gen), torch.tensor([0, 3, 9, 3, 10])


def _plan(world, **runtime):
    return moedit.Plan(expert_parallel={"degree": world}, runtime=runtime)


def _parity_worker(rank, world):
    runtime = moedit.compile(tiny_model(), _plan(world)).to_runtime()
    x, t, y = _batch()
    held = [name for name, _ in runtime.gm.named_parameters() if ".experts." in name]
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
    except RuntimeError as err:
        return time.monotonic() - start, str(err)
    return None


def test_a_stalled_rank_makes_the_others_fail_within_the_timeout(spawn):
    result = spawn(2, _stalled_peer_worker)[0]
    assert result is not None, "rank 0 finished although its peer never joined"
    elapsed, message = result
    assert elapsed < 6, f"rank 0 waited {elapsed:.1f} s for a stalled peer with a 2 s timeout"
    assert "timed out" in message.lower() or "timeout" in message.lower(), message


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
    runtime = moedit.compile(ThirdPartyModel().eval(), _plan(world)).to_runtime()
    x = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(3))
    return runtime.gm(*runtime._shard(x))


def test_a_registered_third_party_moe_layer_runs_expert_parallel(spawn):
    x = torch.randn(6, 5, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ThirdPartyModel().eval()(x)
    shards = spawn(2, _adapter_worker)
    torch.testing.assert_close(torch.cat(shards), expected, rtol=0, atol=1e-5)
