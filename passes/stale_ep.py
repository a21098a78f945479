"""What the stale expert-parallel passes (displace, interweave) share.

Both start from the synchronous layer that `expert_parallel` emitted and replace its
exchange with one whose results are consumed at a later diffusion step. Everything that
crosses a step boundary is an `InFlight` record in the rank's `StepCache`: the exchange
(still running, or finished), the token order of the step it belongs to, and the counts
both ways. The synchronous program fills the same keys, so any stale step can follow a
synchronous one (warm-up, cool-down, every k-th step).

A stale layer's slot, in program order (the counts exchange is started right after
routing and waited on only after the previous step's experts have run, so it has
landed by then and no slot blocks on a fresh exchange):

    1. route, permute            this step's tokens, as in the synchronous layer
    2. counts start              async all-to-all of this step's counts
    3. previous dispatch         wait, run the experts it carries, start their combine
    4. own combine               wait, unpermute with this step's router weights
    5. counts wait, dispatch     start this step's dispatch; it is consumed later
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from moedit.pipeline import MoELayer, PassContext
from moedit.runtime.cache import CacheRead, CacheWrite, in_flight, ready
from moedit.runtime.comm import AllToAllStart, CountsStart, wait
from moedit.runtime.expert_ops import splits, unpermute
from moedit.tracer import META

from .expert_parallel import Emitter

STALE_AXIS = "ep_stale"  # see [Note: a communicator for stale exchanges]

# The synchronous exchange a stale layer replaces.
_EXCHANGE = ("counts", "dispatch_start", "dispatch_wait", "experts", "combine_start", "combine_wait", "unpermute")


@dataclasses.dataclass
class LayerNodes:
    """The nodes `expert_parallel` emitted for one layer, by role."""

    layer: MoELayer
    nodes: dict[str, fx.Node]
    weights: fx.Node
    rows: fx.Node
    order: fx.Node
    send_counts: fx.Node
    exchange: list[fx.Node]  # the synchronous exchange and its glue, in program order

    @classmethod
    def find(cls, gm: fx.GraphModule, layer: MoELayer) -> "LayerNodes":
        nodes = {n.meta[META]["kind"]: n for n in gm.graph.nodes
                 if n.meta.get(META, {}).get("layer") == layer.index and n.meta[META]["kind"] != "glue"}
        route_out = {u.args[1]: u for u in nodes["route"].users}
        perm_out = {u.args[1]: u for u in nodes["permute"].users}
        exchange = {nodes[k] for k in _EXCHANGE}
        exchange |= {u for source in (nodes["counts"], perm_out[2]) for u in source.users if u.target is splits}
        in_order = [n for n in gm.graph.nodes if n in exchange]
        return cls(layer, nodes, route_out[1], perm_out[0], perm_out[1], perm_out[2], in_order)

    @property
    def synchronous(self) -> bool:
        return self.nodes["route"].meta[META].get("sync", False)

    def path(self, part: str) -> str:
        return f"{self.layer.path}.{part}"


def stale_layers(gm: fx.GraphModule, ctx: PassContext) -> list[LayerNodes]:
    """The layers that run stale, in program order (selective_sync marks the others)."""
    found = [LayerNodes.find(gm, layer) for layer in ctx.layers]
    return [view for view in found if not view.synchronous]


def add_part(gm: fx.GraphModule, view: LayerNodes, name: str, module) -> str:
    gm.get_submodule(view.layer.path).add_module(name, module)
    return view.path(name)


def stale_exchange(gm: fx.GraphModule, view: LayerNodes, name: str) -> str:
    """The layer's all-to-all for stale traffic (created once), on the "ep_stale" axis.

    [Note: a communicator for stale exchanges]
    Collectives on one process group complete in the order they were issued. A stale
    exchange stays in flight for most of a step, so a synchronous layer's exchange issued
    behind it on the same group would wait for it, and the overlap would only move the
    waiting elsewhere. Stale exchanges therefore run on a second group over the same ranks.
    """
    moe = gm.get_submodule(view.layer.path)
    if not hasattr(moe, name):
        moe.add_module(name, (CountsStart if name == "ep_stale_counts" else AllToAllStart)(STALE_AXIS))
    return view.path(name)


def cache_key(layer: MoELayer | int, what: str) -> str:
    index = layer if isinstance(layer, int) else layer.index
    return f"layer{index}_{what}"


def cache_write(gm, emit: Emitter, view: LayerNodes, key: str, record: fx.Node) -> fx.Node:
    target = add_part(gm, view, f"ep_write_{key}", CacheWrite(key))
    return emit("cache_write", "call_module", target, (record,))


def cache_read(gm, emit: Emitter, view: LayerNodes, key: str) -> fx.Node:
    target = add_part(gm, view, f"ep_read_{key}", CacheRead(key))
    return emit("cache_read", "call_module", target, ())


def fields(emit: Emitter, record: fx.Node):
    """The InFlight record's pending exchange, order, send and receive counts, as nodes."""
    return [emit("glue", "call_function", getattr, (record, name))
            for name in ("pending", "order", "send_counts", "recv_counts")]


