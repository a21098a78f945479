"""Stale plans consume exactly the step they claim.

Every step feeds a different input. Per layer and step, the worker records the layer's
tokens, the router's choice and weights, the slots conditional communication kept,
and the routed output the layer merged; the test recomputes that output with the
single-device experts on the tokens and expert choices of the step the plan claims
(t for synchronous layers and steps, t-1 for interweaved, t-2 for displaced, the last
synchronous step where that is later), scaled by step t's router weights. A slot that
was not sent takes its value from the last step whose exchange carried every slot.
"""

import pytest
import torch

import moedit
from _models import tiny_model

DEPTH, STEPS = 4, 7


def _inputs(step):
    gen = torch.Generator().manual_seed(100 + step)
    # timesteps fall step by step, as a sampler's do (the runtime refuses a step that turns back)
    return (torch.randn(4, 4, 8, 8, generator=gen), 0.95 - 0.1 * step + 0.05 * torch.rand(4, generator=gen),
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

            def on_drop(_m, _inputs, keep, layer=layer):
                records[layer, step[0]]["keep"] = keep

            moe.ep_router.register_forward_hook(on_route)
            moe.ep_merge.register_forward_hook(on_merge)
            if hasattr(moe, "ep_drop"):
                moe.ep_drop.register_forward_hook(on_drop)
    runtime.reset(steps=STEPS)  # as sample() does, so cool-down steps are known
    for step[0] in range(STEPS):
        runtime.denoise(*_inputs(step[0]))
    runtime.close()
    return records, [kind.name for kind in runtime.step_log]


def _slot_outputs(experts, record):
    """[T,K,H]: expert_{ids[:, k]}(tokens) for every slot of a recorded step (memoised in it)."""
    if "slots" in record:
        return record["slots"]
    ids, tokens = record["ids"], record["tokens"]
    out = torch.zeros(*ids.shape, tokens.shape[-1])
    for slot in range(ids.shape[1]):
        for e in ids[:, slot].unique().tolist():
            rows = ids[:, slot] == e
            out[rows, slot] = experts[e](tokens[rows])
    record["slots"] = out
    return out


def _expected(experts, source, weights, cached=None):
    """sum_k weights[:, k] * slot k's output: from `source`, or from `cached` where
    `source` did not send slot k."""
    slots = _slot_outputs(experts, source)
    if "keep" in source:
        slots = torch.where(source["keep"].unsqueeze(-1), slots, _slot_outputs(experts, cached))
    return (slots * weights.unsqueeze(-1)).sum(1)


def _source_step(mode, t, log, synchronous_layer):
    if synchronous_layer or log[t].startswith("sync"):
        return t
    last_sync = max(s for s in range(t) if log[s].startswith("sync"))
    return max(t - (2 if mode == "displaced" else 1), last_sync)


def _check(spawn, world, mode, plan_kwargs, sync_layers=()):
    model = tiny_model(depth=DEPTH)
    plan = {**plan_kwargs, "staleness": {"mode": mode, **plan_kwargs.get("staleness", {})}}
    results = spawn(world, _record_worker, plan)
    steps = moedit.compile(model, moedit.Plan(expert_parallel={"degree": world}, **plan)).steps
    checked = set()
    for records, log in results:
        assert log == [kind.name for kind in steps.table(STEPS)], "the executor must run the compiled step table"
        assert sum(p != "sync" for p in log) >= 3, log
        for layer in range(DEPTH):
            experts, full = model.blocks[layer].moe.experts, None  # full: source of the last all-slot exchange
            for t in range(STEPS):
                rec = records[layer, t]
                s = _source_step(mode, t, log, layer in sync_layers)
                with torch.no_grad():
                    expected = _expected(experts, records[layer, s], rec["weights"],
                                         None if full is None else records[layer, full])
                torch.testing.assert_close(rec["routed"], expected, rtol=0, atol=1e-5,
                                           msg=lambda m: f"layer {layer}, step {t} ({log[t]}), source {s}: {m}")
                checked.add(t - s)
                full = s if "keep" not in records[layer, s] else full
    return checked, log


@pytest.mark.parametrize("world", [2, 4])
def test_displaced_output_is_two_steps_stale(spawn, world):
    assert _check(spawn, world, "displaced", {})[0] == {0, 1, 2}


@pytest.mark.parametrize("world", [2, 4])
def test_interweaved_output_is_one_step_stale(spawn, world):
    assert _check(spawn, world, "interweaved", {})[0] == {0, 1}


def test_interweaved_on_ulysses_tokens_is_one_step_stale(spawn):
    """Under sequence parallelism every rank routes its piece of each image's tokens; staleness is unchanged."""
    assert _check(spawn, 2, "interweaved", {"sequence_parallel": {"ulysses": 2}})[0] == {0, 1}


def test_warmup_cooldown_and_strided_sync_steps_are_exact(spawn):
    plan = {"staleness": {"warmup_steps": 2, "cooldown_steps": 1, "sync_every": 4}}
    checked, log = _check(spawn, 2, "displaced", plan)
    assert checked == {0, 1, 2}
    assert log == ["sync", "sync", "async", "async", "sync", "async", "sync"]


@pytest.mark.parametrize("strategy, sync_layers", [("deep", {2, 3}), ("staggered", {1, 3}), ([0], {0})])
def test_selectively_synchronous_layers_are_exact(spawn, strategy, sync_layers):
    _check(spawn, 2, "interweaved", {"selective_sync": {"strategy": strategy}}, sync_layers)


@pytest.mark.parametrize("drop", ["low", "high", "random"])
def test_dropped_slots_reuse_the_output_cached_at_the_last_refresh(spawn, drop):
    plan = {"conditional_comm": {"interval": 2, "drop": drop}}
    checked, log = _check(spawn, 2, "sync", plan)
    assert log == ["sync", "sync_drop", "sync", "sync_drop", "sync", "sync_drop", "sync"]


def test_warmup_steps_that_drop_slots_are_synchronous(spawn):
    # Regression: the "sync_drop" program of a stale plan used to be built stale.
    plan = {"staleness": {"warmup_steps": 3}, "conditional_comm": {"interval": 2}}
    checked, log = _check(spawn, 2, "displaced", plan)
    assert log[:4] == ["sync", "sync_drop", "sync", "async_drop"]


@pytest.mark.parametrize("mode", ["displaced", "interweaved"])
def test_conditional_comm_on_stale_layers(spawn, mode):
    plan = {"conditional_comm": {"interval": 3}, "selective_sync": {"strategy": "deep"}}
    checked, log = _check(spawn, 2, mode, plan, sync_layers={2, 3})
    assert "async_drop" in log


def _cache_limit_worker(rank, world):
    plan = moedit.Plan(expert_parallel={"degree": world}, staleness={"mode": "displaced", "cache_limit_mb": 0.01})
    runtime = moedit.compile(tiny_model(depth=DEPTH), plan).to_runtime()
    runtime.reset(steps=1)
    try:
        runtime.denoise(*_inputs(0))
    except MemoryError as err:
        return str(err)
    return None


def test_cache_limit_is_enforced_on_every_rank_with_a_clear_error(spawn):
    messages = spawn(2, _cache_limit_worker)
    assert messages[0] is not None and messages[0] == messages[1], "the ranks must agree on the verdict"
    assert "more than the plan's limit of 0.01 MiB (staleness.cache_limit_mb)" in messages[0]
    assert "rank 0: " in messages[0] and "rank 1: " in messages[0]


def _sample_worker(rank, world, plans, seeds):
    images = []
    for plan, seed in zip(plans, seeds):
        compiled = moedit.compile(tiny_model(depth=DEPTH), moedit.Plan(expert_parallel={"degree": world}, **plan))
        with compiled.to_runtime() as runtime:
            images.append(runtime.sample([1, 2, 3, 4, 5], steps=STEPS, cfg_scale=1.5, seed=seed))
    return images


def test_a_plan_whose_every_step_is_warm_up_gives_the_images_of_sync(spawn):
    cc = {"interval": 2, "drop": "low"}
    plans = [{"staleness": {"mode": mode, "warmup_steps": STEPS}, "conditional_comm": cc}
             for mode in ("displaced", "interweaved")] + [{"conditional_comm": cc}]
    for displaced, interweaved, sync in spawn(2, _sample_worker, plans, [0, 0, 0]):
        torch.testing.assert_close(displaced, sync, rtol=0, atol=0)
        torch.testing.assert_close(interweaved, sync, rtol=0, atol=0)


def _random_drop_worker(rank, world):
    plan = moedit.Plan(expert_parallel={"degree": world}, staleness={"mode": "interweaved"},
                       conditional_comm={"interval": 2, "drop": "random"})
    with moedit.compile(tiny_model(depth=DEPTH), plan).to_runtime() as runtime:
        samples = [runtime.sample([1, 2, 3, 4, 5], steps=STEPS, cfg_scale=1.5, seed=0) for _ in range(2)]
        dropped = []  # step 1 drops slots, step 2 consumes them; the same inputs under two run seeds
        for seed in (0, 0, 1):
            runtime.reset(steps=3, seed=seed)
            dropped.append([runtime.denoise(*_inputs(step)) for step in range(3)][2])
    return samples, dropped


def test_random_slot_dropping_is_reproducible(spawn):
    for (first, again), (drop_a, drop_again, drop_other) in spawn(2, _random_drop_worker):
        torch.testing.assert_close(again, first, rtol=0, atol=0)
        torch.testing.assert_close(drop_again, drop_a, rtol=0, atol=0)
        assert not torch.equal(drop_other, drop_a), "the run's seed must choose the dropped slots"


def _second_sample_worker(rank, world):
    plan = moedit.Plan(expert_parallel={"degree": world}, staleness={"mode": "interweaved", "warmup_steps": 1})
    refused = []

    def attempt(name, step):
        try:
            runtime.denoise(*_inputs(step))
        except ValueError as err:
            refused.append((name, str(err)))

    with moedit.compile(tiny_model(depth=DEPTH), plan).to_runtime() as runtime:
        attempt("before any reset", 0)
        runtime.reset(steps=2)
        first = [runtime.denoise(*_inputs(step)) for step in range(2)]
        attempt("after the sample's last step", 0)
        runtime.reset(steps=4)
        for step in range(2):  # a sample stopped early ...
            runtime.denoise(*_inputs(step))
        attempt("a new sample begun without reset", 0)  # ... then one begun anew: its timestep turns back
        runtime.reset(steps=2)  # the next sample, opened as it must be: its steps equal the first sample's
        again = [runtime.denoise(*_inputs(step)) for step in range(2)]
    return refused, first, again, [kind.name for kind in runtime.step_log]


def test_a_second_sample_without_reset_is_refused_naming_reset(spawn):
    """A stale plan's step 0 must not read the caches the last sample left ([Note: samples])."""
    refused, first, again, kinds = spawn(2, _second_sample_worker)[0]
    assert [name for name, _ in refused] == ["before any reset", "after the sample's last step",
                                             "a new sample begun without reset"]
    assert all("runner.reset(steps=N" in message for _, message in refused)
    assert "does not continue the sample" in refused[2][1]
    assert kinds == ["sync", "async"]
    for a, b in zip(first, again):
        assert (a - b).abs().max() == 0
