"""Graph-level scheduling (plan `schedule.policy: overlap`): reorder a program so that
exchanges start as early, and are waited on as late, as its dependencies, a memory budget
and the collective order allow. Only the order of nodes changes, never a node, so the
results are bit-identical to the traced order's.

1. The program becomes a networkx DAG: data edges, plus edges that keep (a) the issue
   order of the exchanges on each communicator, which every rank must share (see [Note:
   async handles]), (b) the order of the accesses to each step-cache key, and (c) every
   impure node of the model where it was (a barrier).
2. Every node gets a cost in seconds (`costs`): measured, from a timeline that
   `moedit.run --timeline` wrote (`schedule.profile`; best a synchronous plan's, whose
   exchanges do not queue), or else default estimates by node kind. An exchange costs its
   time in flight.
3. List scheduling on one compute lane and one FIFO link per mesh axis (all of an axis's
   communicators share its bandwidth), which predicts when each exchange lands: among the
   nodes that are ready, an exchange start goes first; while a wait's exchange is in flight
   its window fills, in program order, with work that fits before it lands (the shared
   expert, the next block's modulation, another layer's stale work); when nothing fits, a
   wait that gates the next exchange is taken (blocking briefly beats holding the link
   back), other work goes on. Otherwise program order. (Priority by
   critical path was tried first: it pushes stale exchanges, whose consumers are in the
   next step, to the end of the program, where their waits then stall the next step.)
4. Memory: the model's live activations (sizes from `tracer.record_sizes`) may not exceed
   their peak under the traced order by more than `schedule.memory_slack`: a node is
   pulled ahead of program order only while the bytes so pulled ahead fit (`_Memory`).
   Without recorded sizes there is no budget to keep: the pass refuses (`_check_sizes`)
   unless memory_slack is null (no bound).
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import math
import re
import statistics
from collections import defaultdict

import networkx as nx
import torch.fx as fx

from moedit.graph import Kind, kind_of, meta
from moedit.pipeline import PassContext, PassResult
from moedit.plan import PlanError
from moedit.runtime import ops
from moedit.runtime.comm import MAIN
from moedit.runtime.regions import region

log = logging.getLogger(__name__)

_STARTS = ops.EXCHANGE_STARTS
_CACHE_OPS = (ops.cache_read, ops.cache_write, ops.slot_outputs)

# Default costs when no profile is given, in milliseconds of a small CPU model; only their
# ratios matter. Compute regions by the kind of their first node; exchanges by name.
DEFAULT_COMPUTE_MS = {"attention": 3.0, "dense": 1.0, Kind.EXPERTS: 3.0, Kind.SHARED: 1.5, Kind.ROUTE: 0.5,
                      Kind.PERMUTE: 0.5, Kind.UNPERMUTE: 0.5, Kind.SLOT_CACHE: 0.5, Kind.MERGE: 0.2,
                      Kind.QKV: 1.0, Kind.ATTEND: 2.0, Kind.ATTENTION_OUT: 0.5}
DEFAULT_EXCHANGE_MS = {"dispatch": 4.0, "combine": 4.0, "counts": 1.0,  # by name, else by kind
                       Kind.ULYSSES_START: 2.0, Kind.RING_START: 2.0, Kind.GATHER_START: 1.0}


def schedule(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    settings = ctx.plan.schedule
    if settings.policy != "overlap":
        return PassResult(gm, False, [])
    nodes = list(gm.graph.nodes)
    _check_sizes(nodes, settings.memory_slack)
    dag = program_dag(gm)
    cost, flight = costs(nodes, settings.profile)
    order = list_schedule(dag, nodes, cost, flight, settings.memory_slack)
    changed = order != nodes
    for before, node in zip(order, order[1:]):
        before.append(node)
    return PassResult(gm, changed, [])


def _check_sizes(nodes: list[fx.Node], slack: float | None) -> None:
    """A memory budget needs the activations' sizes: without them every size is 0 and the
    budget would bound nothing (see `_Memory`). `compile` records them for a traced model
    that has `example_inputs(batch)`, and a captured one has them from its example inputs."""
    if slack is not None and not any(meta(node).get("bytes") for node in nodes):
        raise PlanError(f"schedule.memory_slack ({slack:g}) bounds the memory the overlap schedule may add by the "
                        "program's activation sizes, but none were recorded (moedit.compile records them with the "
                        "model's `example_inputs(batch)` method, which this model lacks); give the model one "
                        "(returning the forward's positional inputs for `batch` samples), compile with "
                        "example_inputs=..., or set schedule.memory_slack: null to reorder without a memory bound")


# -- 1. the DAG ---------------------------------------------------------------------

def program_dag(gm: fx.GraphModule, exchange_order: bool = True) -> nx.DiGraph:
    """Nodes of `gm` with an edge for every "must come before"; without `exchange_order`, the
    exchanges on a communicator may be reissued in another order (the caller then keeps
    every rank's programs alike)."""
    dag = nx.DiGraph()
    nodes = list(gm.graph.nodes)
    dag.add_nodes_from(nodes)
    dag.add_edges_from((source, node) for node in nodes for source in node.all_input_nodes)
    last_on: dict = {}
    for node in nodes:
        key = _ordered_resource(node)
        if key is not None and (exchange_order or key[0] != "exchange"):
            if key in last_on:
                dag.add_edge(last_on[key], node)
            last_on[key] = node
    for index, node in enumerate(nodes):
        if _is_barrier(node):
            dag.add_edges_from((earlier, node) for earlier in nodes[:index])
            dag.add_edges_from((node, later) for later in nodes[index + 1:])
    output = nodes[-1]
    dag.add_edges_from((node, output) for node in nodes[:-1] if dag.out_degree(node) == 0)
    return dag


def _ordered_resource(node: fx.Node):
    """What `node` must keep its order on: an exchange's communicator, a cache key."""
    if node.target in _STARTS:
        return ("exchange", node.kwargs["axis"], node.kwargs.get("channel", MAIN))
    if node.target in _CACHE_OPS:
        return ("cache", node.kwargs["key"])
    return None


def _is_barrier(node: fx.Node) -> bool:
    """Model code with side effects (in-place methods, impure calls) stays where it was."""
    if node.op == "call_method" and node.target.endswith("_") and not node.target.endswith("__"):
        return True
    return (node.op == "call_function" and node.is_impure() and not getattr(node.target, "stateful", False)
            and node.target not in _STARTS)


# -- 2. costs -------------------------------------------------------------------------

def costs(nodes: list[fx.Node], profile: str | None) -> tuple[dict, dict]:
    """(compute seconds per node, seconds in flight per exchange start). A region or exchange
    the profile did not measure costs 0 s, with a warning naming them (see `_warn_unmeasured`)."""
    measured = measured_costs(profile) if profile else None
    compute, flight = {}, {}
    unmeasured = []
    current = None
    for node in nodes:
        if node.target in _STARTS:
            name, layer = node.kwargs.get("name", "counts"), node.kwargs["layer"]
            label = name if layer is None else f"L{layer} {name}"
            default = DEFAULT_EXCHANGE_MS[name if name in DEFAULT_EXCHANGE_MS else kind_of(node)]
            if measured and label not in measured["exchange"] and name not in measured["exchange_by_name"]:
                unmeasured.append(label)
            flight[node] = (measured["exchange"].get(label, measured["exchange_by_name"].get(name, 0.0))
                            if measured else default / 1e3)
        label = region(node)
        if label is None or label == current:
            compute[node] = 0.0
            continue
        current = label
        if measured:
            if label not in measured["compute"]:
                unmeasured.append(label)
            compute[node] = measured["compute"].get(label, 0.0)
        else:
            compute[node] = DEFAULT_COMPUTE_MS.get(_default_key(node, label), 0.0) / 1e3
    if unmeasured:
        _warn_unmeasured(profile, tuple(dict.fromkeys(unmeasured)))
    return compute, flight


@functools.lru_cache(maxsize=None)  # once per profile and set of regions, not once per rank and program
def _warn_unmeasured(profile: str, labels: tuple[str, ...]) -> None:
    log.warning("schedule.profile %s has no time for %d region(s) of this program, which the scheduler therefore "
                "costs 0 s: %s; record the profile with the plan's layers and layout (`moedit.run --timeline`), "
                "ideally its synchronous version", profile, len(labels), ", ".join(labels))


def _default_key(node: fx.Node, label: str):
    if kind_of(node) is Kind.ATTENTION:
        return "attention"
    if label.endswith(" dense"):
        return "dense"
    return kind_of(node)


@functools.lru_cache(maxsize=8)
def measured_costs(path: str) -> dict:
    """Mean time per occurrence of each compute region and each exchange, over every rank and
    step but the first, from a Chrome trace written by `moedit.run --timeline`."""
    try:
        with open(path) as f:
            events = json.load(f)["traceEvents"]
        lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in events if e.get("name") == "thread_name"}
        compute, exchange = defaultdict(list), defaultdict(list)
        for e in events:
            if e["ph"] != "X" or e["args"].get("step", 0) == 0:
                continue
            bucket = compute if lanes[e["pid"], e["tid"]] == "compute" else exchange
            bucket[e["name"]].append(e["dur"] / 1e6)
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:  # (JSONDecodeError too)
        raise PlanError(f"schedule.profile {path} is not a timeline written by `moedit.run --timeline` "
                        f"({err}); give DIR/timeline.json of such a run") from None
    by_name = defaultdict(list)
    for label, durations in exchange.items():
        by_name[re.sub(r"^L\d+ ", "", label)] += durations
    mean = {label: statistics.mean(d) for label, d in compute.items()}
    return {"compute": mean, "exchange": {k: statistics.mean(v) for k, v in exchange.items()},
            "exchange_by_name": {k: statistics.mean(v) for k, v in by_name.items()}}


