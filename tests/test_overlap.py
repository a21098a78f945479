"""Overlap without changing results: chunked layers, the scheduler, the timeline."""

import json
import time

import pytest
import torch

import moedit
from _models import tiny_model
from moedit.graph import Kind, kind_of
from moedit.models import dit_moe
from moedit.passes.expert_parallel import resolve_chunks
from moedit.passes.schedule import measured_costs, peak_bytes, program_dag
from moedit.runtime import ops
from moedit.runtime.sampling import initial_noise, rectified_flow_sample
from moedit.runtime.regions import region
from moedit.runtime.timeline import Span, chrome_trace, draw

LABELS, STEPS, CFG = [1, 2, 3, 4, 5], 3, 1.5
PLANS = {  # name -> plan sections (expert_parallel.degree is added per world size)
    "sync_ep": {},
    "chunked": {"expert_parallel": {"chunks": 3}},
    "displaced": {"staleness": {"mode": "displaced"}},
    "interweaved": {"staleness": {"mode": "interweaved"}},
    "dice_chunked": {"expert_parallel": {"chunks": 2}, "staleness": {"mode": "interweaved"},
                     "selective_sync": {"strategy": "deep"}, "conditional_comm": {"interval": 2}},
}


def _plan(world, sections, **extra):
    data = {**sections, **extra}
    data["expert_parallel"] = {**sections.get("expert_parallel", {}), "degree": world}
    return moedit.Plan(**data)


def _sample_worker(rank, world, plans):
    images = []
    for plan in plans:
        with moedit.compile(tiny_model(depth=4), plan).to_runtime() as runtime:
            images.append(runtime.sample(LABELS, STEPS, CFG, seed=7))
    return images


@pytest.mark.parametrize("world", [1, 2, 4])
def test_chunked_layers_equal_the_single_device_model(spawn, world):
    model = tiny_model(depth=4)
    with torch.no_grad():
        expected = rectified_flow_sample(model, initial_noise(5, 4, 8, seed=7), torch.tensor(LABELS), steps=STEPS,
                                         cfg_scale=CFG, null_class=10)
    # 3 chunks of uneven size; 40 chunks leave some chunks without a token
    plans = [_plan(world, {"expert_parallel": {"chunks": n}}) for n in (3, 40)]
    for images in spawn(world, _sample_worker, plans):
        for chunked in images:
            torch.testing.assert_close(chunked, expected, rtol=0, atol=1e-5)


def test_chunked_dice_equals_unchunked_dice(spawn):
    dice = PLANS["dice_chunked"]
    unchunked = {**dice, "expert_parallel": {}}
    chunked, whole = spawn(2, _sample_worker, [_plan(2, dice), _plan(2, unchunked)])[0]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", sorted(PLANS))
def test_scheduling_never_changes_results(spawn, name):
    plans = [_plan(2, PLANS[name]), _plan(2, PLANS[name], schedule={"policy": "overlap"})]
    for program_order, scheduled in spawn(2, _sample_worker, plans):
        assert torch.equal(program_order, scheduled), "scheduling must be bit-identical"


@pytest.mark.parametrize("name", sorted(PLANS))
def test_schedules_are_valid_orders_that_keep_the_collective_order(name):
    plain = moedit.compile(dit_moe("tiny", depth=4), _plan(4, PLANS[name]))
    compiled = moedit.compile(dit_moe("tiny", depth=4), _plan(4, PLANS[name], schedule={"policy": "overlap"}))
    compiled.check_collective_order()  # every rank's scheduled programs issue exchanges in one order
    for kind in compiled.kinds:
        scheduled = compiled.graph(0, kind)
        order = {node: i for i, node in enumerate(scheduled.graph.nodes)}
        assert all(order[a] < order[b] for a, b in program_dag(scheduled).edges), "not a topological order"
        starts = [n for n in plain.graph(0, kind).graph.nodes if n.target in (ops.exchange_start, ops.counts_start)]
        moved = [n for n in scheduled.graph.nodes if n.target in (ops.exchange_start, ops.counts_start)]
        per_channel = lambda nodes: [(c, name) for c, _, name in
                                     sorted((n.kwargs.get("channel", "main"), i, n.name) for i, n in enumerate(nodes))]
        assert per_channel(starts) == per_channel(moved), "each communicator's exchanges in their program order"


