"""Shape-specialised capture: models whose forward reads its inputs' shapes.

A model from a library (diffusers' `HiDreamImageTransformer2DModel`, say) prepares its
inputs in Python that fx cannot trace symbolically: `if x.shape[-2] != x.shape[-1]`,
loops over the images of a batch, `torch.zeros(batch_size, ...)`. moedit captures such a
forward the way `torch.compile` with static shapes does: for one input signature (the
shapes, dtypes and devices of the tensor inputs, and the values of everything else).

    compiled = moedit.compile(model, plan, example_inputs=dict(hidden_states=x, timesteps=t, ...))

While tracing, every fx proxy carries the value the same operation gives on the example
inputs. Questions about shape, dtype and device are answered from it, so Python that
branches or loops on them runs once, at capture time, and the graph holds the branch taken;
everything computed from tensor *values* stays in the graph. A branch on a tensor's values
(`if (x > 0).any():`) is refused, not specialised: it would silently hold only for the
example. Constants computed from shapes alone (position ids, masks) are computed once and
kept in the graph as constants; a module with weights called on them is recorded, not
computed, so weights loaded after compiling still count; and a shape-made tensor that an
input's values are written into stops being a constant (see [Note: writes into constants]).

The graph's inputs are the tensors found in the call's arguments (nested lists, tuples and
dicts included, in `torch.utils._pytree` order), named after the forward's parameters; its
output is the flat list of output tensors, put back into the forward's return structure
(a tuple, a diffusers `Transformer2DModelOutput`, ...) by `RankProgram.outputs`. A call
with another signature is captured again through `RankProgram.specialise`, on every rank at
the same call (see [Note: compiler and runtime] in program.py). MoE layers stand in as shape-preserving while capturing: their experts may live on
other ranks.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch._prims_common import is_non_overlapping_and_dense_or_false
from torch.overrides import TorchFunctionMode

from .adapters import adapter_for
from .graph import tag
from .pipeline import shallow_copy
from .signature import Signature
from .tracer import MoeditTracer, TraceError, annotate, record, traced_graph

_MISSING = object()


class _ShapedProxy(fx.Proxy):
    """A proxy that answers shape, dtype and device questions from its example value."""

    def _example(self):
        return self.tracer.examples.get(self.node, _MISSING)

    def _tensor(self, what: str) -> torch.Tensor:
        example = self._example()
        if not isinstance(example, torch.Tensor):
            raise TraceError(f"{self.node.format_node()} has no example tensor to read its {what} from")
        return example

    shape = property(lambda self: self._tensor("shape").shape)
    ndim = property(lambda self: self._tensor("ndim").ndim)
    dtype = property(lambda self: self._tensor("dtype").dtype)
    device = property(lambda self: self._tensor("device").device)
    is_cuda = property(lambda self: self._tensor("device").is_cuda)

    def size(self, dim=None):
        return self._tensor("size").size() if dim is None else self._tensor("size").size(dim)

    def dim(self):
        return self._tensor("dim").dim()

    def numel(self):
        return self._tensor("numel").numel()

    def __len__(self):
        example = self._example()
        if example is _MISSING:
            raise TraceError(f"len() of {self.node.format_node()}, which has no example value")
        return len(example)

    def __iter__(self):
        return iter([self[i] for i in range(len(self))])


_IN_PLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                               "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                               "__irshift__", "__imatmul__"})


def _written_by(func, args: tuple, kwargs: dict, kind=torch.Tensor):
    """What an in-place call writes into (`out=`, `t[i] = v`, `t.add_(v)`), if it is a `kind`
    (a tensor, or a proxy for one), else None. `func` may be a method's name."""
    if isinstance(kwargs.get("out"), kind):
        return kwargs["out"]
    name = func if isinstance(func, str) else getattr(func, "__name__", "")
    in_place = name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))
    return args[0] if in_place and args and isinstance(args[0], kind) else None


def _storage(tensor: torch.Tensor) -> int | None:
    with torch._C.DisableTorchFunction():  # a question about the tensor, not a call to trace
        return tensor.untyped_storage().data_ptr() if tensor.untyped_storage().nbytes() else None


