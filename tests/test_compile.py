"""Tracing, the expert-parallel pass and the verifier, with no process group."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import moedit
from _models import tiny_model
from moedit.compiled import compile as compile_model
from moedit.models import dit_moe
from moedit.passes.selective_sync import calibration_inputs
from moedit.runtime.sampling import SAMPLERS, initial_noise
from moedit.graph import copy_module
from moedit.pipeline import PassContext, PassError, PassResult, layers_of, run_passes
from moedit.runtime import ops
from moedit.steps import StepKind
from moedit.tracer import trace


def _ep(world):
    return moedit.Plan(expert_parallel={"degree": world})


def test_tiny_traces_with_moe_and_attention_as_leaves():
    gm = trace(dit_moe("tiny"))
    kinds = [(n.meta["moedit"].kind, n.meta["moedit"].layer) for n in gm.graph.nodes if "moedit" in n.meta]
    assert kinds == [("run", None), ("attention", None), ("moe", 0), ("attention", None), ("moe", 1)]
    assert list(gm.graph.nodes)[3].name == "run", "the run input comes right after the model's own inputs"


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
    layer0 = [row["kind"] for entry in compiled.pass_log for row in entry["inserted"] if row["layer"] == 0]
    assert layer0 == ["route", "permute", "counts_start", "counts_wait", "dispatch_start", "shared", "dispatch_wait",
                      "experts", "combine_start", "combine_wait", "unpermute", "merge"]
    assert [n.name for n in gm.graph.nodes if n.meta.get("moedit", {}).get("layer") == 0][:4] == [
        "l0_tokens", "l0_route", "l0_expert_ids", "l0_weights"], "nodes are named after their kind and layer"


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
        if node.target is ops.wait:
            node.replace_all_uses_with(node.args[1])
            gm.graph.erase_node(node)
            break
    return PassResult(gm, True, [])


def test_verifier_names_the_pass_that_broke_async_pairing():
    compiled = moedit.compile(dit_moe("tiny"), _ep(2))
    ctx = PassContext(plan=compiled.plan, world_size=2, rank=0, layers=compiled.layers, step=StepKind(synchronous=True))
    with pytest.raises(PassError, match="after pass '_drop_wait'.*must have exactly one user, a wait"):
        run_passes(copy_module(compiled.graph(0)), ctx, [_drop_wait])


def test_verifier_rejects_unannotated_communication():
    gm = copy_module(moedit.compile(dit_moe("tiny"), _ep(2)).graph(0))
    for node in gm.graph.nodes:
        if node.target is ops.exchange_start:
            node.meta["moedit"].layer = None
            break
    ctx = PassContext(plan=moedit.Plan(), world_size=2, rank=0, layers=layers_of(trace(dit_moe("tiny"))),
                      step=StepKind(synchronous=True))
    with pytest.raises(PassError, match="exchanges layer 0's tokens, but its moedit meta says it serves layer None"):
        run_passes(gm, ctx, [lambda gm, ctx: PassResult(gm, False, [])])


def test_compile_accepts_a_plan_path_and_defaults_to_one_rank():
    assert moedit.compile(dit_moe("tiny"), "examples/plans/sync_ep.yaml").world_size == 2
    assert moedit.compile(dit_moe("tiny")).world_size == 1
    assert compile_model is moedit.compile


@pytest.mark.parametrize("plan", [{}, {"chunks": 2}, {"wire_dtype": "bfloat16"}])
def test_a_one_rank_expert_group_emits_no_exchange(plan):
    """Exchanges over a 1-rank group go nowhere: the program routes, runs every expert and
    unpermutes with no collective (tests/test_runtime.py and the composition matrix hold such
    programs to the single-device model, tests/test_wire.py to the rounded one)."""
    compiled = moedit.compile(tiny_model(), moedit.Plan(expert_parallel={"degree": 1, **plan}))
    code = compiled.graph(0, "sync").code
    assert "exchange_start" not in code and "counts_start" not in code and "_wait" not in code, code
    assert ("round_trip" in code) == ("wire_dtype" in plan)
    assert compiled.rank_program(0).communicators == set()


def test_explain_says_which_groups_cross_the_node_boundary_and_what_crosses_it():
    """Nodes of 2 ranks: experts over all 4 ranks send 2 of every 3 off-rank rows across the
    boundary; experts inside a node with data-parallel replicas across send none across."""
    model = dit_moe("tiny")

    def rows(plan):
        text = moedit.compile(model, moedit.Plan(**plan, runtime={"ranks_per_node": 2})).explain(batch_size=8)
        lines = text.splitlines()
        start = lines.index(next(line for line in lines if line.startswith("nodes: 2 of 2 ranks")))
        return {line.split()[0]: line for line in lines[start + 1:] if line.startswith("  ") and line.split()}

    across = rows({"expert_parallel": {"degree": 4}})["ep"]
    assert "[[0, 1, 2, 3]]" in across and "crosses nodes" in across
    outside, inside = (float(across.split(word)[1].split()[0]) for word in ("across nodes", "inside"))
    assert outside == pytest.approx(2 * inside, abs=0.011)
    replicas = rows({"expert_parallel": {"degree": 2}, "data_parallel": 2})
    assert "[[0, 1], [2, 3]]" in replicas["ep"] and "inside nodes" in replicas["ep"]
    assert "across nodes 0.00 MiB" in replicas["ep"] and "the output batch, once a sample" in replicas["data"]
    one_node = moedit.compile(model, moedit.Plan(expert_parallel={"degree": 4})).explain()
    assert "nodes:" not in one_node  # no node size given, no torchrun: one node


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


def _auto(**selective_sync):
    return moedit.Plan(expert_parallel={"degree": 2}, staleness={"mode": "interweaved"},
                       selective_sync={"strategy": "auto", **selective_sync})


def test_auto_selective_sync_draws_its_calibration_noise_on_the_models_device():
    with torch.device("meta"):
        meta_model = dit_moe("tiny")
    noise, labels = calibration_inputs(meta_model, _auto(calibration_seed=3))
    assert noise.device.type == "meta" and labels.device.type == "meta"
    noise, _ = calibration_inputs(tiny_model(), _auto(calibration_seed=3))
    assert torch.equal(noise, initial_noise(4, 4, 8, seed=3))  # one CPU draw, whatever the rank or device


def test_auto_selective_sync_calibrates_with_the_plans_sampler_and_says_so(monkeypatch, caplog):
    guidance = []
    ddim = SAMPLERS["ddim"]
    monkeypatch.setitem(SAMPLERS, "ddim", lambda *args, **kwargs: guidance.append(kwargs["cfg_scale"]) or
                        ddim(*args, **kwargs))
    plan = _auto(calibration_sampler="ddim", calibration_cfg_scale=4.0, calibration_steps=2, calibration_images=2)
    with caplog.at_level("INFO", logger="moedit.passes.selective_sync"):
        chosen = moedit.compile(tiny_model(depth=4), plan).plan.selective_sync.strategy
    assert guidance and set(guidance) == {4.0}
    assert "2 steps of the 'ddim' sampler at cfg scale 4, seed 0, on cpu" in caplog.text
    assert moedit.compile(tiny_model(depth=4), plan).plan.selective_sync.strategy == chosen  # same seed, same layers


def _swap_first_exchanges_on_rank_1(gm, ctx):
    """A faulty reordering pass: rank 1 issues layer 0's combine where the others issue its dispatch."""
    if ctx.rank != 1:
        return PassResult(gm, False, [])
    first, second = [n for n in gm.graph.nodes if n.target is ops.exchange_start][:2]
    first.update_kwarg("name", "combine")
    second.update_kwarg("name", "dispatch")
    return PassResult(gm, True, [])


