"""Synchronous expert parallelism: exact, 0 steps stale.

Experts are sharded over the expert-parallel group, expert e on rank e % P (DICE's
layout). Each MoE leaf becomes, in numbered steps:

    1. route      the gate picks K experts per token (through the layer's adapter, which
                  also gets the layer's inputs after its tokens)
    2. permute    copies of each token sorted by destination rank and local expert
                  (empty slots of expert-choice layers left out, see [Note: adapter shapes])
    3. counts     all-to-all of per-expert counts, to size the buffers (waited at once)
    4. dispatch   all-to-all with variable splits, started
    5. shared     the shared expert, while the dispatch is in flight; then wait
    6. experts    this rank's experts on what arrived
    7. combine    all-to-all back, started, then waited on
    8. unpermute  outputs back in token order, weighted by the router and summed,
                  and merged with the shared expert's output by the adapter (which also
                  builds what the layer returns, if more than its output)

With `expert_parallel.chunks: N`, layers that are synchronous at every step split their
tokens into N chunks and pipeline steps 2-8 over them (`_Exchange.in_chunks`), the
overlap Tutel and Comet use: still exact.

Every node is tagged with its `Kind`, so later passes find a layer's values (weights,
rows, order, counts) and steps by kind (`LayerNodes`). The per-rank module holds only
this rank's experts: the layer is replaced by a shallow copy whose other experts are
`RemovedExpert` placeholders, so its state dict keeps the original key names, restricted
to local experts. Experts that are views of packed parameters (not submodules) cannot be
dropped that way: every rank keeps the whole parameters (explain() says so).
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
from torch import nn

from moedit.adapters import overrides
from moedit.graph import META, Emitter, Inserted, Kind, meta
from moedit.pipeline import MoELayer, PassContext, PassResult, strip_modules
from moedit.plan import Plan, PlanError
from moedit.runtime import ops
from moedit.runtime.expert_ops import (Choice, LocalExperts, Merge, Output, RemovedExpert, Router, Scores, by_image,
                                      permute, splits, unpermute)
from moedit.runtime.sequence_ops import join_rows, take_rows
from moedit.runtime.wire import round_trip, wire_of
from moedit.tracer import moe_nodes

from .schedule import measured_costs

AXIS = "ep"


def routed_exchange(plan: Plan, layer: MoELayer, name: str) -> dict:
    """The keyword arguments of `ops.exchange_start` for `layer`'s "dispatch" or "combine": where
    it runs, the plan's wire dtype for it (see [Note: wire dtypes] in moedit/runtime/wire.py)
    and the bytes it sends per routed row, for explain() and the planner."""
    ep = plan.expert_parallel
    wire = wire_of(ep.wire_dtypes[name], ep.wire_block)
    kwargs = {"name": name, "layer": layer.index, "axis": AXIS, "bytes_per_token": layer.row_bytes}
    if wire is not None:
        kwargs.update(wire.kwargs(), bytes_per_token=wire.row_bytes(layer.hidden_size))
    return kwargs


def expert_owner(expert: int, world_size: int) -> int:
    return expert % world_size


def local_experts(num_experts: int, world_size: int, rank: int) -> list[int]:
    return list(range(rank, num_experts, world_size))


def _localize(gm: fx.GraphModule, layer: MoELayer, ctx: PassContext) -> nn.Module:
    """Swap the layer in `gm` for a copy holding only this rank's experts; return the copy."""
    moe = gm.get_submodule(layer.path)
    experts = layer.adapter.experts(moe)
    replace = {id(e): RemovedExpert(i, expert_owner(i, ctx.ep_size))
               for i, e in enumerate(experts) if expert_owner(i, ctx.ep_size) != ctx.ep_rank}
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


def _call_inputs(gm: fx.GraphModule, node: fx.Node, layer: MoELayer) -> tuple[fx.Node, tuple, dict]:
    """The MoE call's tokens and its extra inputs (the arguments after the tokens), checked
    against the adapter: an input it does not take would be dropped (see [Note: adapter shapes])."""
    adapter, name = layer.adapter, type(layer.adapter).__name__
    if not node.args:
        raise TypeError(f"MoE layer {layer.path} is called with keyword arguments only ({', '.join(node.kwargs)}); "
                        "moedit reads the tokens from the first positional argument: call it as moe(x, ...)")
    extra, extra_kwargs = node.args[1:], dict(node.kwargs)
    moe = gm.get_submodule(layer.path)
    for method, fixed, form in (("route", (moe, None), "moe, tokens"), ("combine", (moe, None, None),
                                                                        "moe, routed, shared")):
        try:
            inspect.signature(getattr(adapter, method)).bind(*fixed, *extra, **extra_kwargs)
        except TypeError as err:
            given = ", ".join([str(a) for a in extra] + [f"{k}=" for k in extra_kwargs])
            raise TypeError(f"MoE layer {layer.path} is called with inputs after its tokens ({given}) that "
                            f"{name}.{method} does not take ({err}); moedit passes them to route and combine "
                            f"rather than drop them: add them to the signature, e.g. def {method}(self, {form}, "
                            "*extra)") from None
    indexed = [user.name for user in node.users if user.op == "call_function" and user.target is operator.getitem]
    if indexed and not overrides(adapter, "output"):
        raise TypeError(f"the output of MoE layer {layer.path} is indexed ({', '.join(indexed)}): if its forward "
                        f"returns a tuple such as (out, aux_loss), override {name}.output(moe, out) to build it "
                        "from the output [B,N,H] (it returns `out` unchanged by default)")
    return node.args[0], extra, extra_kwargs


