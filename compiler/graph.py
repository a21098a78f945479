"""The vocabulary of moedit's graphs: node kinds, node meta, the `run` input, and `Emitter`,
which every pass uses to insert nodes.

Every node moedit inserts carries a `NodeMeta` in `node.meta["moedit"]` (kind, layer, owner,
staleness, chunk, ...), read through `meta(node)`; the tracer tags MoE and attention leaves
the same way. It is a dataclass, not a dict: a pass cannot invent a tag another pass will
not know of, and a misspelt one is an error. Passes find a layer's nodes by (layer, kind)
through `LayerNodes`, never by argument positions or node names.

[Note: the run input]
Everything a run owns (process groups, staleness caches, the step counter, the seed, the
blocked-time clock) reaches the graph as one explicit input, the last placeholder `run`:
every stateful op takes it as its first argument, e.g.

    l3_dispatch_start = moedit_runtime_ops_exchange_start(run, l3_rows, ..., axis = 'ep', ...)

so a program holds no state of its own, two runtimes can run one compiled program side by
side, and `print(gm.code)` shows every exchange and cache access.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import operator

import torch.fx as fx

META = "moedit"
RUN = "run"  # name of the placeholder every moedit program takes last


class Kind(str, enum.Enum):
    """What a node is. Values double as the names explain() and the pass log print."""

    # tagged by the tracer
    MOE = "moe"
    ATTENTION = "attention"
    RUN = "run"
    # a layer's values that later passes read
    TOKENS = "tokens"
    EXPERT_IDS = "expert_ids"
    WEIGHTS = "weights"
    ROWS = "rows"
    ORDER = "order"
    SEND_COUNTS = "send_counts"
    SEND_SPLITS = "send_splits"
    RECV_SPLITS = "recv_splits"
    # a layer's steps
    ROUTE = "route"
    DROP_SLOTS = "drop_slots"
    PERMUTE = "permute"
    COUNTS_START = "counts_start"
    COUNTS_WAIT = "counts_wait"
    DISPATCH_START = "dispatch_start"
    DISPATCH_WAIT = "dispatch_wait"
    EXPERTS = "experts"
    COMBINE_START = "combine_start"
    COMBINE_WAIT = "combine_wait"
    UNPERMUTE = "unpermute"
    SLOT_CACHE = "slot_cache"
    SHARED = "shared"
    FETCH = "fetch"  # offloading: the experts that receive rows copied to the device
    MERGE = "merge"
    CACHE_READ = "cache_read"
    CACHE_WRITE = "cache_write"
    OUTPUT = "output"
    # sequence and CFG parallelism (moedit/passes/sequence_parallel.py)
    SHARD = "shard"  # this rank's piece of a batch or of the tokens
    GATHER_START = "gather_start"
    GATHER_WAIT = "gather_wait"
    QKV = "qkv"
    ULYSSES_START = "ulysses_start"
    ULYSSES_WAIT = "ulysses_wait"
    RING_START = "ring_start"
    RING_WAIT = "ring_wait"
    ATTEND = "attend"
    ATTENTION_OUT = "attention_out"
    # PipeFusion (moedit/passes/pipefusion.py)
    SEND_START = "send_start"
    SEND_WAIT = "send_wait"
    RECV_START = "recv_start"
    RECV_WAIT = "recv_wait"
    BROADCAST_START = "broadcast_start"
    BROADCAST_WAIT = "broadcast_wait"
    PENDING = "pending"  # an exchange read back from the record that carried it across steps
    GLUE = "glue"  # bookkeeping with no role of its own (other record fields, bundling)

    def __str__(self) -> str:
        return self.value


STARTS = frozenset({Kind.COUNTS_START, Kind.DISPATCH_START, Kind.COMBINE_START, Kind.GATHER_START,
                    Kind.ULYSSES_START, Kind.RING_START, Kind.SEND_START, Kind.RECV_START,
                    Kind.BROADCAST_START})  # each returns a Pending
# Kinds that only name a value: explain() lists the steps, not these.
VALUES = frozenset({Kind.TOKENS, Kind.EXPERT_IDS, Kind.WEIGHTS, Kind.ROWS, Kind.ORDER, Kind.SEND_COUNTS,
                    Kind.SEND_SPLITS, Kind.RECV_SPLITS, Kind.OUTPUT, Kind.PENDING, Kind.GLUE})


@dataclasses.dataclass(slots=True)
class NodeMeta:
    """What moedit knows of a node (`node.meta["moedit"]`). Fields read like a dict too
    (`meta(node)["layer"]`, `.get("shape")`, `"chunk" in meta(node)`: set and not None), so
    reading code stays short; only these fields exist (slots: a misspelt attribute is an
    AttributeError, a misspelt key a KeyError)."""

    kind: Kind | None = None
    layer: int | None = None  # the MoE layer whose slot holds the node (None: outside MoE layers)
    owner: int | None = None  # the layer whose tokens or experts it serves, if not `layer` (see `serves`)
    staleness: int = 0  # steps between the activations it reads and the step that consumes them
    chunk: int | None = None  # which chunk of a chunked layer
    where: str | None = None  # outside MoE layers: what it belongs to ("a3": attention 3)
    shortcut: dict | None = None  # the shortcut schedule's window, on a dispatch (explain())
    split: tuple | None = None  # a MoE leaf whose images are split over ranks: (layout, axis, parts, index)
    bytes: int = 0  # size of the node's output for one sample (tracer.record), 0 if unknown
    shape: tuple | None = None
    dtype: object = None

    @property
    def serves(self) -> int | None:
        """The layer whose tokens, experts or exchange the node serves: `owner` where a slot runs
        another layer's work (an interweaved slot runs the previous layer's experts), else `layer`."""
        return self.layer if self.owner is None else self.owner

    def update(self, **fields) -> "NodeMeta":
        for name, value in fields.items():
            self[name] = value
        return self

    def __getitem__(self, name: str):
        if name not in _NODE_META_FIELDS:
            raise KeyError(f"moedit node meta has no field {name!r}; fields: {sorted(_NODE_META_FIELDS)}")
        return getattr(self, name)

    def __setitem__(self, name: str, value) -> None:
        self[name]  # noqa: B018  (an unknown field is a KeyError)
        setattr(self, name, value)

    def get(self, name: str, default=None):
        value = self[name]
        return default if value is None else value

    def __contains__(self, name: str) -> bool:
        return self.get(name) is not None


_NODE_META_FIELDS = frozenset(field.name for field in dataclasses.fields(NodeMeta))


class _Untagged(NodeMeta):
    """What `meta` returns for a node moedit has not tagged: reads give the defaults, writes
    are refused (they would land on a throwaway object); tag such a node with `tag`."""

    __slots__ = ()

    def __setattr__(self, name, value):
        raise RuntimeError(f"this node has no moedit meta to set {name!r} on; tag it with moedit.graph.tag(node, ...)")


_UNTAGGED = _Untagged.__new__(_Untagged)
for _field in dataclasses.fields(NodeMeta):
    object.__setattr__(_UNTAGGED, _field.name, _field.default)


def meta(node: fx.Node) -> NodeMeta:
    """The node's moedit meta (a read-only empty one if it has none)."""
    return node.meta.get(META) or _UNTAGGED