def fill_from_sync(gm: fx.GraphModule, view: LayerNodes, key: str, what: str) -> list:
    """In the synchronous program, after the layer: store this step's `what` ("returned",
    the combined rows, or "received", the dispatched rows) under `key` as a finished exchange."""
    emit = Emitter(gm.graph, view.layer.index)
    nodes = view.nodes
    source = nodes["combine_wait"] if what == "returned" else nodes["dispatch_wait"]
    with gm.graph.inserting_before(nodes["merge"].next):
        done = emit("glue", "call_function", ready, (source,))
        record = emit("glue", "call_function", in_flight, (done, view.order, view.send_counts, nodes["counts"]))
        cache_write(gm, emit, view, key, record)
    return emit.inserted


def remove_exchange(gm: fx.GraphModule, view: LayerNodes) -> None:
    """Erase the synchronous exchange (and its glue) once the stale slot has replaced it."""
    for node in reversed(view.exchange):
        gm.graph.erase_node(node)


class StaleSlot:
    """Emits one stale layer's slot before its `merge` node."""

    def __init__(self, gm: fx.GraphModule, view: LayerNodes, staleness: int):
        self.gm, self.view = gm, view
        self.emit = Emitter(gm.graph, view.layer.index, staleness=staleness)
        self.row_bytes = view.layer.hidden_size * view.layer.element_size
        self._ctx = gm.graph.inserting_before(view.nodes["merge"])

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def start_counts(self) -> fx.Node:
        target = stale_exchange(self.gm, self.view, "ep_stale_counts")
        return self.emit("counts_start", "call_module", target, (self.view.send_counts,), staleness=0)

    def run_experts(self, record: fx.Node, owner: LayerNodes) -> fx.Node:
        """Wait for `owner`'s dispatched rows in `record`, run `owner`'s local experts, start
        their combine; return the new InFlight record for the combine."""
        emit = self.emit
        pending, order, send_counts, recv_counts = fields(emit, record)
        received = emit("dispatch_wait", "call_function", wait, (pending,))
        outputs = emit("experts", "call_module", owner.path("ep_experts"), (received, recv_counts))
        send_splits = emit("glue", "call_function", splits, (send_counts,))
        recv_splits = emit("glue", "call_function", splits, (recv_counts,))
        combine = emit("combine_start", "call_module", stale_exchange(self.gm, owner, "ep_stale_combine"),
                       (outputs, recv_splits, send_splits), bytes_per_token=self.row_bytes)
        return emit("glue", "call_function", in_flight, (combine, order, send_counts, recv_counts))

    def consume_combine(self, record: fx.Node) -> None:
        """Wait for this layer's combined rows and put them in token order, weighted by this
        step's router weights; the result replaces the synchronous routed output."""
        emit = self.emit
        pending, order, _, _ = fields(emit, record)
        returned = emit("combine_wait", "call_function", wait, (pending,))
        routed = emit("unpermute", "call_function", unpermute, (returned, order, self.view.weights))
        self.view.nodes["merge"].replace_input_with(self.view.nodes["unpermute"], routed)

    def dispatch(self, counts_pending: fx.Node) -> fx.Node:
        """Start this step's dispatch; return its InFlight record."""
        emit, view = self.emit, self.view
        recv_counts = emit("counts_wait", "call_function", wait, (counts_pending,), staleness=0)
        send_splits = emit("glue", "call_function", splits, (view.send_counts,))
        recv_splits = emit("glue", "call_function", splits, (recv_counts,))
        pending = emit("dispatch_start", "call_module", stale_exchange(self.gm, view, "ep_stale_dispatch"),
                       (view.rows, send_splits, recv_splits), bytes_per_token=self.row_bytes)
        return emit("glue", "call_function", in_flight, (pending, view.order, view.send_counts, recv_counts))

    def read(self, key: str) -> fx.Node:
        return cache_read(self.gm, self.emit, self.view, key)

    def write(self, key: str, record: fx.Node) -> fx.Node:
        return cache_write(self.gm, self.emit, self.view, key, record)
