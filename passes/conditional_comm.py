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

import operator

import torch
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
        emit.chunks = len(nodes.all(Kind.UNPERMUTE))
        for unpermute in nodes.all(Kind.UNPERMUTE):  # this layer's own consumption: slot cache in and out
            chunk = meta(unpermute).get("chunk")
            key = f"layer{layer.index}_slots" + ("" if chunk is None else f"_chunk{chunk}")
            with gm.graph.inserting_before(unpermute):
                emit.chunk = chunk
                new = emit.call(Kind.SLOT_CACHE, ops.slot_outputs, *unpermute.args, key=key,
                                staleness=meta(unpermute)["staleness"])
            unpermute.replace_all_uses_with(new)
            gm.graph.erase_node(unpermute)
        emit.chunk = None
        if ctx.step.drop:
            _drop_slots(gm, ctx, layer, nodes, emit)
        inserted += emit.inserted
    return PassResult(gm, bool(inserted), inserted)


def _drop_slots(gm: fx.GraphModule, ctx: PassContext, layer, nodes: LayerNodes, emit: Emitter) -> None:
    """Decide the kept slots right after routing; each permute (one per chunk) takes its share."""
    plan = ctx.plan.conditional_comm
    gm.get_submodule(layer.path).add_module(
        "ep_drop", DropSlots(plan.drop, plan.slots, plan.threshold, layer=layer.index, kernels=ctx.kernels))
    permutes = nodes.all(Kind.PERMUTE)
    with gm.graph.inserting_before(nodes[Kind.WEIGHTS].next):
        keep = emit.module(Kind.DROP_SLOTS, f"{layer.path}.ep_drop", nodes[Kind.EXPERT_IDS], nodes[Kind.WEIGHTS],
                           stateful=True)
        if len(permutes) > 1:
            pieces = emit.call(Kind.GLUE, torch.tensor_split, keep, len(permutes))
    for permute in permutes:
        chunk = meta(permute).get("chunk")
        if chunk is None:
            permute.update_kwarg("keep", keep)
        else:
            with gm.graph.inserting_before(permute):
                permute.update_kwarg("keep", emit.call(Kind.GLUE, operator.getitem, pieces, chunk))