def tag(node: fx.Node, **fields) -> NodeMeta:
    """Set fields of the node's moedit meta, creating it if it has none."""
    if not isinstance(node.meta.get(META), NodeMeta):
        node.meta[META] = NodeMeta()
    return node.meta[META].update(**fields)


def kind_of(node: fx.Node) -> Kind | None:
    return meta(node).get("kind")


def run_input(gm: fx.GraphModule) -> fx.Node:
    """The program's `run` placeholder (see [Note: the run input])."""
    for node in gm.graph.find_nodes(op="placeholder"):
        if kind_of(node) is Kind.RUN:
            return node
    raise RuntimeError("graph has no `run` input; trace models with moedit.tracer.trace")


class LayerNodes:
    """The nodes of one MoE layer, by kind: `nodes[Kind.WEIGHTS]` (exactly one, or an error;
    after a stale pass a slot also holds another layer's exchange, so take the snapshot
    before rewriting). `all(kind)` lists every node of a kind."""

    def __init__(self, gm: fx.GraphModule, layer: int):
        self.layer = layer
        self.nodes = [n for n in gm.graph.nodes if meta(n).get("layer") == layer]

    def all(self, kind: Kind) -> list[fx.Node]:
        return [n for n in self.nodes if kind_of(n) is kind]

    def __getitem__(self, kind: Kind) -> fx.Node:
        found = self.all(kind)
        if len(found) != 1:
            raise RuntimeError(f"layer {self.layer} has {len(found)} {kind} nodes where one was expected")
        return found[0]