class _WrittenConstants(TorchFunctionMode):
    """[Note: writes into constants]
    Python that builds a tensor from shapes alone (`out = torch.zeros(b, n, c)`) runs eagerly
    while capturing: fx sees no proxy in it, so the tensor is a constant. HiDream's patchify
    then writes the latents into it (`out[:, :, :n] = x`): fx records the write, but every
    later read of `out` is plain eager code again, and would fold the example's latents into
    the graph for good. This mode watches every torch call while capturing: the first write
    of a traced value into a real tensor puts a copy of that tensor's storage into the graph
    (`clone` of the constant, fresh at every call), and from then on every call that reads
    that storage -- the tensor itself or any view of it -- reads the graph's copy instead
    (the view as `as_strided` of the copy). A write of such a read into another real tensor
    adopts that one too (`b[:] = a`, `torch.mul(a, 2, out=b)`). Writes into the model's own
    parameters or buffers are refused, before they run (`_refuse_writes_into_the_model`): a
    captured program keeps no module state."""

    def __init__(self, tracer: "ShapeTracer"):
        super().__init__()
        self.tracer = tracer
        self.copies: dict[int, tuple[torch.Tensor, fx.Proxy]] = {}  # storage -> (its base tensor, the graph's copy)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.tracer._eager or getattr(func, "__name__", "") == "__get__":  # example values; .shape and the like
            return func(*args, **kwargs)
        target = _written_by(func, args, kwargs)
        if target is not None and _storage(target) not in (None, *self.copies) and self._traced((args, kwargs)):
            self._adopt(target)  # a traced value (a proxy, or a read of a copy) written into a real tensor
        if not self.copies:
            return func(*args, **kwargs)
        args, kwargs = self.substitute((args, kwargs))
        if any(isinstance(leaf, fx.Proxy) for leaf in pytree.tree_leaves((args, kwargs))):
            return fx.Proxy.__torch_function__(func, types, args, kwargs)  # the call may be a method of a Tensor
        return func(*args, **kwargs)

    def _traced(self, tree) -> bool:
        """Whether `tree` holds a traced value: a proxy, or a tensor whose storage the graph copied."""
        return any(isinstance(leaf, fx.Proxy) or isinstance(leaf, torch.Tensor) and _storage(leaf) in self.copies
                   for leaf in pytree.tree_leaves(tree))

    def _adopt(self, tensor: torch.Tensor) -> None:
        with torch._C.DisableTorchFunction():
            base = tensor if tensor._base is None else tensor._base
        if any(base is t for t in itertools.chain(self.tracer.root.parameters(), self.tracer.root.buffers())):
            raise TraceError("the forward writes traced values into one of the model's parameters or buffers (shape "
                             f"{list(base.shape)}); a captured program keeps no module state: write into a new tensor")
        if not is_non_overlapping_and_dense_or_false(base):  # `clone` keeps the strides of such a tensor, views map onto it
            raise TraceError(f"the forward writes traced values into a tensor made from shapes alone whose elements "
                             f"overlap or leave gaps (shape {list(base.shape)}, strides {list(base.stride())}); "
                             "write into a .contiguous() copy of it")
        constant = self.tracer.create_arg(base)  # a get_attr of the tensor as it is now
        self.tracer.examples[constant] = base
        self.copies[_storage(base)] = (base, self.tracer.proxy(constant).clone())

    def _read(self, tensor: torch.Tensor):
        found = self.copies.get(_storage(tensor))
        if found is None:
            return tensor
        base, copy = found
        with torch._C.DisableTorchFunction():
            view = tuple(tensor.shape), tensor.stride(), tensor.storage_offset() - base.storage_offset()
            whole = view == (tuple(base.shape), base.stride(), 0)
        return copy if whole else torch.as_strided(copy, *view)

    def substitute(self, tree):
        """`tree` with every tensor whose storage the graph holds a copy of replaced by that copy."""
        return pytree.tree_map_only(torch.Tensor, self._read, tree)


