"""Tracing, the expert-parallel pass and the verifier, with no process group."""

import pytest
import torch
from torch import nn

import moedit
from _models import tiny_model
from moedit.compiled import compile as compile_model
from moedit.models import dit_moe
from moedit.pipeline import PassContext, PassResult, copy_module, layers_of, run_passes, PassError
from moedit.runtime.comm import AllToAllStart, wait
from moedit.tracer import trace


def _ep(world):
    return moedit.Plan(expert_parallel={"degree": world})


def test_tiny_traces_with_moe_and_attention_as_leaves():
    gm = trace(dit_moe("tiny"))
    kinds = [n.meta["moedit"] for n in gm.graph.nodes if "moedit" in n.meta]
    assert kinds == [{"kind": "attention"}, {"kind": "moe", "layer": 0}, {"kind": "attention"},
                     {"kind": "moe", "layer": 1}]


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), DataDependent())

    def forward(self, x):
        return self.inner(x)


def test_untraceable_module_is_named_with_the_fix():
    with pytest.raises(moedit.TraceError, match=r"module 'inner.1' \(DataDependent\).*register_leaf\(DataDependent\)"):
        trace(Untraceable())


def test_model_without_moe_layers_is_rejected():
    with pytest.raises(moedit.TraceError, match="no MoE layer moedit recognises.*register_adapter"):
        trace(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_each_rank_holds_only_its_own_experts(world):
    model = dit_moe("tiny")
    compiled = moedit.compile(model, moedit.Plan(expert_parallel={"degree": world}, staleness={"mode": "displaced"}))
    for rank in range(world):
        keys = [k for k in compiled.graph(rank).state_dict() if ".experts." in k]
        held = sorted({int(k.split(".experts.")[1].split(".")[0]) for k in keys})
        assert held == compiled.experts_of(rank) == list(range(rank, 8, world))
        assert len(keys) == 2 * len(held) * 3  # two layers, three projections per expert
    # Compiling leaves the user's model untouched and shares (does not copy) its weights.
    assert [type(e).__name__ for e in model.blocks[0].moe.experts] == ["MoeMLP"] * 8
    assert not hasattr(model.blocks[0].moe, "ep_router")
    w = compiled.graph(world - 1).get_parameter(f"blocks.0.moe.experts.{world - 1}.up_proj.weight")
    assert w is model.blocks[0].moe.experts[world - 1].up_proj.weight


def test_expert_parallel_rewrites_every_moe_layer_in_order():
    compiled = moedit.compile(dit_moe("tiny"), _ep(2))
    gm = compiled.graph(0)
    assert not [n for n in gm.graph.nodes if n.meta.get("moedit", {}).get("kind") == "moe"]
    layer0 = [n.meta["moedit"]["kind"] for n in gm.graph.nodes
              if n.meta.get("moedit", {}).get("layer") == 0 and n.meta["moedit"]["kind"] != "glue"]
    assert layer0 == ["route", "permute", "counts", "dispatch_start", "shared", "dispatch_wait", "experts",
                      "combine_start", "combine_wait", "unpermute", "merge"]


def test_explain_and_graph_code_golden(golden, tmp_path):
    compiled = moedit.compile(dit_moe("tiny"), _ep(2))
    golden("explain_tiny_ep2.txt", compiled.explain() + "\n")
    golden("tiny_ep2_rank1.code.txt", compiled.graph(1).code)
    compiled.dump(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["explain.txt", "pass_log.json", "plan.json",
                                                          "rank0.py", "rank1.py"]
    dice = moedit.compile(dit_moe("tiny", depth=4), "examples/plans/dice.yaml")
    golden("explain_tiny_dice.txt", dice.explain() + "\n")
    golden("tiny_dice_rank0_async.code.txt", dice.graph(0, "async").code)


def test_explain_reports_placement_and_bytes():
    text = moedit.compile(dit_moe("tiny"), _ep(4)).explain(batch_size=8)
    assert "rank 3: experts [3, 7]" in text
    # 2 x 8 samples x 16 tokens x top-2 slots x 32 x 4 bytes, two all-to-alls, 3/4 of it off-rank.
    expected = 2 * 8 * 16 * 2 * 32 * 4 * 2 * 3 / 4 / 2**20
    assert f"{expected:.2f} MiB" in text


def _drop_wait(gm, ctx):
    for node in gm.graph.nodes:
        if node.target is wait:
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            break
    return PassResult(gm, True, [])


def test_verifier_names_the_pass_that_broke_async_pairing():
    compiled = moedit.compile(dit_moe("tiny"), _ep(2))
    ctx = PassContext(plan=compiled.plan, world_size=2, rank=0, layers=compiled.layers)
    with pytest.raises(PassError, match="after pass '_drop_wait'.*must have exactly one user, a wait"):
        run_passes(copy_module(compiled.graph(0)), ctx, [_drop_wait])


def test_verifier_rejects_unannotated_communication():
    gm = copy_module(moedit.compile(dit_moe("tiny"), _ep(2)).graph(0))
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), AllToAllStart):
            del node.meta["moedit"]
            break
    ctx = PassContext(plan=moedit.Plan(), world_size=2, rank=0, layers=layers_of(trace(dit_moe("tiny"))))
    with pytest.raises(PassError, match="has no moedit layer meta"):
        run_passes(gm, ctx, [lambda gm, ctx: PassResult(gm, False, [])])


def test_compile_accepts_a_plan_path_and_defaults_to_one_rank():
    assert moedit.compile(dit_moe("tiny"), "examples/plans/sync_ep.yaml").world_size == 2
    assert moedit.compile(dit_moe("tiny")).world_size == 1
    assert compile_model is moedit.compile


def test_graph_rank_out_of_range():
    with pytest.raises(ValueError, match=r"rank must be in 0..1, got 2"):
        moedit.compile(dit_moe("tiny"), _ep(2)).graph(2)


def test_auto_selective_sync_keeps_the_most_sensitive_layers_synchronous():
    model = tiny_model(depth=4)
    with torch.no_grad():  # make layer 2's routed experts dominate its block
        for expert in model.blocks[2].moe.experts:
            expert.down_proj.weight.mul_(20)
    plan = moedit.Plan(expert_parallel={"degree": 2}, staleness={"mode": "interweaved"},
                       selective_sync={"strategy": "auto", "fraction": 0.25})
    compiled = moedit.compile(model, plan)
    assert compiled.plan.selective_sync.strategy == [2]
    assert max(range(4), key=lambda i: compiled.sensitivity[i]) == 2
    assert "sensitivity per layer" in compiled.explain()
    with torch.device("meta"):
        meta_model = dit_moe("tiny")
    with pytest.raises(moedit.PlanError, match="needs the model's real weights"):
        moedit.compile(meta_model, plan)
