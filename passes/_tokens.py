"""Which values of a traced graph hold the image's tokens, and in which rows: the layouts
that sequence parallelism splits by (see [Note: joint layouts] in sequence_parallel.py).

A layout says that a value's token dim holds `before` text rows, then the image's rows
(`tokens` of them over all ranks; this rank holds a contiguous piece), then `after` text
rows. Values without a layout are the same on every rank (text, timestep embeddings).
Layouts start where the image's tokens enter the blocks and follow the graph: token-wise ops
keep them, a concatenation along the tokens adds text rows around them, a slice of constant
bounds selects rows (it may keep the image or only text, never cut the image), and an
attention leaf gives each stream it returns the layout of that stream.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from moedit.adapters import Streams, adapter_for, attention_adapter_for, overrides
from moedit.graph import Emitter, Kind, kind_of, meta
from moedit.pipeline import shallow_copy
from moedit.plan import PlanError
from moedit.runtime import ops
from moedit.runtime.sequence_ops import JointOutput, JointProjections, KVAttention, join_rows, take_rows
from moedit.tracer import moe_nodes


class Layout(NamedTuple):
    before: int  # text rows ahead of the image's
    tokens: int  # the image's rows over all ranks
    after: int  # text rows after them
    dim: int = 1  # the token dim

    @property
    def total(self) -> int:
        return self.before + self.tokens + self.after


def call_arguments(gm: fx.GraphModule, node: fx.Node) -> dict[str, Any]:
    """A leaf's call, by the names of its forward's parameters (`**kwargs` spread out)."""
    signature = inspect.signature(gm.get_submodule(node.target).forward)
    args = {}
    for name, value in signature.bind(*node.args, **node.kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            args.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            raise PlanError(f"{node.target}: attention called with extra positional arguments; moedit names its "
                            "streams by parameter")
        else:
            args[name] = value
    return args


def streams_of(gm: fx.GraphModule, node: fx.Node) -> tuple[Streams, dict[str, Any]]:
    """An attention leaf's streams (a plain self-attention: its first argument) and its call."""
    attn = gm.get_submodule(node.target)
    args = call_arguments(gm, node)
    streams = attention_adapter_for(attn).streams(attn)
    if streams is None:
        first = next(iter(inspect.signature(attn.forward).parameters))
        if any(value is not None for name, value in args.items() if name != first):
            raise PlanError(f"{node.target} is called with more than the hidden states ({node.format_node()}); its "
                            "adapter describes self-attention over one token sequence: give it `streams` (see "
                            "[Note: attention streams] in moedit/adapters.py)")
        streams = Streams(queries=(first,), keys=(first,), image=first)
    return streams, args


