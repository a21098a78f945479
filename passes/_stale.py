"""What the stale expert-parallel passes (displace, interweave) share.

Both start from the synchronous layer that `expert_parallel` emitted and replace its
exchange with one whose results are consumed at a later diffusion step. Everything that
crosses a step boundary is an `InFlight` record in the run's `StepCache`: the exchange
(still running, or finished), the token order of the step it belongs to, and the counts
both ways. The synchronous program fills the same keys, so any stale step can follow a
synchronous one (warm-up, cool-down, every k-th step).

A displaced layer's slot, in program order (the counts exchange is started right after
routing and waited on only after the previous step's experts have run, so it has
landed by then and no slot blocks on a fresh exchange; interweave starts the dispatch
first, see its docstring):

    1. route, permute            this step's tokens, as in the synchronous layer
    2. counts start              async all-to-all of this step's counts
    3. previous dispatch         wait, run the experts it carries, start their combine
    4. own combine               wait, unpermute with this step's router weights
    5. counts wait, dispatch     start this step's dispatch; it is consumed later

Stale exchanges run on the "ep" axis's "stale" communicator and their counts on its
"counts" communicator (see [Note: channels] in moedit/runtime/mesh.py).
"""

from __future__ import annotations

import torch.fx as fx

from moedit.graph import Emitter, Inserted, Kind, LayerNodes, kind_of, meta
from moedit.pipeline import MoELayer, PassContext
from moedit.plan import Plan
from moedit.runtime import ops
from moedit.runtime.expert_ops import splits, unpermute

from .expert_parallel import AXIS, routed_exchange

STALE, COUNTS = "stale", "counts"  # channels, see [Note: channels]

# The synchronous exchange a stale layer replaces.
_EXCHANGE = (Kind.COUNTS_START, Kind.COUNTS_WAIT, Kind.SEND_SPLITS, Kind.RECV_SPLITS, Kind.DISPATCH_START,
             Kind.DISPATCH_WAIT, Kind.EXPERTS, Kind.COMBINE_START, Kind.COMBINE_WAIT, Kind.UNPERMUTE)


class StaleLayer:
    """A layer the plan runs stale, with the nodes `expert_parallel` emitted for it."""

    def __init__(self, gm: fx.GraphModule, layer: MoELayer):
        self.layer = layer
        self.nodes = LayerNodes(gm, layer.index)  # a snapshot: nodes emitted later are not in it

    def path(self, part: str) -> str:
        return f"{self.layer.path}.{part}"


def stale_layers(gm: fx.GraphModule, ctx: PassContext) -> list[StaleLayer]:
    """The layers the plan runs stale on stale steps, in program order."""
    return [StaleLayer(gm, layer) for layer in ctx.stale_layers]


def cache_key(layer: MoELayer, what: str) -> str:
    return f"layer{layer.index}_{what}"


def fill_from_sync(gm: fx.GraphModule, view: StaleLayer, key: str, what: str) -> list[Inserted]:
    """In a synchronous program, after the layer: store this step's `what` ("returned", the
    combined rows, or "received", the dispatched rows) under `key` as a finished exchange."""
    emit = Emitter(gm, view.layer.index)
    nodes = view.nodes
    source = nodes[Kind.COMBINE_WAIT] if what == "returned" else nodes[Kind.DISPATCH_WAIT]
    with gm.graph.inserting_before(nodes[Kind.MERGE].next):  # (inserting_after would reverse them)
        done = emit.call(Kind.GLUE, ops.ready, source)
        record = emit.call(Kind.GLUE, ops.in_flight, done, nodes[Kind.ORDER], nodes[Kind.SEND_COUNTS],
                           nodes[Kind.COUNTS_WAIT])
        emit.call(Kind.CACHE_WRITE, ops.cache_write, record, key=key)
    return emit.inserted


def remove_exchange(gm: fx.GraphModule, view: StaleLayer) -> None:
    """Erase the synchronous exchange once the stale slot has replaced it."""
    for node in reversed([n for n in view.nodes.nodes if kind_of(n) in _EXCHANGE]):
        gm.graph.erase_node(node)


