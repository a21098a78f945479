"""DICE's conditional communication: on steps between refreshes, leave the lowest-scored
slot(s) of each token out of the dispatch and reuse that slot's expert output cached at
the last step that sent every slot.

Each layer's unpermute becomes a `slot_outputs` op: when a consumed exchange carries all
K slots it caches them (per token and slot, unweighted), otherwise it fills the missing
slots from that cache; either way the current step's router weights scale them. On
steps of a `drop` kind (`StepKind.drop`) a `DropSlots` node also goes between the router
and the permute. Works on synchronous and stale layers, for any top-k >= 2; a stale
layer's missing slots come from the last full exchange it consumed.
"""

from __future__ import annotations

import torch.fx as fx

from moedit.graph import Emitter, Kind, LayerNodes, meta
from moedit.pipeline import PassContext, PassResult
from moedit.runtime import ops
from moedit.runtime.expert_ops import DropSlots


def conditional_comm(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    plan = ctx.plan.conditional_comm
    if plan.interval is None:
        return PassResult(gm, False, [])
    inserted = []
    for layer in ctx.layers:
        nodes = LayerNodes(gm, layer.index)
        emit = Emitter(gm, layer.index)
        unpermute = nodes[Kind.UNPERMUTE]  # this layer's own consumption: slot cache in, slot cache out
        with gm.graph.inserting_before(unpermute):
            new = emit.call(Kind.SLOT_CACHE, ops.slot_outputs, *unpermute.args, key=f"layer{layer.index}_slots",
                            staleness=meta(unpermute)["staleness"])
        unpermute.replace_all_uses_with(new)
        gm.graph.erase_node(unpermute)
        if ctx.step.drop:
            target = f"{layer.path}.ep_drop"
            gm.get_submodule(layer.path).add_module(
                "ep_drop", DropSlots(plan.drop, plan.slots, plan.threshold, layer=layer.index))
            with gm.graph.inserting_before(nodes[Kind.PERMUTE]):
                keep = emit.module(Kind.DROP_SLOTS, target, nodes[Kind.EXPERT_IDS], nodes[Kind.WEIGHTS],
                                   stateful=True)
            nodes[Kind.PERMUTE].update_kwarg("keep", keep)
        inserted += emit.inserted
    return PassResult(gm, bool(inserted), inserted)