class TokenSplit:
    """Cut the image's tokens where they enter the blocks, follow their layouts through the graph,
    and gather them where they leave (the caller splits the attention leaves, `on_attention`)."""

    def __init__(self, gm: fx.GraphModule, blocks: set[str], emit: Emitter, axis: str | None, parts: int, index: int,
                 technique: str, even: bool = True):
        """`even`: the parts must divide the image's tokens (PipeFusion's patches may not, unless
        the model slices its token rows)."""
        self.gm, self.blocks, self.emit, self.axis = gm, blocks, emit, axis
        self.parts, self.index, self.technique, self.even = parts, index, technique, even
        self.layouts: dict[fx.Node, Any] = {}
        self.cuts: list[fx.Node] = []  # every `take_rows` of a value that all parts hold whole
        self._gathered: dict[fx.Node, fx.Node] = {}
        self._cut: dict[tuple, fx.Node] = {}

    # -- where the tokens are ------------------------------------------------------------
    def inside(self, node: fx.Node) -> bool:
        paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        return any(path in self.blocks for path in paths) or meta(node).get("layer") is not None

    def seed_from(self, attentions: list[fx.Node]) -> int:
        """`seed` from the first attention argument that holds the image's tokens alone."""
        for node in attentions:
            streams, args = streams_of(self.gm, node)
            if streams.image is not None and isinstance(args.get(streams.image), fx.Node):
                return self.seed(args[streams.image])
        raise PlanError(f"{self.technique}: no attention layer names the argument that holds the image's tokens "
                        "alone (Streams.image in its adapter), so moedit cannot tell where they enter")

    def mark_expert_choice(self) -> None:
        """Tell expert_parallel which MoE layers see split images, so that an expert choice routed in
        two steps chooses over every token of each image (see [Note: adapter shapes] in moedit/adapters.py)."""
        for node in moe_nodes(self.gm):
            layout = self.layouts.get(node.args[0])
            if layout is None or not overrides(adapter_for(self.gm.get_submodule(node.target)), "choose"):
                continue
            if layout.before or layout.after:
                raise PlanError(f"{self.technique}: the expert choice of {node.target} would choose among text "
                                "tokens that every rank holds as well as the image's split ones; moedit chooses "
                                "over a whole image only for layers that see image tokens alone")
            meta(node).update(split=(layout, self.axis, self.parts, self.index))

    def seed(self, image: fx.Node) -> int:
        """Cut the values that carry the image's tokens into the blocks, walking back from the first
        attention's image argument; returns the image's token count."""
        shape = meta(image).get("shape")
        if shape is None or len(shape) < 3:
            raise PlanError(f"{self.technique} needs the model's activation shapes: give the model an "
                            "`example_inputs(batch)` method, or compile with example_inputs=")
        tokens, pending, seen = shape[1], [image], set()
        if self.even and tokens % self.parts:
            raise PlanError(f"{self.technique}: its degree ({self.parts} ranks) must divide the tokens per image "
                            f"({tokens}); choose degrees whose product divides {tokens}")
        while pending:
            value = pending.pop()
            if value in seen:
                continue
            seen.add(value)
            if self.inside(value):
                pending += [a for a in value.all_input_nodes
                            if _token_count(a) == tokens and len(meta(a).get("shape")) >= 3]
                continue
            with self.gm.graph.inserting_after(value):
                piece = self.emit.call(Kind.SHARD, take_rows, value, Layout(0, tokens, 0), self.parts, self.index)
            self.layouts[piece] = Layout(0, tokens, 0)
            self.cuts.append(piece)
            value.replace_all_uses_with(piece, delete_user_cb=lambda user: user is not piece and self.inside(user))
        return tokens

    def cut(self, value, layout: Layout, element: int | None = None):
        """This rank's rows of `value` (same on every rank, every row of `layout`)."""
        if isinstance(value, fx.Node) and value in self.layouts and element is None:
            if self.layouts[value] != layout:
                raise PlanError(f"{self.technique}: {value.format_node()} holds the image's rows as "
                                f"{self.layouts[value]}, where {layout} is needed")
            return value
        key = (value if isinstance(value, fx.Node) else tuple(value), layout, element)
        if key not in self._cut:
            anchor = value if isinstance(value, fx.Node) else max(value, key=_position)
            with self.gm.graph.inserting_after(anchor):
                self._cut[key] = self.emit.call(Kind.SHARD, take_rows, value, layout, self.parts, self.index,
                                                element)
            self.cuts.append(self._cut[key])
        return self._cut[key]

    def gather(self, value: fx.Node, name: str = "gather of the tokens") -> fx.Node:
        """`value` with every rank's rows, in the model's order."""
        if value not in self._gathered:
            with self.gm.graph.inserting_before(value.next):
                pending = self.emit.call(Kind.GATHER_START, ops.gather_start, value, name=name,
                                         layer=None, axis=self.axis)
                self._gathered[value] = self.emit.call(Kind.GLUE, join_rows,
                                                       self.emit.call(Kind.GATHER_WAIT, ops.wait, pending),
                                                       self.layouts[value])
        return self._gathered[value]

    # -- following them ------------------------------------------------------------------
    def follow(self, on_attention) -> None:
        """Give every node its layout in graph order; `on_attention(node)` replaces an attention
        leaf by its split and returns (the node that stands for it, the layouts of what it returns)."""
        for node in list(self.gm.graph.nodes):
            if node.op == "output":
                node.args = map_arg(node.args, lambda v: self.gather(v) if v in self.layouts else v)
            elif kind_of(node) is Kind.ATTENTION:
                if any(a in self.layouts for a in node.all_input_nodes):
                    result, layouts = on_attention(node)
                    self.layouts[result] = layouts
            elif node.op in ("call_function", "call_method", "call_module") and node not in self.layouts:
                laid = [a for a in node.all_input_nodes if a in self.layouts]
                if laid:
                    self._follow(node, laid)

    def _follow(self, node: fx.Node, laid: list[fx.Node]) -> None:
        first = self.layouts[laid[0]]
        if kind_of(node) is not None:  # a MoE layer's own nodes: token-wise as a whole
            self.layouts[node] = first
        elif node.target is operator.getitem and isinstance(first, tuple) and not isinstance(first, Layout):
            layout = first[node.args[1]]  # one stream of an attention's output
            if layout is not None:
                self.layouts[node] = layout
        elif node.target is torch.cat and self._dim(node, node.args[1] if len(node.args) > 1 else
                                                    node.kwargs.get("dim", 0)) == first.dim:
            self._follow_cat(node)
        elif node.target is operator.getitem and self._slices_tokens(node, first):
            self._follow_slice(node, first)
        else:
            self._follow_token_wise(node, laid)

    def _dim(self, node: fx.Node, dim: int) -> int:
        shape = meta(node).get("shape")
        return dim % len(shape) if shape is not None and dim < 0 else dim

    def _follow_cat(self, node: fx.Node) -> None:
        values = node.args[0]
        laid = [v for v in values if v in self.layouts]
        if len(laid) > 1:
            self._refuse(node, "joins two values that hold the image's tokens")
        layout = self.layouts[laid[0]]
        lengths = [_token_count(v, layout.dim) for v in values]
        at = values.index(laid[0])
        self.layouts[node] = Layout(layout.before + sum(lengths[:at]), layout.tokens,
                                    layout.after + sum(lengths[at + 1:]), layout.dim)

    def _slices_tokens(self, node: fx.Node, layout) -> bool:
        index = node.args[1]
        return (isinstance(layout, Layout) and isinstance(index, tuple) and len(index) > layout.dim
                and all(i == slice(None) for i in index[: layout.dim]) and isinstance(index[layout.dim], slice)
                and index[layout.dim] != slice(None))

    def _follow_slice(self, node: fx.Node, layout: Layout) -> None:
        """A slice of constant bounds along the tokens: rewritten to this rank's rows."""
        index = node.args[1]
        start, stop, step = index[layout.dim].indices(layout.total)
        image_start, image_stop = layout.before, layout.before + layout.tokens
        piece = layout.tokens // self.parts
        if step != 1:
            self._refuse(node, "slices the tokens with a step")
        if layout.tokens % self.parts:
            self._refuse(node, f"slices the token rows, which needs {self.parts} parts that divide the image's "
                               f"{layout.tokens} tokens")
        if stop <= image_start or start >= image_stop:  # text rows only: the same on every rank
            shift = 0 if stop <= image_start else layout.tokens - piece
            rows = slice(start - shift, stop - shift)
        elif start <= image_start and stop >= image_stop:
            rows = slice(start, stop - layout.tokens + piece)
            self.layouts[node] = Layout(image_start - start, layout.tokens, stop - image_stop, layout.dim)
        else:
            self._refuse(node, "cuts into the image's tokens")
        node.args = (node.args[0], (*index[: layout.dim], rows, *index[layout.dim + 1:]))

    def _follow_token_wise(self, node: fx.Node, laid: list[fx.Node]) -> None:
        layout = self.layouts[laid[0]]
        shape = meta(node).get("shape")
        token_wise = (isinstance(layout, Layout) and all(self.layouts[a] == layout for a in laid)
                      and _token_count(node, layout.dim) == layout.total
                      and all(len(meta(a).get("shape") or ()) in (0, len(shape)) for a in laid))
        tuple_of_tokens = node.target in _SPLITS and all(u.target is operator.getitem for u in node.users)
        if token_wise or (tuple_of_tokens and isinstance(layout, Layout)):
            for arg in node.all_input_nodes:  # a value of every row used with this rank's rows: cut it too
                if arg not in self.layouts and _token_count(arg, layout.dim) == layout.total \
                        and len(meta(arg).get("shape") or ()) == len(shape or ()):
                    node.replace_input_with(arg, self.cut(arg, layout))
            self.layouts[node] = layout
        elif self.inside(node):
            self._refuse(node, f"turns token values into a value of shape {shape}")
        else:  # leaving the tokens' region (un-patchifying, say): every rank's rows
            for arg in laid:
                node.replace_input_with(arg, self.gather(arg))

    def _refuse(self, node: fx.Node, what: str):
        raise PlanError(f"{self.technique}: {node.format_node()} {what}; with the image's tokens split over ranks "
                        "each rank holds only its rows, so moedit cannot split this model's tokens")


