"""DICE's conditional communication: on steps between refreshes, leave the lowest-scored
slot(s) of each token out of the dispatch and reuse that slot's expert output cached at
the last step that sent every slot.

Each layer's unpermute becomes a `SlotCache` node: when a consumed exchange carries all
K slots it caches them (per token and slot, unweighted), otherwise it fills the missing
slots from that cache; either way the current step's router weights scale them. The
"_drop" programs (run on non-refresh steps) also insert a `DropSlots` node between the
router and the permute. Works on synchronous and stale layers, for any top-k >= 2;
a stale layer's missing slots come from the last full exchange it consumed.
"""

from __future__ import annotations

import torch.fx as fx

from moedit.pipeline import PassContext, PassResult
from moedit.runtime.cache import SlotCache
from moedit.runtime.expert_ops import DropSlots
from moedit.tracer import META

from .expert_parallel import Emitter


def conditional_comm(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    plan = ctx.plan.conditional_comm
    if plan.interval is None:
        return PassResult(gm, False, [])
    dropping = ctx.program.endswith("_drop")
    inserted = []
    for layer in ctx.layers:
        moe = gm.get_submodule(layer.path)
        emit = Emitter(gm.graph, layer.index)
        nodes = [n for n in gm.graph.nodes if n.meta.get(META, {}).get("layer") == layer.index]
        for node in nodes:
            kind = node.meta[META]["kind"]
            if kind == "unpermute":  # this layer's own consumption: slot cache in, slot cache out
                moe.add_module("ep_slot_cache", SlotCache(f"layer{layer.index}_slots"))
                with gm.graph.inserting_before(node):
                    new = emit("slot_cache", "call_module", f"{layer.path}.ep_slot_cache", node.args,
                               staleness=node.meta[META]["staleness"])
                node.replace_all_uses_with(new)
                gm.graph.erase_node(node)
            elif kind == "permute" and dropping:
                route = node.args[1].args[0]  # permute(tokens, getitem(route, 0), P, L)
                weights = next(u for u in route.users if u.args[1] == 1)
                moe.add_module("ep_drop", DropSlots(plan.drop, plan.slots, plan.threshold, seed=layer.index))
                with gm.graph.inserting_before(node):
                    keep = emit("drop_slots", "call_module", f"{layer.path}.ep_drop", (node.args[1], weights))
                node.args = (*node.args[:4], keep)
        inserted += emit.inserted
    return PassResult(gm, True, inserted)