def _route(emit: Emitter, exchange, layer: MoELayer, x: fx.Node, tokens: fx.Node, extra, extra_kwargs, split):
    """expert ids and weights [T,K] of the layer's tokens: by its router, or for an expert choice in
    two steps by scores, then the choice over each image; where sequence parallelism splits the
    images (`split`: layout, axis, parts, index), over every rank's scores of the image (see
    [Note: adapter shapes])."""
    if not overrides(layer.adapter, "choose"):
        return emit.unpack(emit.module(Kind.ROUTE, exchange.path("ep_router"), tokens, *extra, kwargs=extra_kwargs),
                           Kind.EXPERT_IDS, Kind.WEIGHTS)
    scores = emit.module(Kind.ROUTE, exchange.path("ep_scores"), tokens, *extra, kwargs=extra_kwargs)
    per_image = emit.call(Kind.GLUE, by_image, scores, x)
    if split is not None:  # [B, n, E] from every rank: [B, N, E]
        layout, axis, parts, index = split
        pending = emit.call(Kind.GATHER_START, ops.gather_start, per_image, name="gather of the router scores",
                            layer=layer.index, axis=axis)
        per_image = emit.call(Kind.GLUE, join_rows, emit.call(Kind.GATHER_WAIT, ops.wait, pending), layout)
    choice = emit.module(Kind.ROUTE, exchange.path("ep_choice"), per_image)
    if split is not None:  # this rank's rows of the choice
        for element in (0, 1):
            choice = emit.call(Kind.GLUE, take_rows, choice, layout, parts, index, element)
    per_image = emit.unpack(choice, Kind.GLUE, Kind.GLUE)
    return [emit.method(kind, "flatten", value, 0, 1) for kind, value in zip((Kind.EXPERT_IDS, Kind.WEIGHTS),
                                                                              per_image)]


def _rewrite(gm: fx.GraphModule, node: fx.Node, layer: MoELayer, ctx: PassContext) -> list[Inserted]:
    P = ctx.ep_size
    x, extra, extra_kwargs = _call_inputs(gm, node, layer)
    moe = _localize(gm, layer, ctx)
    ids = local_experts(layer.num_experts, P, ctx.ep_rank)
    experts = layer.adapter.experts(moe)
    moe.add_module("ep_router", Router(layer.adapter, moe))
    if overrides(layer.adapter, "choose"):
        moe.add_module("ep_scores", Scores(layer.adapter, moe))
        moe.add_module("ep_choice", Choice(layer.adapter, moe))
    moe.add_module("ep_experts", LocalExperts([experts[i] for i in ids], ids, kernels=ctx.kernels))
    moe.add_module("ep_merge", Merge(layer.adapter, moe))
    exchange = _Exchange(Emitter(gm, layer.index), layer, P, f"{layer.path}.", ctx)
    emit = exchange.emit
    shared_module = layer.adapter.shared_expert(moe)
    shared_path = None if shared_module is None else _submodule_path(moe, layer.path, shared_module)
    synchronous = layer.index in ctx.synchronous_layers
    chunks = ctx.chunks if synchronous else 1
    with gm.graph.inserting_before(node):
        tokens = emit.method(Kind.TOKENS, "flatten", x, 0, -2)
        expert_ids, weights = _route(emit, exchange, layer, x, tokens, extra, extra_kwargs, meta(node).split)
        # Empty slots (expert-choice routing, see [Note: adapter shapes]) are never exchanged.
        keep = emit.call(Kind.GLUE, operator.ge, expert_ids, 0) if layer.adapter.empty_slots else None
        shared = []  # the shared expert runs while the dispatch is in flight

        def run_shared():
            if shared_path is not None:
                shared.append(emit.module(Kind.SHARED, shared_path, tokens))

        if P == 1 and synchronous:
            routed = exchange.local(tokens, expert_ids, weights, keep, run_shared)
        elif chunks == 1:
            routed = exchange.whole(tokens, expert_ids, weights, keep, run_shared)
        else:
            routed = exchange.in_chunks(tokens, expert_ids, weights, keep, chunks, run_shared)
        if extra or extra_kwargs:
            shared = [shared[0] if shared else None, *extra]
        merged = emit.module(Kind.MERGE, exchange.path("ep_merge"), routed, *shared, kwargs=extra_kwargs)
        out = emit.method(Kind.OUTPUT, "reshape_as", merged, x)
        if overrides(layer.adapter, "output"):
            moe.add_module("ep_output", Output(layer.adapter, moe))
            out = emit.module(Kind.OUTPUT, exchange.path("ep_output"), out)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return emit.inserted