class ShapeTracer(MoeditTracer):
    """Traces with every proxy's value on the example inputs alongside (see the module docstring)."""

    def __init__(self, inputs: dict[str, torch.Tensor]):
        super().__init__()
        self.inputs = inputs  # placeholder name -> example tensor
        self.examples: dict[fx.Node, Any] = {}
        self._eager = 0  # > 0 while computing on example values: module attributes are not proxied
        self.written = _WrittenConstants(self)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedProxy(node, self)

    def create_arg(self, a):
        """As fx's, but a tensor whose storage the graph holds a copy of is read from that copy:
        an operand of `proxy + tensor` reaches fx here, not through a torch call."""
        if isinstance(a, torch.Tensor) and not isinstance(a, nn.Parameter):
            read = self.written.substitute(a)
            if isinstance(read, fx.Proxy):
                return read.node
        return super().create_arg(a)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if kind in ("call_function", "call_method"):
            self._refuse_writes_into_the_model(target, args, kwargs or {})
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, fx.Proxy):
            self._eager += 1
            try:
                self.examples[proxy.node] = self._example(kind, target, args, kwargs)
            finally:
                self._eager -= 1
        return proxy

    def _refuse_writes_into_the_model(self, target, args: tuple, kwargs: dict) -> None:
        """A traced in-place write into a parameter or buffer (or a view of one) would run on the
        real weights while capturing and again at every call: refused before either happens."""
        written = _written_by(target, args, kwargs, kind=fx.Proxy)
        example = self.examples.get(written.node) if written is not None else None
        if isinstance(example, torch.Tensor) and _storage(example) is not None:
            state = {_storage(t): name for name, t in itertools.chain(self.root.named_parameters(),
                                                                      self.root.named_buffers())}
            if _storage(example) in state:
                raise TraceError(f"the forward writes into {state[_storage(example)]!r}, one of the model's parameters "
                                 "or buffers; a captured program keeps no module state: write into a new tensor")

    def _example(self, kind, target, args, kwargs):
        if kind == "placeholder":
            return self.inputs.get(target, _MISSING)
        if kind == "output":
            return _MISSING
        args, kwargs = fx.node.map_aggregate((args, kwargs), self._value)
        if kind == "get_attr":
            return _attribute(self.root, target)
        if kind == "call_function":
            return target(*args, **kwargs)
        if kind == "call_method":
            return getattr(args[0], target)(*args[1:], **kwargs)
        module = self.root.get_submodule(target)
        adapter = adapter_for(module)
        if adapter is not None:  # keeps the shape; its experts may live on other ranks (or devices)
            return adapter.output(module, args[0].clone())
        return module(*args, **kwargs)

    def _value(self, value):
        if isinstance(value, fx.Proxy):
            example = self.examples.get(value.node, _MISSING)
            if example is _MISSING:
                raise TraceError(f"{value.node.format_node()} has no example value")
            return example
        return value

    def call_module(self, m, forward, args, kwargs):
        """A module called on values only (example values, or constants made from shapes) is
        computed, not recorded, unless it holds weights: those are recorded with constant
        inputs, so that weights loaded after compiling still count."""
        if not self._eager:
            args, kwargs = self.written.substitute((args, kwargs))
        values_only = not any(isinstance(leaf, fx.Proxy) for leaf in pytree.tree_leaves((args, kwargs)))
        if self._eager or values_only and next(itertools.chain(m.parameters(), m.buffers()), None) is None:
            self._eager += 1
            try:
                return forward(*args, **kwargs)
            finally:
                self._eager -= 1
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        return attr_val if self._eager else super().getattr(attr, attr_val, parameter_proxy_cache)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A branch on a traced value. Shapes, dtypes and devices never get here (they are answered
        as Python values), so the branch reads tensor values (`if x.max() > 0`, `.item()`,
        `.tolist()`): refused, since it would hold only for the example."""
        raise TraceError(f"a Python branch reads the values of {obj.node.format_node()}; capture specialises "
                         "on shapes, never on values, so keep that code in a leaf module (moedit.register_leaf) "
                         "or out of the forward")


def capture(model: nn.Module, args: tuple, kwargs: dict) -> tuple[fx.GraphModule, Signature, pytree.TreeSpec]:
    """Capture `model` for the signature of `model(*args, **kwargs)`: the graph (MoE and attention
    nodes tagged, `run` input added, each node's example shape and size recorded, as
    `trace` and `record_sizes` do), the signature, and the structure of the forward's return
    value (the graph returns its tensors flat). Raises TraceError."""
    signature, tensors = Signature.of(model, args, kwargs)
    examples = [t.clone() for t in tensors]  # capture may write into them
    out_spec: list[pytree.TreeSpec] = []
    root = _specialised(model, signature, out_spec)
    tracer = ShapeTracer(dict(zip(signature.names, examples)))
    with torch.no_grad(), tracer.written:
        graph = traced_graph(tracer, root, model, signature.describe())
    gm = fx.GraphModule(root, graph, class_name=type(model).__name__)
    for node in gm.graph.nodes:
        tag(node, **record(tracer.examples.get(node, _MISSING)))
    annotate(gm, model)
    return gm, signature, out_spec[0]


def _specialised(model: nn.Module, signature: Signature, out_spec: list) -> nn.Module:
    """A shallow copy of `model` whose forward takes the call's tensors, one parameter each,
    and returns the output's tensors as a flat tuple (their structure goes to `out_spec`)."""
    original = type(model).forward

    def flat_call(module, tensors):
        args, kwargs = signature.call(tensors)
        flat, spec = pytree.tree_flatten(original(module, *args, **kwargs))
        out_spec[:] = [spec]
        return tuple(flat)

    namespace = {"_moedit_call": flat_call}
    names = ", ".join(signature.names)
    exec(f"def forward(self, {names}):\n    return _moedit_call(self, [{names}])\n", namespace)  # a signature fx reads
    clone = shallow_copy(model)
    clone.__class__ = type(type(model).__name__, (type(model),), {"forward": namespace["forward"]})
    return clone


def _attribute(root: nn.Module, target: str):
    value = root
    for atom in target.split("."):
        value = getattr(value, atom)
    return value