def test_collective_order_that_differs_between_ranks_fails_at_compile_time():
    model = dit_moe("tiny")
    traced = trace(model)
    compiled = moedit.CompiledModel(model, _ep(4), traced, layers_of(traced),
                                    pipeline=moedit.compiled.PIPELINE + [_swap_first_exchanges_on_rank_1])
    compiled.programs(0)
    with pytest.raises(RuntimeError, match=r"(?s)ranks 0 and 1 issue exchanges on mesh axis 'ep'.*sync program"
                                           r".*1  layer 0 dispatch\s+layer 0 combine\s+<-- ERROR HERE"):
        compiled.programs(1)
    with pytest.raises(RuntimeError, match="in a different order"):
        compiled.check_collective_order()


def test_collective_order_agrees_across_ranks_for_every_shipped_plan():
    for plan in ("sync_ep", "displaced", "interweaved", "dice"):
        data = moedit.Plan.from_file(f"examples/plans/{plan}.yaml").to_dict()
        data["expert_parallel"]["degree"] = 4
        moedit.compile(dit_moe("tiny", depth=4), moedit.Plan(**data)).check_collective_order()


def test_the_core_does_not_import_the_reference_model():
    code = "import sys, moedit; print(sorted(m for m in sys.modules if m.startswith('moedit.models')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"import moedit loaded {out}"


def test_node_meta_has_only_its_fields():
    """Passes coordinate through typed node meta: a tag no pass reads is an error, not a silent no-op."""
    from moedit.graph import meta

    node = next(n for n in trace(dit_moe("tiny")).graph.nodes if n.op == "call_module" and "moedit" in n.meta
                and meta(n).kind == "moe")
    assert meta(node)["layer"] == 0 and meta(node).serves == 0 and "chunk" not in meta(node)
    with pytest.raises(KeyError, match="no field 'ownr'"):
        meta(node)["ownr"] = 1


def test_the_verifier_rejects_a_synchronous_program_that_reads_across_steps():
    from moedit.graph import copy_module, meta
    from moedit.steps import StepKind
    from moedit.verify import verify_programs

    compiled = moedit.compile(dit_moe("tiny"), moedit.Plan(expert_parallel={"degree": 2},
                                                           staleness={"mode": "displaced"}))
    programs = {kind: copy_module(compiled.graph(0, kind)) for kind in compiled.kinds}
    verify_programs(programs)
    sync, stale = programs[StepKind(True)], programs[StepKind(False)]
    read = next(n for n in stale.graph.nodes if n.target is ops.cache_read)
    meta(read).staleness = 0
    with pytest.raises(RuntimeError, match="declares staleness 0"):
        verify_programs(programs)
    meta(read).staleness = 2
    meta(next(n for n in sync.graph.nodes if n.target is ops.exchange_start)).staleness = 1
    with pytest.raises(RuntimeError, match="program sync must be exact"):
        verify_programs(programs)


def test_the_verifier_holds_stale_reads_to_the_staleness_the_plan_claims():
    from moedit.verify import verify_staleness

    compiled = moedit.compile(dit_moe("tiny"), moedit.Plan(expert_parallel={"degree": 2},
                                                           staleness={"mode": "displaced"}))
    programs = compiled.programs(0)
    assert compiled.claimed_staleness == {0: 2, 1: 2}
    verify_staleness(programs, compiled.claimed_staleness)
    with pytest.raises(RuntimeError, match="declared 2 step.s. stale; the plan claims 1"):
        verify_staleness(programs, {0: 1, 1: 1})  # displaced programs held to interweaved's claim