class _Exchange:
    """Emits a layer's routed path from permute to unpermute: whole, or in pipelined chunks."""

    def __init__(self, emit: Emitter, layer: MoELayer, world_size: int, prefix: str, ctx: PassContext):
        self.emit, self.layer, self.kernels, self.plan = emit, layer, ctx.kernels, ctx.plan
        self.P, self.L = world_size, layer.num_experts // world_size
        self.path = prefix.__add__
        self.where = {"layer": layer.index, "axis": AXIS}

    def _permute(self, tokens, expert_ids, keep):
        kept = {} if keep is None else {"keep": keep}
        perm = self.emit.call(Kind.PERMUTE, permute, tokens, expert_ids, self.P, self.L, **kept, kernels=self.kernels)
        return self.emit.unpack(perm, Kind.ROWS, Kind.ORDER, Kind.SEND_COUNTS)

    def _start(self, name: str, rows, send_splits, recv_splits) -> fx.Node:
        kind = Kind.DISPATCH_START if name == "dispatch" else Kind.COMBINE_START
        return self.emit.call(kind, ops.exchange_start, rows, send_splits, recv_splits,
                              **routed_exchange(self.plan, self.layer, name))

    def local(self, tokens, expert_ids, weights, keep, run_shared) -> fx.Node:
        """One rank holds every expert: no exchange to emit (a timeline shows none, verify
        counts none). The rows still take their trip through a plan's wire dtypes, as every
        row does at any world size (see [Note: wire dtypes] in moedit/runtime/wire.py).
        Layers the plan runs stale keep their exchanges on one rank: they carry the cache."""
        emit = self.emit
        rows, order, counts = self._permute(tokens, expert_ids, keep)
        run_shared()
        outputs = emit.module(Kind.EXPERTS, self.path("ep_experts"), self._trip("dispatch", rows), counts)
        return emit.call(Kind.UNPERMUTE, unpermute, self._trip("combine", outputs), order, weights,
                         kernels=self.kernels)

    def _trip(self, name: str, rows: fx.Node) -> fx.Node:
        ep = self.plan.expert_parallel
        wire = wire_of(ep.wire_dtypes[name], ep.wire_block)
        return rows if wire is None else self.emit.call(Kind.GLUE, round_trip, rows, **wire.kwargs())

    def whole(self, tokens, expert_ids, weights, keep, during_dispatch) -> fx.Node:
        emit = self.emit
        rows, order, send_counts = self._permute(tokens, expert_ids, keep)
        recv_counts = emit.call(Kind.COUNTS_WAIT, ops.wait,
                                emit.call(Kind.COUNTS_START, ops.counts_start, send_counts, **self.where))
        send_splits = emit.call(Kind.SEND_SPLITS, splits, send_counts, recv_counts)
        recv_splits = emit.call(Kind.RECV_SPLITS, splits, recv_counts)
        pending = self._start("dispatch", rows, send_splits, recv_splits)
        during_dispatch()
        received = emit.call(Kind.DISPATCH_WAIT, ops.wait, pending)
        outputs = emit.module(Kind.EXPERTS, self.path("ep_experts"), received, recv_counts)
        returned = emit.call(Kind.COMBINE_WAIT, ops.wait, self._start("combine", outputs, recv_splits, send_splits))
        return emit.call(Kind.UNPERMUTE, unpermute, returned, order, weights, kernels=self.kernels)

    def in_chunks(self, tokens, expert_ids, weights, keep, n: int, during_dispatch) -> fx.Node:
        """The tokens in `n` chunks: one counts exchange for all of them, every dispatch
        started, then per chunk as its rows land: experts, combine started; then the
        combines consumed in order. Chunk k+1's dispatch overlaps chunk k's experts, and
        chunk k's combine chunk k+1's experts. Each token's outputs are what the whole layer
        computes (up to float rounding: the experts see smaller batches)."""
        emit = self.emit
        emit.chunks = n
        values = (tokens, expert_ids, weights) if keep is None else (tokens, expert_ids, weights, keep)
        pieces = [emit.call(Kind.GLUE, torch.tensor_split, value, n) for value in values]
        chunks = []
        for i in range(n):
            emit.chunk = i
            token_i, ids_i, weights_i, *keep_i = (emit.call(Kind.GLUE, operator.getitem, piece, i) for piece in pieces)
            chunks.append((*self._permute(token_i, ids_i, keep_i[0] if keep_i else None), weights_i))
        emit.chunk = None
        counts = emit.call(Kind.GLUE, torch.stack, [send_counts for _, _, send_counts, _ in chunks], 1)  # [P, n, L]
        all_recv = emit.call(Kind.COUNTS_WAIT, ops.wait,
                             emit.call(Kind.COUNTS_START, ops.counts_start, counts, **self.where))
        received_counts = []
        for i in range(n):
            emit.chunk = i
            received_counts.append(emit.call(Kind.GLUE, operator.getitem, all_recv, (slice(None), i)))
        # the first chunk's splits bring every chunk's counts to the host in one copy (see splits)
        later = [t for (_, _, send_counts, _), recv_counts in zip(chunks[1:], received_counts[1:])
                 for t in (send_counts, recv_counts)]
        flying = []
        for i, ((rows, order, send_counts, weights_i), recv_counts) in enumerate(zip(chunks, received_counts)):
            emit.chunk = i
            send_splits = emit.call(Kind.SEND_SPLITS, splits, send_counts, recv_counts, *(later if i == 0 else ()))
            recv_splits = emit.call(Kind.RECV_SPLITS, splits, recv_counts)
            flying.append((self._start("dispatch", rows, send_splits, recv_splits), recv_counts, send_splits,
                           recv_splits))
        emit.chunk = None
        during_dispatch()
        returning = []
        for i, (pending, recv_counts, send_splits, recv_splits) in enumerate(flying):
            emit.chunk = i
            received = emit.call(Kind.DISPATCH_WAIT, ops.wait, pending)
            outputs = emit.module(Kind.EXPERTS, self.path("ep_experts"), received, recv_counts)
            returning.append(self._start("combine", outputs, recv_splits, send_splits))
        routed = []
        for i, (pending, (_, order, _, weights_i)) in enumerate(zip(returning, chunks)):
            emit.chunk = i
            returned = emit.call(Kind.COMBINE_WAIT, ops.wait, pending)
            routed.append(emit.call(Kind.UNPERMUTE, unpermute, returned, order, weights_i, kernels=self.kernels))
        emit.chunk = None
        return emit.call(Kind.GLUE, torch.cat, routed)


