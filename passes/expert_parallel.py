"""Synchronous expert parallelism: exact, 0 steps stale.

Experts are sharded over the expert-parallel group, expert e on rank e % P (DICE's
layout). Each MoE leaf becomes, in numbered steps:

    1. route      the gate picks K experts per token (through the layer's adapter)
    2. permute    copies of each token sorted by destination rank and local expert
    3. counts     blocking all-to-all of per-expert counts, to size the buffers
    4. dispatch   all-to-all with variable splits, started
    5. shared     the shared expert, while the dispatch is in flight; then wait
    6. experts    this rank's experts on what arrived
    7. combine    all-to-all back, started, then waited on
    8. unpermute  outputs back in token order, weighted by the router and summed,
                  and merged with the shared expert's output by the adapter

The per-rank module holds only this rank's experts: the layer is replaced by a shallow
copy whose other experts are `RemovedExpert` placeholders, so its state dict keeps the
original key names, restricted to local experts.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch import nn

from moedit.pipeline import Inserted, MoELayer, PassContext, PassResult, strip_modules
from moedit.runtime.comm import AllToAllStart, ExchangeCounts, wait
from moedit.runtime.expert_ops import LocalExperts, Router, permute, splits, unpermute
from moedit.tracer import META, moe_nodes


class RemovedExpert(nn.Module):
    """Stands in for an expert that lives on another rank."""

    def __init__(self, expert: int, rank: int):
        super().__init__()
        self.expert, self.rank = expert, rank

    def extra_repr(self) -> str:
        return f"expert={self.expert}, on rank {self.rank}"

    def forward(self, *args):
        raise RuntimeError(f"expert {self.expert} lives on rank {self.rank}; it cannot run here")


class Merge(nn.Module):
    """Graph node for the adapter's merge of routed and shared outputs."""

    def __init__(self, layer: MoELayer, moe: nn.Module):
        super().__init__()
        self.adapter = layer.adapter
        object.__setattr__(self, "_moe", moe)  # a view; see [Note: layer views] in runtime/expert_ops.py

    def forward(self, routed, shared=None):
        return self.adapter.combine(self._moe, routed, shared)


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
    parts = {"ep_router": Router(layer.adapter, moe), "ep_counts": ExchangeCounts("ep"),
             "ep_dispatch": AllToAllStart("ep"), "ep_experts": LocalExperts([experts[i] for i in ids], ids),
             "ep_combine": AllToAllStart("ep"), "ep_merge": Merge(layer, moe)}
    for name, part in parts.items():
        moe.add_module(name, part)
    path = layer.path.__add__
    row_bytes = layer.hidden_size * layer.element_size
    emit = Emitter(gm.graph, layer.index)
    with gm.graph.inserting_before(node):
        tokens = emit("glue", "call_method", "flatten", (node.args[0], 0, -2))
        expert_ids, weights = emit.unpack(emit("route", "call_module", path(".ep_router"), (tokens,)), 2)
        perm = emit("permute", "call_function", permute, (tokens, expert_ids, P, L))
        rows, order, send_counts = emit.unpack(perm, 3)
        recv_counts = emit("counts", "call_module", path(".ep_counts"), (send_counts,))
        send_splits = emit("glue", "call_function", splits, (send_counts,))
        recv_splits = emit("glue", "call_function", splits, (recv_counts,))
        pending = emit("dispatch_start", "call_module", path(".ep_dispatch"), (rows, send_splits, recv_splits),
                       bytes_per_token=row_bytes)
        shared = None  # the shared expert runs while the dispatch is in flight
        shared_module = layer.adapter.shared_expert(moe)
        if shared_module is not None:
            shared = emit("shared", "call_module", _submodule_path(moe, layer.path, shared_module), (tokens,))
        received = emit("dispatch_wait", "call_function", wait, (pending,))
        outputs = emit("experts", "call_module", path(".ep_experts"), (received, recv_counts))
        pending = emit("combine_start", "call_module", path(".ep_combine"), (outputs, recv_splits, send_splits),
                       bytes_per_token=row_bytes)
        returned = emit("combine_wait", "call_function", wait, (pending,))
        routed = emit("unpermute", "call_function", unpermute, (returned, order, weights))
        merged = emit("merge", "call_module", path(".ep_merge"), (routed,) if shared is None else (routed, shared))
        out = emit("glue", "call_method", "reshape_as", (merged, node.args[0]))
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return emit.inserted


class Emitter:
    """Creates one layer's nodes at the graph's insertion point, each tagged with
    `meta["moedit"] = {"kind", "layer", "staleness"}`, and records the ones that matter
    (every kind but "glue") as `Inserted` rows."""

    def __init__(self, graph: fx.Graph, layer: int, staleness: int = 0):
        self.graph, self.layer, self.staleness = graph, layer, staleness
        self.inserted: list[Inserted] = []

    def __call__(self, kind: str, op: str, target, args, bytes_per_token: int = 0, staleness: int | None = None):
        node = getattr(self.graph, op)(target, args)
        stale = self.staleness if staleness is None else staleness
        node.meta[META] = {"kind": kind, "layer": self.layer, "staleness": stale}
        if kind != "glue":
            self.inserted.append(Inserted(node.name, self.layer, kind, bytes_per_token, stale))
        return node

    def unpack(self, node: fx.Node, n: int) -> list[fx.Node]:
        return [self("glue", "call_function", operator.getitem, (node, i)) for i in range(n)]


def expert_parallel(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite every MoE leaf into routed all-to-all expert parallelism over ctx.world_size ranks."""
    by_index = {layer.index: layer for layer in ctx.layers}
    inserted: list[Inserted] = []
    for node in moe_nodes(gm):
        inserted += _rewrite(gm, node, by_index[node.meta[META]["layer"]], ctx)
    return PassResult(gm, bool(inserted), inserted)