# -- 3. list scheduling ---------------------------------------------------------------

def list_schedule(dag: nx.DiGraph, nodes: list[fx.Node], cost: dict, flight: dict,
                  slack: float | None) -> list[fx.Node]:
    """A topological order of `dag`: program order, except that an exchange starts as soon as
    it can and a wait is put off while its exchange is predicted to be in flight and other
    work is ready (see the module's docstring). `slack` None: no memory bound."""
    state = _State(nodes, cost, slack)
    # Bookkeeping right before a start (splits, record fields) and the waits that gate a
    # start go early; real work that feeds a start does not: pulling every stale layer's
    # experts to the top of the step queued this step's dispatches behind all the combines
    # (displaced, shaped link: 99 ms a step against 82).
    state.feeds = {node for node in nodes if node.target not in _STARTS and cost.get(node, 0.0) == 0.0
                   and _starts_soon(dag, node)}
    indegree = {node: dag.in_degree(node) for node in nodes}
    order = [node for node in nodes if node.op == "placeholder"]  # the signature, as it was
    for node in order:
        state.memory.take(node)
        for successor in dag.successors(node):
            indegree[successor] -= 1
    ready = {node for node, degree in indegree.items() if degree == 0 and node.op != "placeholder"}
    link_free = defaultdict(float)
    while ready:
        node = state.pick(ready)
        ready.remove(node)
        if state.waits_on.get(node) is not None:
            state.now = max(state.now, state.landed[state.waits_on[node]])
        state.now += cost.get(node, 0.0)
        if node in flight:
            axis = node.kwargs["axis"]
            state.landed[node] = link_free[axis] = max(state.now, link_free[axis]) + flight[node]
        state.memory.take(node)
        order.append(node)
        for successor in dag.successors(node):
            indegree[successor] -= 1
            if indegree[successor] == 0:
                ready.add(successor)
    assert len(order) == len(nodes), "the program's DAG has a cycle"
    return order


