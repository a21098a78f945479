"""ScMoE's shortcut schedule is exact; the rewrite of standard models is lossy and says so.

The schedule only reorders nodes, so on an ScMoE model the outputs must equal the
single-device model's, at every shortcut position and world size; and with a DICE plan
they must equal the same plan without the shortcut, bit for bit.
"""

import pytest
import torch

import moedit
from _models import tiny_model, tiny_scmoe
from moedit.graph import Kind, kind_of
from moedit.models.dit_moe import modulate
from moedit.plan import PlanError
from moedit.runtime.sampling import initial_noise, rectified_flow_sample

DEPTH, LABELS, STEPS, CFG = 3, [1, 2, 3, 4, 5], 3, 1.5
SHORTCUT = {"enabled": True}
DICE = dict(staleness={"mode": "interweaved"}, selective_sync={"strategy": "deep"})


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(5, 4, 8, 8, generator=gen), torch.rand(5, generator=gen), torch.tensor([0, 3, 9, 3, 10])


def _run(model, plan) -> dict:
    with moedit.compile(model, moedit.Plan(**plan)).to_runtime() as runtime:
        runtime.reset(steps=1)  # one step: stale plans open a sample first (moedit/runtime/executor.py)
        return {"denoise": runtime.denoise(*_batch()), "sample": runtime.sample(LABELS, STEPS, CFG, seed=7)}


def _reference(model) -> dict:
    with torch.no_grad():
        return {"denoise": model(*_batch()),
                "sample": rectified_flow_sample(model, initial_noise(5, 4, 8, seed=7), torch.tensor(LABELS),
                                                steps=STEPS, cfg_scale=CFG, null_class=10)}


def _assert_equal(results, expected, what, atol=1e-5):
    for key in ("denoise", "sample"):
        torch.testing.assert_close(results[key], expected[key], rtol=0, atol=atol, msg=lambda m: f"{what}, {key}: {m}")


def _worker(rank, world):
    results = {}
    positions = (1, 2, 3) if world == 2 else (2,)
    for position in positions:
        model = tiny_scmoe(depth=DEPTH, shortcut_position=position)
        results[f"pos {position}"] = _run(model, dict(shortcut=SHORTCUT, expert_parallel={"degree": world}))
    if world == 2:  # with the xDiT axes: attention split over the ranks, or the guided halves
        model = tiny_scmoe(depth=DEPTH)
        results["ulysses 2, pos 2"] = _run(model, dict(shortcut=SHORTCUT, expert_parallel={"degree": 2},
                                                       sequence_parallel={"ulysses": 2}))
        results["cfg 2, pos 2"] = _run(model, dict(shortcut=SHORTCUT, expert_parallel={"degree": 2}, cfg_parallel=True))
    model = tiny_scmoe(depth=DEPTH)
    results["dice"] = _run(model, dict(expert_parallel={"degree": world}, **DICE))
    results["dice + shortcut"] = _run(model, dict(shortcut=SHORTCUT, expert_parallel={"degree": world}, **DICE))
    return results


@pytest.mark.parametrize("position", [1, 2, 3])
def test_shortcut_schedule_is_exact_on_one_rank(position):
    model = tiny_scmoe(depth=DEPTH, shortcut_position=position)
    _assert_equal(_run(model, dict(shortcut=SHORTCUT)), _reference(model), f"pos {position}")


@pytest.mark.parametrize("world", [2, 4])
def test_shortcut_schedule_is_exact_across_ranks(spawn, world):
    expected = {position: _reference(tiny_scmoe(depth=DEPTH, shortcut_position=position)) for position in (1, 2, 3)}
    for rank, results in enumerate(spawn(world, _worker, timeout_s=240)):
        for name, result in results.items():
            if "pos" in name:
                _assert_equal(result, expected[int(name[-1])], f"{name}, rank {rank}")
        # composing with DICE: the stale layers as DICE runs them, the synchronous ones reordered
        _assert_equal(results["dice + shortcut"], results["dice"], f"dice + shortcut, rank {rank}", atol=0)


