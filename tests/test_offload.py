"""Expert offloading is exact, keeps to its budget, and fetches before the attention it overlaps."""

import pytest
import torch

import moedit
from _models import tiny_model, tiny_scmoe
from moedit.graph import Kind, kind_of
from moedit.plan import PlanError

DEPTH = 3


def _batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(5, 4, 8, 8, generator=gen), torch.rand(5, generator=gen), torch.tensor([0, 3, 9, 3, 10])


def _offloaded(model, world, resident, **plan):
    compiled = moedit.compile(model, moedit.Plan(offload={"enabled": True, "resident_experts": resident},
                                                 expert_parallel={"degree": world}, **plan))
    with compiled.to_runtime() as runtime:
        outputs = [runtime.denoise(*_batch(seed)) for seed in (1, 2)]
        store = runtime.state.experts
        stats = {"peak": store.peak_resident, "copies": store.copies, "hits": store.hits, "budget": store.budget}
    return outputs, stats


def _worker(rank, world):
    local = 8 // world  # experts per layer on this rank
    return {
        # ScMoE under the shortcut schedule; a budget of one layer's experts: every layer evicts
        "scmoe, tight": _offloaded(tiny_scmoe(depth=DEPTH), world, local, shortcut={"enabled": True}),
        # the standard model, everything fits: the second call copies nothing
        "standard, roomy": _offloaded(tiny_model(depth=DEPTH), world, DEPTH * local),
    }


@pytest.mark.parametrize("world", [1, 2])
def test_offloading_is_exact_and_keeps_to_its_budget(spawn, world):
    references = {name: [model(*_batch(seed)) for seed in (1, 2)] for name, model in
                  (("scmoe, tight", tiny_scmoe(depth=DEPTH)), ("standard, roomy", tiny_model(depth=DEPTH)))}
    for rank, results in enumerate(spawn(world, _worker, timeout_s=120)):
        for name, (outputs, stats) in results.items():
            for out, ref in zip(outputs, references[name]):
                torch.testing.assert_close(out, ref, rtol=0, atol=1e-5, msg=lambda m: f"{name}, rank {rank}: {m}")
            assert stats["peak"] <= stats["budget"], (name, stats)
        tight, roomy = results["scmoe, tight"][1], results["standard, roomy"][1]
        assert tight["copies"] > DEPTH * 8 // world  # evicted and copied again
        assert roomy["copies"] <= DEPTH * 8 // world and roomy["hits"] > 0  # the second call found them resident


def test_fetch_is_issued_before_the_attention_it_overlaps():
    plan = moedit.Plan(shortcut={"enabled": True}, offload={"enabled": True, "resident_experts": 8},
                       expert_parallel={"degree": 2})
    nodes = [n.name for n in moedit.compile(tiny_scmoe(depth=DEPTH), plan).graph(0).graph.nodes]
    for layer in range(DEPTH):
        fetch, experts = nodes.index(f"l{layer}_fetch"), nodes.index(f"l{layer}_experts")
        assert fetch < nodes.index(f"blocks_{layer}_attn")
        # backbone work (an attention or a shared expert) runs while the copies are made
        assert any(name.endswith(("_attn", "_shared_experts_down_proj")) for name in nodes[fetch:experts])


def test_offloaded_experts_leave_the_program_module_tree():
    plan = moedit.Plan(offload={"enabled": True, "resident_experts": 8})
    program = moedit.compile(tiny_model(depth=DEPTH), plan).graph(0)
    assert not [key for key in program.state_dict() if ".experts." in key]
    assert any(kind_of(n) is Kind.FETCH for n in program.graph.nodes)


def test_budget_below_what_the_program_holds_at_once_is_refused():
    with pytest.raises(PlanError, match="resident_experts to at least 8"):
        moedit.compile(tiny_model(depth=DEPTH), moedit.Plan(offload={"enabled": True, "resident_experts": 4}))
    with pytest.raises(PlanError, match="exactly one"):
        moedit.Plan(offload={"enabled": True})


