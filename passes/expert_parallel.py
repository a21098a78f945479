"""Synchronous expert parallelism: exact, 0 steps stale.

Experts are sharded over the expert-parallel group, expert e on rank e % P (DICE's
layout). Each MoE leaf becomes, in numbered steps:

    1. route      the gate picks K experts per token (through the layer's adapter)
    2. permute    copies of each token sorted by destination rank and local expert
    3. counts     all-to-all of per-expert counts, to size the buffers (waited at once)
    4. dispatch   all-to-all with variable splits, started
    5. shared     the shared expert, while the dispatch is in flight; then wait
    6. experts    this rank's experts on what arrived
    7. combine    all-to-all back, started, then waited on
    8. unpermute  outputs back in token order, weighted by the router and summed,
                  and merged with the shared expert's output by the adapter

Every node is tagged with its `Kind`, so later passes find a layer's values (weights,
rows, order, counts) and steps by kind (`LayerNodes`). The per-rank module holds only
this rank's experts: the layer is replaced by a shallow copy whose other experts are
`RemovedExpert` placeholders, so its state dict keeps the original key names, restricted
to local experts.
"""

from __future__ import annotations

import torch.fx as fx
from torch import nn

from moedit.graph import META, Emitter, Inserted, Kind
from moedit.pipeline import MoELayer, PassContext, PassResult, strip_modules
from moedit.runtime import ops
from moedit.runtime.expert_ops import LocalExperts, Merge, RemovedExpert, Router, permute, splits, unpermute
from moedit.tracer import moe_nodes

AXIS = "ep"


def expert_owner(expert: int, world_size: int) -> int:
    return expert % world_size


def local_experts(num_experts: int, world_size: int, rank: int) -> list[int]:
    return list(range(rank, num_experts, world_size))


def _localize(gm: fx.GraphModule, layer: MoELayer, ctx: PassContext) -> nn.Module:
    """Swap the layer in `gm` for a copy holding only this rank's experts; return the copy."""
    moe = gm.get_submodule(layer.path)
    experts = layer.adapter.experts(moe)
    replace = {id(e): RemovedExpert(i, expert_owner(i, ctx.world_size))
               for i, e in enumerate(experts) if expert_owner(i, ctx.world_size) != ctx.rank}
    local = strip_modules(moe, replace)
    parent_path, _, name = layer.path.rpartition(".")
    setattr(gm.get_submodule(parent_path), name, local)
    return local


def _submodule_path(root: nn.Module, root_path: str, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return f"{root_path}.{name}" if name else root_path
    raise ValueError(f"the shared expert of {root_path} is not one of its submodules; "
                     "an adapter's shared_expert must return a submodule of the MoE layer")


def _rewrite(gm: fx.GraphModule, node: fx.Node, layer: MoELayer, ctx: PassContext) -> list[Inserted]:
    P, L = ctx.world_size, layer.num_experts // ctx.world_size
    moe = _localize(gm, layer, ctx)
    ids = local_experts(layer.num_experts, P, ctx.rank)
    experts = layer.adapter.experts(moe)
    moe.add_module("ep_router", Router(layer.adapter, moe))
    moe.add_module("ep_experts", LocalExperts([experts[i] for i in ids], ids))
    moe.add_module("ep_merge", Merge(layer.adapter, moe))
    path = f"{layer.path}.".__add__
    where = {"layer": layer.index, "axis": AXIS}
    emit = Emitter(gm, layer.index)
    with gm.graph.inserting_before(node):
        tokens = emit.method(Kind.TOKENS, "flatten", node.args[0], 0, -2)
        expert_ids, weights = emit.unpack(emit.module(Kind.ROUTE, path("ep_router"), tokens),
                                          Kind.EXPERT_IDS, Kind.WEIGHTS)
        perm = emit.call(Kind.PERMUTE, permute, tokens, expert_ids, P, L)
        rows, order, send_counts = emit.unpack(perm, Kind.ROWS, Kind.ORDER, Kind.SEND_COUNTS)
        counts = emit.call(Kind.COUNTS_START, ops.counts_start, send_counts, **where)
        recv_counts = emit.call(Kind.COUNTS_WAIT, ops.wait, counts)
        send_splits = emit.call(Kind.SEND_SPLITS, splits, send_counts)
        recv_splits = emit.call(Kind.RECV_SPLITS, splits, recv_counts)
        pending = emit.call(Kind.DISPATCH_START, ops.exchange_start, rows, send_splits, recv_splits,
                            name="dispatch", **where, bytes_per_token=layer.row_bytes)
        shared = None  # the shared expert runs while the dispatch is in flight
        shared_module = layer.adapter.shared_expert(moe)
        if shared_module is not None:
            shared = emit.module(Kind.SHARED, _submodule_path(moe, layer.path, shared_module), tokens)
        received = emit.call(Kind.DISPATCH_WAIT, ops.wait, pending)
        outputs = emit.module(Kind.EXPERTS, path("ep_experts"), received, recv_counts)
        pending = emit.call(Kind.COMBINE_START, ops.exchange_start, outputs, recv_splits, send_splits,
                            name="combine", **where, bytes_per_token=layer.row_bytes)
        returned = emit.call(Kind.COMBINE_WAIT, ops.wait, pending)
        routed = emit.call(Kind.UNPERMUTE, unpermute, returned, order, weights)
        merged = emit.module(Kind.MERGE, path("ep_merge"), *([routed] if shared is None else [routed, shared]))
        out = emit.method(Kind.OUTPUT, "reshape_as", merged, node.args[0])
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return emit.inserted


def expert_parallel(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite every MoE leaf into routed all-to-all expert parallelism over ctx.world_size ranks."""
    by_index = {layer.index: layer for layer in ctx.layers}
    inserted: list[Inserted] = []
    for node in moe_nodes(gm):
        inserted += _rewrite(gm, node, by_index[node.meta[META]["layer"]], ctx)
    return PassResult(gm, bool(inserted), inserted)