@dataclasses.dataclass
class JointCall:
    """An attention leaf's call with its token arguments (and RoPE tables, masks) cut to this
    rank's rows, the layouts of its joined queries and keys, the key mask in the model's key
    order, its scale, and the layouts of what it returns."""

    args: dict[str, Any]
    queries: Layout
    keys: Layout
    mask: Any
    scale: float | None
    returned: Any


def joint_call(gm: fx.GraphModule, node: fx.Node, split: TokenSplit, kv_buffer: bool = False) -> JointCall:
    """Prepare attention leaf `node` for splitting: its call as this rank sees it, and a copy of its
    module holding graph nodes for its projections (`sp_qkv`), output (`sp_out`) and, with
    `kv_buffer`, attention to a K/V buffer (`sp_attend`)."""
    streams, args = streams_of(gm, node)
    present = [name for name in dict.fromkeys(streams.queries + streams.keys) if args.get(name) is not None]
    layout = {name: split.layouts.get(args[name]) or _text(args[name]) for name in present}
    queries, keys = (_joined(node, [layout[s] for s in names if s in layout], split.technique)
                     for names in (streams.queries, streams.keys))
    for path, (stream, dim) in streams.aligned.items():
        name, _, element = path.partition(".")
        target = {"queries": queries, "keys": keys}.get(stream) or layout.get(stream)
        if args.get(name) is not None and target is not None and target.tokens:
            args[name] = split.cut(args[name], target._replace(dim=dim), int(element) if element else None)
    mask = args.get(streams.key_mask) if streams.key_mask else None
    if isinstance(mask, fx.Node) and mask in split.layouts:
        mask = split.gather(mask)
    attn = gm.get_submodule(node.target)
    adapter = attention_adapter_for(attn)
    local = shallow_copy(attn)
    local.add_module("sp_qkv", JointProjections(adapter, local, streams.queries[0]))
    local.add_module("sp_out", JointOutput(adapter, local))
    scale = adapter.scale(attn)
    if kv_buffer:
        local.add_module("sp_attend", KVAttention(scale))
    parent, _, name = node.target.rpartition(".")
    setattr(gm.get_submodule(parent), name, local)
    returned = tuple(layout.get(s) if layout.get(s) is not None and layout[s].tokens else None
                     for s in streams.returned())
    return JointCall(args, queries, keys, mask, scale, returned if len(returned) > 1 else returned[0])