def _starts_soon(dag: nx.DiGraph, wait: fx.Node, depth: int = 3) -> bool:
    """Whether an exchange start follows `wait` within `depth` edges (it gates communication)."""
    reach = nx.single_source_shortest_path_length(dag, wait, cutoff=depth)
    return any(node.target in _STARTS for node in reach)


class _State:
    """The simulated clock and what the list scheduler knows when it picks the next node."""

    def __init__(self, nodes: list[fx.Node], cost: dict, slack: float | None):
        self.position = {node: i for i, node in enumerate(nodes)}
        self.waits_on = {node: _exchange_of(node) for node in nodes if node.target is ops.wait}
        self.cost = cost
        self.memory = _Memory(nodes, slack)
        self.now = 0.0
        self.landed: dict = {}
        self.feeds: set = set()  # free nodes an exchange start follows closely

    def _in_flight(self, node) -> bool:
        start = self.waits_on.get(node)
        return start is not None and self.landed[start] > self.now

    def pick(self, ready) -> fx.Node:
        """An exchange start if one is ready, or what a start needs next; else, while waits are
        in flight, the first node in program order that fits in the time until the first
        lands, or that wait if it gates an exchange; else the first node in program order."""
        flying = [n for n in ready if self._in_flight(n)]
        free = [n for n in ready if n not in flying and self.memory.fits(n)]
        starts = [n for n in free if n.target in _STARTS] or [n for n in free if n in self.feeds]
        if starts:
            return min(starts, key=self.position.get)
        if flying:
            first = min(flying, key=lambda n: (self.landed[self.waits_on[n]], self.position[n]))
            window = self.landed[self.waits_on[first]] - self.now
            fitting = [n for n in free if self.cost.get(n, 0.0) <= window]
            if fitting:
                return min(fitting, key=self.position.get)
            if first in self.feeds or not free:
                # Nothing fits before the exchange that lets communication go on lands: wait
                # for it rather than hold the next exchange back. (When nothing is free, the
                # first node in program order is itself such a wait, see _Memory.)
                return first
        return min(free, key=self.position.get)