def resolve_chunks(plan: Plan) -> tuple[Plan, dict | None]:
    """For `chunks: auto`: the plan with a chunk count in its place, chosen from the measured
    costs in `schedule.profile`, and what the choice rested on (else the plan, None).

    Per layer, with D and C the dispatch's and the combine's time in flight, E the experts'
    time and a the latency a further exchange adds (the counts' time in flight), N chunks
    take about max(D + C + 2(N-1)a, E + (D + C)/N): the link busy the whole time, or the
    experts plus one chunk's exchanges. One chunk takes D + C + E."""
    if plan.expert_parallel.chunks != "auto":
        return plan, None
    if plan.schedule.profile is None:
        raise PlanError("expert_parallel.chunks: 'auto' chooses from measured costs; set schedule.profile to a "
                        "timeline.json written by `moedit.run --timeline` (of a synchronous plan), or give a number")
    measured = measured_costs(plan.schedule.profile)
    flight, compute = measured["exchange_by_name"], measured["compute"]
    experts = [t for label, t in compute.items() if label.endswith(" experts")]
    D, C, a = (flight.get(name, 0.0) for name in ("dispatch", "combine", "counts"))
    E = sum(experts) / len(experts) if experts else 0.0

    def predicted(n: int) -> float:
        return D + C + E if n == 1 else max(D + C + 2 * (n - 1) * a, E + (D + C) / n)

    chunks = min(range(1, 9), key=lambda n: (predicted(n), n))
    data = plan.to_dict()
    data["expert_parallel"]["chunks"] = chunks
    if data["schedule"]["policy"] != "overlap" and not data["shortcut"]["enabled"]:
        data["schedule"]["profile"] = None  # read: nothing else reads it (a plan refuses an unread profile)
    basis = {"dispatch_s": D, "combine_s": C, "experts_s": E, "latency_s": a, "chunks": chunks,
             "predicted_s": {n: predicted(n) for n in range(1, 9)}}
    return Plan(**data), basis


def expert_parallel(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite every MoE leaf into routed all-to-all expert parallelism over the expert-parallel group."""
    by_index = {layer.index: layer for layer in ctx.layers}
    inserted: list[Inserted] = []
    for node in moe_nodes(gm):
        inserted += _rewrite(gm, node, by_index[node.meta[META]["layer"]], ctx)
    return PassResult(gm, bool(inserted), inserted)