def _text(value) -> Layout | None:
    """The layout of a token stream every rank holds whole (text): no image rows."""
    shape = meta(value).get("shape") if isinstance(value, fx.Node) else None
    return None if shape is None else Layout(shape[1], 0, 0)


def _joined(node: fx.Node, layouts: list[Layout | None], technique: str) -> Layout:
    """The layout of streams joined along the tokens, in order."""
    if any(layout is None for layout in layouts):
        raise PlanError(f"{technique}: {node.target}: a token stream of this attention has no recorded shape")
    image = [i for i, layout in enumerate(layouts) if layout.tokens]
    if len(image) != 1:
        raise PlanError(f"{technique}: {node.target} attends over {len(image)} streams holding the image's tokens; "
                        "moedit splits attention whose queries and keys each hold them once")
    at = image[0]
    return Layout(sum(l.total for l in layouts[:at]) + layouts[at].before, layouts[at].tokens,
                  layouts[at].after + sum(l.total for l in layouts[at + 1:]))


_SPLITS = frozenset({"chunk", "split", "unbind", "tensor_split", torch.chunk, torch.split, torch.unbind,
                     torch.tensor_split})  # ops returning a tuple of pieces, each followed by its getitem


def _token_count(node, dim: int = 1) -> int | None:
    shape = meta(node).get("shape") if isinstance(node, fx.Node) else None
    return shape[dim] if shape is not None and len(shape) > dim else None


def _position(node: fx.Node) -> int:
    return list(node.graph.nodes).index(node)