def _exchange_of(wait: fx.Node) -> fx.Node | None:
    """The start node a wait waits for. A record's "pending" field resolves to the start the
    record was made from in this program; a record read from the step cache has none (None:
    it was issued a step ago, so it is taken to have landed)."""
    pending = wait.args[1]
    if kind_of(pending) is Kind.PENDING:
        record = pending.args[0]
        return record.args[0] if record.target is ops.in_flight and record.args[0].target in _STARTS else None
    return pending


class _Memory:
    """The model's activation bytes that scheduling keeps alive beyond the traced order.

    Nodes with a size run in program order except where a node is pulled ahead of the
    first one not yet scheduled (the frontier): then its output is live before the traced
    order would have made it. With `extra` the bytes of such nodes still ahead of the
    frontier, live bytes never exceed the traced order's at the frontier plus `extra`, so
    keeping `extra <= slack * peak` keeps the peak within (1 + slack) of the traced one.
    (Exchange buffers have no size here: they exist from issue to wait in any order.)"""

    def __init__(self, nodes: list[fx.Node], slack: float | None):
        self.size = {node: meta(node).get("bytes", 0) for node in nodes}
        self.position = {node: i for i, node in enumerate(nodes)}
        self.unscheduled = list(range(len(nodes)))  # a heap of positions; scheduled ones popped lazily
        self.done: set[int] = set()
        self.ahead: list[tuple[int, int]] = []  # heap of (position, bytes) pulled ahead of the frontier
        self.extra = 0
        self.allowance = math.inf if slack is None else slack * peak_bytes_of(nodes, self.size)

    def frontier(self) -> int:
        while self.unscheduled and self.unscheduled[0] in self.done:
            heapq.heappop(self.unscheduled)
        return self.unscheduled[0] if self.unscheduled else len(self.position)

    def fits(self, node: fx.Node) -> bool:
        ahead = self.position[node] > self.frontier()
        return not ahead or self.extra + self.size[node] <= self.allowance

    def take(self, node: fx.Node) -> None:
        position = self.position[node]
        if position > self.frontier() and self.size[node]:
            heapq.heappush(self.ahead, (position, self.size[node]))
            self.extra += self.size[node]
        self.done.add(position)
        frontier = self.frontier()
        while self.ahead and self.ahead[0][0] <= frontier:
            self.extra -= heapq.heappop(self.ahead)[1]


def peak_bytes_of(nodes: list[fx.Node], size: dict) -> int:
    users_left = {node: len(node.users) for node in nodes}
    live = peak = 0
    for node in nodes:
        live += size[node]
        peak = max(peak, live)
        for source in node.all_input_nodes:
            users_left[source] -= 1
            live -= size[source] if users_left[source] == 0 else 0
    return peak


def peak_bytes(gm: fx.GraphModule) -> int:
    """The model's peak live activation bytes (per sample) under `gm`'s current order."""
    nodes = list(gm.graph.nodes)
    return peak_bytes_of(nodes, {node: meta(node).get("bytes", 0) for node in nodes})