def _stale_worker(rank, world, plans):
    images = {}
    for name, plan in plans.items():
        compiled = moedit.compile(tiny_model(depth=4), moedit.Plan(expert_parallel={"degree": world}, **plan))
        with compiled.to_runtime() as runtime:
            images[name] = runtime.sample([0, 3, 9, 3], steps=4, cfg_scale=1.0, seed=0)
    return images


def test_offloading_changes_nothing_under_interweaving(spawn):
    """Under interweaving, layer j's slot runs layer j-1's experts: the fetch must copy those."""
    stale = {"staleness": {"mode": "interweaved", "warmup_steps": 1}}
    dice = {**stale, "selective_sync": {"strategy": "deep"}, "conditional_comm": {"interval": 2}}
    offloaded = {"offload": {"enabled": True, "resident_experts": 16}}
    plans = {"interweaved": stale, "interweaved+offload": {**stale, **offloaded},
             "dice": dice, "dice+offload": {**dice, **offloaded}, "sync": {}}
    images = spawn(2, _stale_worker, plans)[0]
    assert (images["interweaved"] - images["sync"]).abs().max() > 1e-3  # stale steps ran: the check means something
    for name in ("interweaved", "dice"):
        assert (images[f"{name}+offload"] - images[name]).abs().max() <= 1e-6, name


def test_every_fetch_feeds_the_experts_of_the_layer_it_fetched():
    plan = moedit.Plan(expert_parallel={"degree": 2}, staleness={"mode": "interweaved"},
                       offload={"enabled": True, "resident_experts": 16})
    program = moedit.compile(tiny_model(depth=4), plan).graph(0, "async")
    fetches = [n for n in program.graph.nodes if kind_of(n) is Kind.FETCH]
    assert fetches
    for fetch in fetches:
        (experts,) = fetch.users
        assert program.get_submodule(experts.target).offload_layer == fetch.kwargs["layer"]


def test_release_drops_every_copy_the_store_holds():
    from moedit.plan import Offload
    from moedit.runtime.offload import ExpertStore

    experts = tiny_model().blocks[0].moe.experts
    store = ExpertStore({(0, e): experts[e] for e in range(4)}, torch.device("cpu"),
                        Offload(enabled=True, resident_experts=2))
    weights = [p.clone() for p in experts.parameters()]
    store.fetch(0, [1, 2]).release()
    assert len(store.resident) == 2 and len(store.host) == 4
    store.release()
    assert not store.resident and not store.host and not store.in_use and not store.events
    assert all(torch.equal(p, w) for p, w in zip(experts.parameters(), weights))  # the model's own stay
    with pytest.raises(RuntimeError, match="after release"):
        store.fetch(0, [1])


def test_the_verifier_rejects_a_fetch_of_another_layers_experts():
    from moedit.graph import copy_module
    from moedit.verify import verify_graph

    plan = moedit.Plan(expert_parallel={"degree": 2}, staleness={"mode": "interweaved"},
                       offload={"enabled": True, "resident_experts": 16})
    program = copy_module(moedit.compile(tiny_model(depth=4), plan).graph(0, "async"))
    verify_graph(program)
    fetch = next(n for n in program.graph.nodes if kind_of(n) is Kind.FETCH and n.kwargs["layer"] != n.meta[
        "moedit"].layer)  # an interweaved slot's fetch: it runs the previous layer's experts
    fetch.kwargs = {**fetch.kwargs, "layer": fetch.meta["moedit"].layer}  # as the pass once keyed it: by the slot
    with pytest.raises(RuntimeError, match=r"copies layer \d+'s experts but feeds"):
        verify_graph(program)


def test_close_lets_go_of_what_the_run_holds():
    """Cached exchanges and the store's device copies go at close(), not at garbage collection."""
    plan = moedit.Plan(staleness={"mode": "displaced"}, offload={"enabled": True, "resident_experts": 24})
    runtime = moedit.compile(tiny_model(depth=DEPTH), plan).to_runtime()
    runtime.sample([0, 3], steps=3, cfg_scale=1.0)
    store = runtime.state.experts
    assert runtime.state.cache.entries and store.resident  # what close() must let go of
    runtime.close()
    assert not runtime.state.cache.entries and not store.resident and store.released