class StaleSlot:
    """Emits one stale layer's slot before its `merge` node."""

    def __init__(self, gm: fx.GraphModule, view: StaleLayer, staleness: int, plan: Plan):
        self.gm, self.view, self.plan = gm, view, plan
        self.emit = Emitter(gm, view.layer.index, staleness=staleness)
        self._ctx = gm.graph.inserting_before(view.nodes[Kind.MERGE])

    def __enter__(self):
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

    def start_counts(self) -> fx.Node:
        return self.emit.call(Kind.COUNTS_START, ops.counts_start, self.view.nodes[Kind.SEND_COUNTS],
                              layer=self.view.layer.index, axis=AXIS, channel=COUNTS, staleness=0)

    def run_experts(self, record: fx.Node, owner: StaleLayer) -> fx.Node:
        """Wait for `owner`'s dispatched rows in `record`, run `owner`'s local experts, start
        their combine; return the new InFlight record for the combine."""
        emit = self.emit
        pending, order, send_counts, recv_counts = (emit.field(record, name) for name in
                                                    ("pending", "order", "send_counts", "recv_counts"))
        received = emit.call(Kind.DISPATCH_WAIT, ops.wait, pending)
        outputs = emit.module(Kind.EXPERTS, owner.path("ep_experts"), received, recv_counts)
        send_splits = emit.call(Kind.SEND_SPLITS, splits, send_counts, recv_counts)
        recv_splits = emit.call(Kind.RECV_SPLITS, splits, recv_counts)
        combine = emit.call(Kind.COMBINE_START, ops.exchange_start, outputs, recv_splits, send_splits,
                            **routed_exchange(self.plan, owner.layer, "combine"), channel=STALE)
        for node in (received, outputs, combine):  # in this layer's slot, but for `owner`'s tokens
            meta(node).owner = owner.layer.index
        return emit.call(Kind.GLUE, ops.in_flight, combine, order, send_counts, recv_counts)

    def consume_combine(self, record: fx.Node) -> None:
        """Wait for this layer's combined rows and put them in token order, weighted by this
        step's router weights; the result replaces the synchronous routed output."""
        emit, nodes = self.emit, self.view.nodes
        returned = emit.call(Kind.COMBINE_WAIT, ops.wait, emit.field(record, "pending"))
        kernels = nodes[Kind.PERMUTE].kwargs.get("kernels", "torch")  # as expert_parallel chose
        routed = emit.call(Kind.UNPERMUTE, unpermute, returned, emit.field(record, "order"), nodes[Kind.WEIGHTS],
                           kernels=kernels)
        nodes[Kind.MERGE].replace_input_with(nodes[Kind.UNPERMUTE], routed)

    def dispatch(self, counts_pending: fx.Node) -> fx.Node:
        """Start this step's dispatch; return its InFlight record."""
        emit, view, nodes = self.emit, self.view, self.view.nodes
        recv_counts = emit.call(Kind.COUNTS_WAIT, ops.wait, counts_pending, staleness=0)
        send_splits = emit.call(Kind.SEND_SPLITS, splits, nodes[Kind.SEND_COUNTS], recv_counts)
        recv_splits = emit.call(Kind.RECV_SPLITS, splits, recv_counts)
        pending = emit.call(Kind.DISPATCH_START, ops.exchange_start, nodes[Kind.ROWS], send_splits, recv_splits,
                            **routed_exchange(self.plan, view.layer, "dispatch"), channel=STALE)
        return emit.call(Kind.GLUE, ops.in_flight, pending, nodes[Kind.ORDER], nodes[Kind.SEND_COUNTS], recv_counts)

    def read(self, key: str) -> fx.Node:
        return self.emit.call(Kind.CACHE_READ, ops.cache_read, key=key)

    def write(self, key: str, record: fx.Node) -> fx.Node:
        return self.emit.call(Kind.CACHE_WRITE, ops.cache_write, record, key=key)
