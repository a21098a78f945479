"""Step kinds: which program each diffusion step runs, as one value that the passes, the
executor and explain() read."""

import warnings

import pytest

import moedit
from moedit.models import dit_moe
from moedit.steps import StepKind, StepPlan


def _table(total=8, **plan):
    return [kind.name for kind in StepPlan.of(moedit.Plan(**plan)).table(total)]


def test_sync_plan_runs_one_kind():
    assert _table(4) == ["sync"] * 4
    assert StepPlan.of(moedit.Plan()).kinds == (StepKind(True, False),)


def test_warmup_cooldown_and_strided_steps_are_synchronous():
    plan = {"staleness": {"mode": "displaced", "warmup_steps": 2, "cooldown_steps": 1, "sync_every": 4}}
    assert _table(7, **plan) == ["sync", "sync", "async", "async", "sync", "async", "sync"]


def test_warmup_steps_between_refreshes_are_synchronous_and_drop():
    plan = {"staleness": {"mode": "displaced", "warmup_steps": 2}, "conditional_comm": {"interval": 2}}
    assert _table(6, **plan) == ["sync", "sync_drop", "async", "async_drop", "async", "async_drop"]
    assert [k.name for k in StepPlan.of(moedit.Plan(**plan)).kinds] == ["sync", "async", "sync_drop", "async_drop"]


def test_cooldown_needs_the_number_of_steps():
    steps = StepPlan.of(moedit.Plan(staleness={"mode": "interweaved", "cooldown_steps": 2}))
    with pytest.raises(ValueError, match=r"cooldown_steps = 2.*Runtime.reset\(steps=N\)"):
        steps.kind_at(3)
    assert steps.kind_at(3, total=5) == StepKind(synchronous=True)


def test_step_kind_names_round_trip():
    for kind in StepPlan.of(moedit.Plan(staleness={"mode": "displaced"}, conditional_comm={"interval": 3})).kinds:
        assert StepKind.named(kind.name) == kind
    with pytest.raises(ValueError, match="step kind must be one of"):
        StepKind.named("stale")


def test_explain_prints_the_step_table_the_executor_reads():
    compiled = moedit.compile(dit_moe("tiny", depth=4), "examples/plans/dice.yaml")
    text = compiled.explain(steps=10)
    assert compiled.steps.table(10)[1].name == "async_drop"
    assert "  sync         1 step(s): 0\n" in text
    assert "  async_drop   5 step(s): 1, 3, ..., 9\n" in text
    assert "  async        4 step(s): 2, 4, ..., 8\n" in text


def test_programs_are_built_per_step_kind():
    compiled = moedit.compile(dit_moe("tiny"), moedit.Plan(expert_parallel={"degree": 2},
                                                           staleness={"mode": "displaced"},
                                                           conditional_comm={"interval": 2}))
    assert set(compiled.programs(1)) == set(compiled.kinds)
    logged = {(entry["program"], entry["pass"]): entry["changed"] for entry in compiled.pass_log}
    assert logged["sync_drop", "displace"] and logged["sync_drop", "conditional_comm"]
    assert not logged["sync", "interweave"], "a pass that did nothing must say so"
    sync_drop = compiled.graph(0, "sync_drop").code
    assert "cache_read" not in sync_drop, "a synchronous step must not read the staleness caches"
    assert "channel = 'stale'" not in sync_drop


def test_a_sample_whose_steps_are_all_synchronous_says_its_staleness_never_starts():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stale mode on one rank gains nothing
        runtime = moedit.compile(dit_moe("tiny"), moedit.Plan(staleness={"mode": "interweaved", "warmup_steps": 3}))
        runtime = runtime.to_runtime()
    with pytest.warns(UserWarning, match="all 3 steps of this sample run synchronously"):
        runtime.reset(steps=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runtime.reset(steps=4)
    runtime.close()
