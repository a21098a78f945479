"""Stale plans consume exactly the step they claim.

Every step feeds a different input. Per layer and step, the worker records the layer's
tokens, the router's choice and weights, and the routed output the layer merged; the
test recomputes that output with the single-device experts on the tokens and expert
choices of the step the plan claims (t for synchronous layers and steps, t-1 for
interweaved, t-2 for displaced, the last synchronous step where that is later),
scaled by step t's router weights.
"""

import pytest
import torch

import moedit
from _models import tiny_model

DEPTH, STEPS = 4, 7


def _inputs(step):
    gen = torch.Generator().manual_seed(100 + step)
    return (torch.randn(4, 4, 8, 8, generator=gen), torch.rand(4, generator=gen),
            torch.randint(0, 10, (4,), generator=gen))


def _record_worker(rank, world, plan_kwargs):
    plan = moedit.Plan(expert_parallel={"degree": world}, **plan_kwargs)
    runtime = moedit.compile(tiny_model(depth=DEPTH), plan).to_runtime()
    records, step = {}, [0]
    for gm in runtime.programs.values():
        for layer in range(DEPTH):
            moe = gm.get_submodule(f"blocks.{layer}.moe")

            def on_route(_m, inputs, outputs, layer=layer):
                records[layer, step[0]] = {"tokens": inputs[0], "ids": outputs[0], "weights": outputs[1]}

            def on_merge(_m, inputs, _out, layer=layer):
                records[layer, step[0]]["routed"] = inputs[0]

            moe.ep_router.register_forward_hook(on_route)
            moe.ep_merge.register_forward_hook(on_merge)
    runtime.total_steps = STEPS  # as sample() does, so cool-down steps are known
    for step[0] in range(STEPS):
        runtime.denoise(*_inputs(step[0]))
    return records, runtime.program_log


def _expected(experts, source, weights):
    """sum_k weights[:, k] * expert_{ids[:, k]}(tokens), ids and tokens from `source`."""
    out = torch.zeros_like(source["tokens"])
    for slot in range(weights.shape[1]):
        for e in source["ids"][:, slot].unique().tolist():
            rows = source["ids"][:, slot] == e
            out[rows] += weights[rows, slot, None] * experts[e](source["tokens"][rows])
    return out


def _source_step(mode, t, log, synchronous_layer):
    if synchronous_layer or log[t] == "sync":
        return t
    last_sync = max(s for s in range(t) if log[s] == "sync")
    return max(t - (2 if mode == "displaced" else 1), last_sync)


def _check(spawn, world, mode, plan_kwargs, sync_layers=()):
    model = tiny_model(depth=DEPTH)
    plan = {**plan_kwargs, "staleness": {"mode": mode, **plan_kwargs.get("staleness", {})}}
    results = spawn(world, _record_worker, plan)
    checked = set()
    for records, log in results:
        assert log.count("async") >= 3, log
        for (layer, t), rec in records.items():
            experts = model.blocks[layer].moe.experts
            s = _source_step(mode, t, log, layer in sync_layers)
            with torch.no_grad():
                expected = _expected(experts, records[layer, s], rec["weights"])
            torch.testing.assert_close(rec["routed"], expected, rtol=0, atol=1e-5,
                                       msg=lambda m: f"layer {layer}, step {t} ({log[t]}), source step {s}: {m}")
            checked.add(t - s)
    return checked, log


@pytest.mark.parametrize("world", [2, 4])
def test_displaced_output_is_two_steps_stale(spawn, world):
    assert _check(spawn, world, "displaced", {})[0] == {0, 1, 2}


@pytest.mark.parametrize("world", [2, 4])
def test_interweaved_output_is_one_step_stale(spawn, world):
    assert _check(spawn, world, "interweaved", {})[0] == {0, 1}


def test_warmup_cooldown_and_strided_sync_steps_are_exact(spawn):
    plan = {"staleness": {"warmup_steps": 2, "cooldown_steps": 1, "sync_every": 4}}
    checked, log = _check(spawn, 2, "displaced", plan)
    assert checked == {0, 1, 2}
    assert log == ["sync", "sync", "async", "async", "sync", "async", "sync"]


@pytest.mark.parametrize("strategy, sync_layers", [("deep", {2, 3}), ("staggered", {1, 3}), ([0], {0})])
def test_selectively_synchronous_layers_are_exact(spawn, strategy, sync_layers):
    _check(spawn, 2, "interweaved", {"selective_sync": {"strategy": strategy}}, sync_layers)