def _shared_first(gm, ctx):
    """Put layer 0's shared expert before its counts exchange starts (a worse order)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    nodes["l0_counts_start"].prepend(nodes["l0_shared"])
    return moedit.pipeline.PassResult(gm, True, [])


def test_a_start_that_can_move_earlier_does():
    from moedit.passes.schedule import schedule

    model = dit_moe("tiny")
    traced = moedit.tracer.trace(model)
    moedit.tracer.record_sizes(traced, model)  # what compile does for the memory budget
    for policy, counts_first in (("program", False), ("overlap", True)):
        plan = _plan(2, {}, schedule={"policy": policy})
        compiled = moedit.CompiledModel(model, plan, traced, moedit.pipeline.layers_of(traced),
                                        pipeline=moedit.compiled.PIPELINE[:-1] + [_shared_first, schedule])
        names = [n.name for n in compiled.graph(0).graph.nodes]
        assert (names.index("l0_counts_start") < names.index("l0_shared")) == counts_first


def test_a_wait_fills_with_work_that_does_not_need_it():
    compiled = moedit.compile(dit_moe("tiny", depth=3), _plan(2, {}, schedule={"policy": "overlap"}))
    names = [n.name for n in compiled.graph(0).graph.nodes]
    # the next block's modulation (it reads only the conditioning) moves into layer 0's exchange
    assert names.index("blocks_1_ada_ln_modulation_1") < names.index("l0_dispatch_wait")


@pytest.mark.parametrize("slack, hoisted", [(0.0, False), (1.0, True)])
def test_the_memory_budget_bounds_what_moves(slack, hoisted):
    model = dit_moe("tiny", depth=3)
    traced = moedit.tracer.trace(model)
    assert moedit.tracer.record_sizes(traced, model), "sizes come from the model's example_inputs"
    plan = _plan(2, {}, schedule={"policy": "overlap", "memory_slack": slack})
    layers = moedit.pipeline.layers_of(traced)
    plain = moedit.CompiledModel(model, plan, traced, layers, pipeline=moedit.compiled.PIPELINE[:-1]).graph(0)
    scheduled = moedit.CompiledModel(model, plan, traced, layers).graph(0)
    assert 0 < peak_bytes(plain) and peak_bytes(scheduled) <= (1 + slack) * peak_bytes(plain)
    names = [n.name for n in scheduled.graph.nodes]
    assert (names.index("blocks_2_ada_ln_modulation_1") < names.index("l0_dispatch_wait")) == hoisted


def _trace_file(tmp_path, spans):
    path = tmp_path / "timeline.json"
    chrome_trace(spans, path)
    return str(path)


def test_memory_slack_without_recorded_sizes_is_refused_not_ignored(monkeypatch):
    """Without an example_inputs method compile records no sizes, and a memory budget over
    sizes that are all 0 would bound nothing."""
    monkeypatch.delattr(type(dit_moe("tiny")), "example_inputs")
    with pytest.raises(moedit.PlanError, match="schedule.memory_slack .0.25. bounds .* none were recorded"):
        moedit.compile(dit_moe("tiny", depth=3), _plan(2, {}, schedule={"policy": "overlap"}))
    unbounded = moedit.compile(dit_moe("tiny", depth=3), _plan(2, {}, schedule={"policy": "overlap",
                                                                             "memory_slack": None}))
    names = [n.name for n in unbounded.graph(0).graph.nodes]
    assert names.index("blocks_2_ada_ln_modulation_1") < names.index("l0_dispatch_wait")  # free to move


def test_regions_the_profile_did_not_measure_are_named_once(tmp_path, caplog):
    """A profile of another model (here: without block 1) costs the regions it lacks 0 s; the
    scheduler says which, once, and with the profile's path."""
    plain = moedit.compile(dit_moe("tiny", depth=2), _plan(2, {})).graph(0)
    labels = list(dict.fromkeys(label for label in map(region, plain.graph.nodes) if label is not None))
    missing = [label for label in labels if label.startswith(("L1 ", "blocks.1"))]
    spans = [Span("compute", label, 1.0, 1.001, step) for step in (0, 1) for label in labels if label not in missing]
    spans += [Span("ep", f"L0 {name}", 1.0, 1.002, 1) for name in ("counts", "dispatch", "combine")]
    path = _trace_file(tmp_path, [spans])
    with caplog.at_level("WARNING", logger="moedit.passes.schedule"):
        compiled = moedit.compile(dit_moe("tiny", depth=2), _plan(2, {}, schedule={"policy": "overlap",
                                                                                   "profile": path}))
        compiled.graph(1)  # rank 1's program misses the same regions: no second warning
    warnings = [r.getMessage() for r in caplog.records if "has no time for" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert path in warnings[0]
    named = warnings[0].split("costs 0 s: ")[1].split("; ")[0].split(", ")
    assert named == missing  # layer 1's exchanges are costed by name from layer 0's


def test_measured_costs_and_auto_chunks_come_from_a_timeline(tmp_path):
    def step(t0, s):  # one layer: dispatch 4 ms, experts 6 ms, combine 4 ms, counts 0.25 ms
        return [Span("compute", "L0 experts", t0, t0 + 0.006, s), Span("ep", "L0 dispatch", t0, t0 + 0.004, s),
                Span("ep", "L0 combine", t0, t0 + 0.004, s), Span("ep", "L0 counts", t0, t0 + 0.00025, s)]
    path = _trace_file(tmp_path, [step(1.0, 0) + step(2.0, 1) + step(3.0, 2)])
    costs = measured_costs(path)
    assert costs["compute"]["L0 experts"] == pytest.approx(0.006)
    assert costs["exchange_by_name"]["dispatch"] == pytest.approx(0.004)
    plan, basis = resolve_chunks(moedit.Plan(expert_parallel={"degree": 2, "chunks": "auto"},
                                             schedule={"profile": path}))
    # N=1: 14 ms; N=2: max(8.5, 10); N=3: max(9, 8.67); N=4: max(9.5, 8): 3 chunks
    assert plan.expert_parallel.chunks == 3 == basis["chunks"]
    with pytest.raises(moedit.PlanError, match="auto' chooses from measured costs; set schedule.profile"):
        resolve_chunks(moedit.Plan(expert_parallel={"chunks": "auto"}))


def _profile_worker(rank, world):
    plan = _plan(world, PLANS["displaced"])
    with moedit.compile(tiny_model(depth=4), plan).to_runtime(profile=True) as runtime:
        runtime.sample(LABELS, STEPS, CFG, seed=7)
        return runtime.timeline()


def test_a_profiled_run_records_every_region_and_exchange(spawn, tmp_path):
    per_rank = spawn(2, _profile_worker)[0]
    assert len(per_rank) == 2
    for spans in per_rank:
        names = {(s.lane, s.name) for s in spans if s.step == 1}
        for layer in range(4):
            assert ("compute", f"L{layer} experts") in names and ("ep stale", f"L{layer} dispatch") in names
            assert ("ep counts", f"L{layer} counts") in names and ("compute", f"blocks.{layer}.attn") in names
        assert all(s.end >= s.start for s in spans)
    chrome_trace(per_rank, tmp_path / "t.json")
    trace = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert {e["pid"] for e in trace} == {0, 1}
    draw(per_rank, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_profiling_is_off_unless_asked():
    compiled = moedit.compile(dit_moe("tiny"), _plan(1, {}))
    assert not any(kind_of(n) is Kind.GLUE and "mark" in n.name for n in compiled.graph(0).graph.nodes)


class _ClockEvent:
    """Stands in for torch.cuda.Event on a CPU: records the host clock (the timeline's CUDA-mode
    bookkeeping, not CUDA, is what is tested here)."""

    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return (other.t - self.t) * 1e3


class _Work:
    def __init__(self):
        self.done = False

    def is_completed(self):
        return self.done


def test_the_nccl_timeline_puts_event_stamped_spans_on_the_host_clock(monkeypatch):
    from moedit.runtime.comm import Exchange
    from moedit.runtime.timeline import Timeline

    monkeypatch.setattr(torch.cuda, "Event", _ClockEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    timeline = Timeline(0, "cuda:0")
    dispatch, stale = _Work(), _Work()
    timeline.mark("L0 route", 0)
    timeline.issued(Exchange("dispatch", 0, "ep"), dispatch, 0)
    timeline.issued(Exchange("combine", 1, "ep", "stale"), stale, 0)
    timeline.mark("L0 shared", 0)
    dispatch.done = True
    timeline.mark("L0 wait dispatch", 0)  # the host sees the dispatch complete here
    seen = time.perf_counter()
    time.sleep(0.01)
    wait_end = _ClockEvent()
    wait_end.record()
    timeline.waited(dispatch, wait_end)
    timeline.end_step()
    spans = timeline.snapshot()
    compute = [s for s in spans if s.lane == "compute"]
    assert [s.name for s in compute] == ["L0 route", "L0 shared", "L0 wait dispatch"]
    assert all(a.end == b.start for a, b in zip(compute, compute[1:]))  # contiguous
    landed = next(s for s in spans if s.name == "L0 dispatch")
    assert landed.end <= seen  # landed by the time the host saw it done, before the wait ended
    assert next(s for s in spans if s.lane == "ep stale").name == "L1 combine (in flight)"
    # Step 1: the stale combine lands; the host sees it at a mark, and the step's end retires it
    # from the in-flight list (its wait, if any, comes later and finds nothing to end).
    timeline.mark("L1 route", 1)
    stale.done = True
    timeline.mark("L1 experts", 1)
    seen = time.perf_counter()
    timeline.end_step()
    assert timeline._flying == [] and timeline._seen == {}, "nothing is in flight any more"
    spans = timeline.snapshot()
    assert [s.name for s in spans if s.lane == "ep stale"] == ["L1 combine"]  # drawn in flight once, not kept
    assert next(s for s in spans if s.lane == "ep stale").end <= seen
    assert timeline.snapshot() == spans  # a second snapshot adds nothing
    # An exchange that never lands (a failed step) is dropped when the runtime forgets it.
    timeline.issued(Exchange("dispatch", 0, "ep"), _Work(), 2)
    timeline.forget_in_flight()
    assert timeline._flying == [] and timeline.snapshot() == spans
