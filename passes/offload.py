"""Expert offloading (plan `offload`): exact, 0 steps stale.

Each layer's local experts leave the program's module tree (so moving the program to the
device leaves them in host memory; `OffloadedExpert` stands in) and a fetch node goes right
after the node that yields the counts of rows each local expert receives: it starts
copying those experts to the device, and the experts node runs on the copies (see
moedit/runtime/offload.py for the store, its LRU budget and the CUDA copy stream).

Under the shortcut schedule the counts are known before the block's attention, so the
copies overlap attention and the shared expert, as in ScMoE; in a standard block they
overlap the dispatch. Runs last, on the final node order: the pass refuses a budget
smaller than the experts the program keeps fetched at once (more than one layer's when a
schedule puts a layer's fetch before the previous layer's experts).
"""

from __future__ import annotations

import math

import torch.fx as fx

from moedit.graph import Emitter, Kind, kind_of, meta
from moedit.pipeline import PassContext, PassResult, strip_modules
from moedit.plan import PlanError
from moedit.runtime import ops
from moedit.runtime.expert_ops import OffloadedExpert, splits
from moedit.runtime.offload import budget_in_experts, expert_bytes


def offload(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    settings = ctx.plan.offload
    if not settings.enabled:
        return PassResult(gm, False, [])
    inserted, local_count = [], {}
    for layer in ctx.layers:
        local = gm.get_submodule(f"{layer.path}.ep_experts")
        _unregister(gm, layer.path, local)
        local.offload_layer = layer.index
        local_count[layer.index] = len(local.expert_ids)
    for experts in [node for node in gm.graph.nodes if kind_of(node) is Kind.EXPERTS]:
        # The store's key is the layer whose experts the node calls, read off the module it calls:
        # under interweaving, layer j's slot runs layer j-1's experts (its `owner`).
        local = gm.get_submodule(experts.target)
        emit = Emitter(gm, meta(experts)["layer"])
        counts = experts.args[1]
        with gm.graph.inserting_after(_host_copy(counts, experts)):
            fetch = emit.call(Kind.FETCH, ops.expert_fetch, counts, layer=local.offload_layer,
                              expert_ids=list(local.expert_ids))
        meta(fetch).owner = local.offload_layer
        experts.args = (*experts.args[:2], fetch)
        inserted += emit.inserted
    _check_budget(gm, ctx, local_count)
    return PassResult(gm, True, inserted)


def _host_copy(counts: fx.Node, experts: fx.Node) -> fx.Node:
    """Where the fetch goes: after the send splits between `counts` and `experts`, if any, which
    bring these counts to the host together with the send counts (one sync; see `splits`)."""
    node = counts.next
    while node is not experts:
        if node.target is splits and counts in node.args:
            return node
        node = node.next
    return counts


def _unregister(gm: fx.GraphModule, path: str, local) -> None:
    """Swap the layer's local experts for placeholders in this program's module tree."""
    moe = gm.get_submodule(path)
    replace = {id(expert): OffloadedExpert(e) for expert, e in zip(local._experts, local.expert_ids)}
    parent, _, name = path.rpartition(".")
    setattr(gm.get_submodule(parent), name, strip_modules(moe, replace))


def _check_budget(gm: fx.GraphModule, ctx: PassContext, local_count: dict[int, int]) -> None:
    fetched, most, when = {}, 0, None
    for node in gm.graph.nodes:
        kind = kind_of(node)
        if kind is Kind.FETCH:
            fetched[node.kwargs["layer"]] = local_count[node.kwargs["layer"]]
        elif kind is Kind.EXPERTS:
            fetched.pop(gm.get_submodule(node.target).offload_layer, None)
        if sum(fetched.values()) > most:
            most, when = sum(fetched.values()), sorted(fetched)
    size = max(expert_bytes(e) for layer in ctx.layers for e in gm.get_submodule(f"{layer.path}.ep_experts")._experts)
    budget = budget_in_experts(ctx.plan.offload, size)
    if budget < most:
        raise PlanError(f"offload: the budget holds {budget} experts, but this rank's program keeps up to {most} "
                        f"fetched at once (the local experts of layer(s) {when}, fetched and not yet run); set "
                        f"offload.resident_experts to at least {most} (or budget_mb to at least "
                        f"{math.ceil(most * size / 2**20 * 1e4) / 1e4:g})")