def _order(plan: dict, model=None) -> list:
    compiled = moedit.compile(model or tiny_scmoe(depth=DEPTH), moedit.Plan(**plan))
    return list(compiled.graph(0).graph.nodes)


def test_dispatch_starts_before_the_attention_it_overlaps_and_combine_waits_after_the_shared_expert():
    nodes = _order(dict(shortcut=SHORTCUT, expert_parallel={"degree": 2}))
    at = {node.name: i for i, node in enumerate(nodes)}
    for layer in range(DEPTH):
        dispatch, combine = at[f"l{layer}_dispatch_start"], at[f"l{layer}_combine_wait"]
        experts = at[f"l{layer}_experts"]
        assert dispatch < at[f"blocks_{layer}_attn"] < combine  # Pos-2: this block's attention is in the window
        assert at[f"blocks_{layer}_shared_experts_down_proj"] < combine
        assert dispatch < experts < combine
        if layer:  # ... and so is the previous block's shared expert
            assert dispatch < at[f"blocks_{layer - 1}_shared_experts_down_proj"]
    unscheduled = [n.name for n in _order(dict(expert_parallel={"degree": 2}))]
    assert unscheduled.index("l1_dispatch_start") > unscheduled.index("blocks_1_attn")


def test_counts_move_to_their_own_communicator():
    starts = [n for n in _order(dict(shortcut=SHORTCUT, expert_parallel={"degree": 2}))
              if kind_of(n) is Kind.COUNTS_START]
    assert starts and all(n.kwargs["channel"] == "counts" for n in starts)


def test_shortcut_on_a_standard_model_is_refused_without_rewrite():
    with pytest.raises(PlanError, match="shortcut.rewrite: true"):
        moedit.compile(tiny_model(), moedit.Plan(shortcut=SHORTCUT))
    with pytest.raises(PlanError, match="already read the previous block"):
        moedit.compile(tiny_scmoe(), moedit.Plan(shortcut={"enabled": True, "rewrite": True}))
    with pytest.raises(PlanError, match="chunks"):
        moedit.Plan(shortcut=SHORTCUT, expert_parallel={"degree": 2, "chunks": 2})
    with pytest.raises(PlanError, match="enabled: true"):
        moedit.Plan(shortcut={"rewrite": True})
    with pytest.raises(PlanError, match="only applies with rewrite"):
        moedit.Plan(shortcut={"enabled": True, "position": 3})
    with pytest.raises(PlanError, match="reorder the program again"):
        moedit.Plan(shortcut=SHORTCUT, schedule={"policy": "overlap"})


@torch.no_grad()
def _rewritten_reference(model, position, x, t, y):
    """The standard model with every MoE but the first fed from the previous block's `position`."""
    x = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y)
    previous = None
    for block in model.blocks:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c).chunk(6, dim=1)
        h = x + gate_msa.unsqueeze(1) * block.attn(modulate(block.norm1(x), shift_msa, scale_msa))
        source = h if previous is None else {1: x, 2: previous[1], 3: previous[0]}[position]
        out = h + gate_mlp.unsqueeze(1) * block.moe(modulate(block.norm2(source), shift_mlp, scale_mlp))
        previous, x = (x, h), out
    return model.unpatchify(model.final_layer(x, c))


@pytest.mark.parametrize("position", [1, 2, 3])
def test_rewrite_feeds_the_moe_from_the_shortcut_position(position):
    model = tiny_model(depth=DEPTH)
    plan = moedit.Plan(shortcut={"enabled": True, "rewrite": True, "position": position})
    compiled = moedit.compile(model, plan)
    with compiled.to_runtime() as runtime:
        out = runtime.denoise(*_batch())
    torch.testing.assert_close(out, _rewritten_reference(model, position, *_batch()), rtol=0, atol=1e-5)
    with torch.no_grad():
        assert (out - model(*_batch())).abs().max() > 1e-2  # it is a different model
    assert "LOSSY" in compiled.explain()
