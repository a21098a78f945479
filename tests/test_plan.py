import json
import warnings

import pytest

import moedit
from moedit.models import dit_moe


def test_defaults_are_one_rank_synchronous():
    plan = moedit.Plan()
    assert plan.world_size == 1 and plan.staleness.mode == "sync"


def test_keyword_and_file_construction_agree(tmp_path):
    yaml_file = tmp_path / "p.yaml"
    yaml_file.write_text("expert_parallel:\n  degree: 4\nruntime:\n  timeout_s: 30\n")
    json_file = tmp_path / "p.json"
    json_file.write_text(json.dumps({"expert_parallel": {"degree": 4}, "runtime": {"timeout_s": 30}}))
    expected = moedit.Plan(expert_parallel={"degree": 4}, runtime={"timeout_s": 30})
    assert moedit.Plan.from_file(yaml_file) == expected == moedit.Plan.from_file(json_file)


def test_shipped_plans_load():
    assert moedit.Plan.from_file("examples/plans/sync_ep.yaml").world_size == 2


@pytest.mark.parametrize("data, field", [
    ({"expert_paralel": {"degree": 2}}, "expert_paralel: unknown key; accepted keys here: expert_parallel, stale"),
    ({"expert_parallel": {"degree": 2, "layout": "x"}}, "expert_parallel.layout: unknown key; accepted keys here: deg"),
    ({"expert_parallel": {"degree": 0}}, "expert_parallel.degree"),
    ({"runtime": {"backend": "mpi"}}, "runtime.backend"),
    ({"staleness": {"mode": "dice"}}, "staleness.mode: 'dice' is a whole plan, not a staleness mode: start from "
                                      "examples/plans/dice.yaml"),
])
def test_invalid_fields_are_named(data, field):
    with pytest.raises(moedit.PlanError, match=field.replace(".", r"\.")):
        moedit.Plan(**data)


@pytest.mark.parametrize("data, message", [
    ({"staleness": {"mode": "displaced", "warmup_steps": 0}}, "warmup_steps: a stale mode needs at least 1"),
    ({"selective_sync": {"strategy": "deep"}}, "selective_sync: has no effect when staleness.mode is 'sync'"),
    ({"conditional_comm": {"interval": 1}}, "conditional_comm.interval"),
])
def test_invalid_combinations_say_what_to_change(data, message):
    with pytest.raises(moedit.PlanError, match=message):
        moedit.Plan(**data)


def test_conditional_comm_slots_must_leave_one_slot():
    plan = moedit.Plan(conditional_comm={"interval": 2, "slots": 2})
    with pytest.raises(moedit.PlanError, match=r"conditional_comm.slots \(2\) must be below the top-k"):
        moedit.compile(dit_moe("tiny"), plan)


def test_bad_files_say_what_is_wrong(tmp_path):
    with pytest.raises(moedit.PlanError, match="cannot read plan file"):
        moedit.Plan.from_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(moedit.PlanError, match="must hold a mapping"):
        moedit.Plan.from_file(tmp_path / "list.yaml")
    (tmp_path / "typo.yaml").write_text("expert_parallel:\n  degre: 2\n")
    with pytest.raises(moedit.PlanError, match=r"typo.yaml: invalid plan: expert_parallel.degre: unknown key"):
        moedit.Plan.from_file(tmp_path / "typo.yaml")


def test_expert_count_must_divide_by_the_degree():
    with pytest.raises(moedit.PlanError, match=r"expert_parallel.degree: experts \(8.*divisible.*\(3\)"):
        moedit.compile(dit_moe("tiny"), moedit.Plan(expert_parallel={"degree": 3}))


def test_selective_sync_layers_out_of_range_are_a_plan_error():
    plan = moedit.Plan(expert_parallel={"degree": 2}, staleness={"mode": "interweaved"},
                       selective_sync={"strategy": [0, 5]})
    with pytest.raises(moedit.PlanError, match=r"lists layers \[5\], but the model has MoE layers 0..1; list indices"):
        moedit.compile(dit_moe("tiny"), plan)


def test_error_messages_point_only_to_files_in_the_repository(tmp_path):
    (tmp_path / "typo.yaml").write_text("staleness:\n  mod: displaced\n")
    with pytest.raises(moedit.PlanError) as err:
        moedit.Plan.from_file(tmp_path / "typo.yaml")
    assert ".md" not in str(err.value) and "accepted keys here: mode, warmup_steps" in str(err.value)


def test_a_stale_plan_with_experts_on_one_rank_warns_that_it_hides_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dice = moedit.Plan.from_file("examples/plans/dice.yaml").to_dict()  # experts over 2 ranks: no warning
    with pytest.warns(UserWarning, match=r"staleness.mode 'interweaved' with expert_parallel.degree 1: .*no "
                                         r"exchange to hide.*set staleness.mode: sync"):
        moedit.Plan(**{**dice, "expert_parallel": {"degree": 1}})  # as `moedit inspect --world-size 1` builds it