@dataclasses.dataclass(frozen=True)
class Inserted:
    """One node a pass inserted, as the pass log records it."""

    node: str
    layer: int | None  # None: not part of a MoE layer
    kind: str
    bytes_per_token: int = 0  # bytes this node sends per routed token slot (communication only)
    staleness: int = 0  # steps between the activations it reads and the step that consumes it
    share: float = 1.0  # the share of the layer's tokens it handles (1/N for one of N chunks)


class Emitter:
    """Creates one layer's nodes at the graph's insertion point, named `l<layer>_<kind>`,
    tagged with `meta["moedit"]`, and records each one that is a step (not a plain value)
    in `inserted`. Stateful ops get the program's `run` input as first argument."""

    def __init__(self, gm: fx.GraphModule, layer: int | None, staleness: int = 0, prefix: str | None = None):
        """`layer`: the MoE layer the nodes belong to, or None for nodes outside MoE layers, which
        are then named `<prefix>_<kind>` (e.g. "a3" for attention 3) instead of `l<layer>_<kind>`."""
        self.graph, self.layer, self.staleness = gm.graph, layer, staleness
        self.prefix = prefix or f"l{layer}"
        self.run = run_input(gm)
        self.inserted: list[Inserted] = []
        self.chunk: int | None = None  # set while emitting one chunk of a chunked layer ...
        self.chunks = 1  # ... of this many

    def _node(self, kind: Kind, op: str, target, args, kwargs, bytes_per_token: int, staleness: int | None,
              name: str | None = None):
        # "l3_dispatch_start": no trailing number, so fx numbers repeats "l3_dispatch_start_1"
        name = f"{self.prefix}_{name or (target.__name__ if kind is Kind.GLUE else kind.value)}"
        node = self.graph.create_node(op, target, tuple(args), kwargs or {}, name=name)
        stale = self.staleness if staleness is None else staleness
        node.meta[META] = NodeMeta(kind, self.layer, staleness=stale, chunk=self.chunk,
                                   where=self.prefix if self.layer is None else None)
        if kind not in VALUES:
            self.inserted.append(Inserted(node=node.name, layer=self.layer, kind=kind.value,
                                          bytes_per_token=bytes_per_token, staleness=stale,
                                          share=1.0 if self.chunk is None else 1 / self.chunks))
        return node

    def call(self, kind: Kind, fn, *args, bytes_per_token: int = 0, staleness: int | None = None, **kwargs):
        """A call_function node; ops marked `stateful` receive `run` first."""
        if getattr(fn, "stateful", False):
            args = (self.run, *args)
        return self._node(kind, "call_function", fn, args, kwargs, bytes_per_token, staleness)

    def module(self, kind: Kind, target: str, *args, stateful: bool = False, staleness: int | None = None,
               kwargs: dict | None = None):
        """A call_module node for submodule `target`, called with `args` and `kwargs`; `stateful`
        modules receive `run` first."""
        args = (self.run, *args) if stateful else args
        return self._node(kind, "call_module", target, args, kwargs, 0, staleness)

    def method(self, kind: Kind, name: str, *args):
        return self._node(kind, "call_method", name, args, None, 0, None)

    def unpack(self, node: fx.Node, *kinds: Kind) -> list[fx.Node]:
        """The items of a tuple-valued node, one node per kind."""
        return [self._node(kind, "call_function", operator.getitem, (node, i), None, 0, None)
                for i, kind in enumerate(kinds)]

    def field(self, record: fx.Node, name: str) -> fx.Node:
        """A field of an `InFlight` record: the exchange ("pending"), "order" or the counts."""
        kind = Kind.PENDING if name == "pending" else Kind.GLUE
        return self._node(kind, "call_function", getattr, (record, name), None, 0, None, name=f"carried_{name}")


def copy_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule over a copy of `gm`'s graph (meta copied one level deep, moedit's
    own `NodeMeta` included); submodules are shared, not copied."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    for old, new in zip(gm.graph.nodes, graph.nodes):
        new.meta = {k: (dict(v) if isinstance(v, dict) else copy.copy(v) if isinstance(v, NodeMeta) else v)
                    for k, v in old.meta.items()}
    return fx.GraphModule(gm, graph, class_name=gm.__class__.__name__)
