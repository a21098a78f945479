"""Tracing: the whole model into one fx graph, with MoE layers and attention as leaves.

Every MoE call node gets `node.meta["moedit"] = {"kind": Kind.MOE, "layer": i}` in program
order; attention (a leaf with an attention adapter) gets `{"kind": Kind.ATTENTION}`; other
registered leaves stay untagged. Passes find layers through that
meta, never through module names. The graph gains a last input, `run` (see [Note: the
run input] in graph.py).
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from .adapters import adapter_for, attention_adapter_for, is_registered_leaf
from .graph import RUN, Kind, kind_of, tag


class TraceError(TypeError):
    """A model that fx cannot trace as it is; the message names the module and the fix."""


class MoeditTracer(fx.Tracer):
    """Keeps MoE layers and registered leaves (attention) opaque, and remembers which
    module was being traced so a failure can name it."""

    def __init__(self):
        super().__init__()
        self.failed_in: tuple[str, type] | None = None  # the innermost module whose forward raised

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return adapter_for(m) is not None or is_registered_leaf(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = (self.path_of_module(m), type(m))
            raise


def trace(model: nn.Module) -> fx.GraphModule:
    """Trace `model` and annotate its MoE and attention nodes. Raises TraceError."""
    gm = fx.GraphModule(model, traced_graph(MoeditTracer(), model, model), class_name=type(model).__name__)
    annotate(gm, model)
    return gm


def traced_graph(tracer: MoeditTracer, root: nn.Module, model: nn.Module,
                 inputs: str | None = None) -> fx.Graph:
    """`tracer.trace(root)`, any failure turned into one actionable TraceError. `inputs`: the
    example inputs' description, when capturing for them (moedit/capture.py)."""
    try:
        return tracer.trace(root)
    except TraceError:
        raise
    except Exception as err:  # fx raises many kinds; each becomes one actionable message
        if tracer.failed_in is None and inputs is not None:
            raise TraceError(f"cannot capture {type(model).__name__}.forward for {inputs}: {type(err).__name__}: "
                             f"{err}") from err
        if tracer.failed_in is None:
            raise TraceError(
                f"cannot trace {type(model).__name__}.forward symbolically: {type(err).__name__}: {err}. If it "
                "branches or loops on its inputs' shapes, capture it for example inputs instead: "
                "moedit.compile(model, plan, example_inputs={...the forward's keyword arguments...}) (docs/models.md, "
                "'Models from diffusers')"
            ) from err
        where, cls = tracer.failed_in
        raise TraceError(
            f"cannot trace module {where!r} ({cls.__name__}): {type(err).__name__}: {err}. "
            f"If it is a MoE layer, describe it with moedit.register_adapter({cls.__name__}, adapter); "
            f"if it holds data-dependent Python (int(tensor), `if tensor:`), keep it opaque with "
            f"moedit.register_leaf({cls.__name__})"
        ) from err


def annotate(gm: fx.GraphModule, model: nn.Module) -> None:
    """Tag the MoE nodes with their layer index (in program order) and the attention nodes,
    and add the `run` input."""
    layer = attention = 0
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if adapter_for(module) is not None:
            tag(node, kind=Kind.MOE, layer=layer)
            layer += 1
        elif attention_adapter_for(module) is not None:
            tag(node, kind=Kind.ATTENTION)
            attention += 1
    if layer == 0 and attention == 0:  # a dense model with attention moedit knows is fine for the xDiT plans
        raise TraceError(
            f"{type(model).__name__} has no MoE layer moedit recognises; register an adapter for its MoE "
            "class with moedit.register_adapter(MoEClass, adapter) (see docs/models.md, 'Adding an adapter')"
        )
    _add_run_input(gm)


def _add_run_input(gm: fx.GraphModule) -> None:
    placeholders = gm.graph.find_nodes(op="placeholder")
    if any(node.name == RUN for node in placeholders):
        raise TraceError(f"the model's forward already has an argument named {RUN!r}, which moedit's programs "
                         "take for their run state; rename that argument")
    with gm.graph.inserting_after(placeholders[-1]):
        node = gm.graph.placeholder(RUN, default_value=None)
    tag(node, kind=Kind.RUN)
    gm.recompile()


def moe_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The MoE call nodes of a traced graph, in layer order."""
    return [n for n in gm.graph.nodes if kind_of(n) is Kind.MOE]


def attention_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The attention call nodes of a traced graph (modules with an attention adapter), in order."""
    return [n for n in gm.graph.nodes if kind_of(n) is Kind.ATTENTION]


class _Sizes(fx.Interpreter):
    """Runs a traced graph on fake tensors and records each node's output bytes and shape; MoE
    leaves, whose routing is data-dependent, stand in as shape-preserving."""

    def run_node(self, node: fx.Node):
        if kind_of(node) is Kind.MOE:  # in the structure the layer returns (its adapter's `output`)
            moe = self.module.get_submodule(node.target)
            out = adapter_for(moe).output(moe, torch.empty_like(self.env[node.args[0]]))
        else:
            out = super().run_node(node)
        tag(node, **record(out))
        return out


def record(value) -> dict:
    """What the passes read of a node's output: its "bytes", "shape" and "dtype" (0 / None unless a tensor)."""
    is_tensor = isinstance(value, torch.Tensor)
    return {"bytes": value.numel() * value.element_size() if is_tensor else 0,
            "shape": tuple(value.shape) if is_tensor else None, "dtype": value.dtype if is_tensor else None}


def record_sizes(gm: fx.GraphModule, model: nn.Module) -> bool:
    """Record in `node.meta["moedit"]` the size ("bytes") and "shape" of every node's output for
    one sample, if the model says how to build its inputs (`model.example_inputs(batch)`). The
    scheduler keeps its memory budget with the sizes; sequence parallelism finds the token
    axis with the shapes. Returns whether they were recorded."""
    if not hasattr(model, "example_inputs"):
        return False
    with FakeTensorMode(allow_non_fake_inputs=True):
        _Sizes(gm).run(*model.example_inputs(1), None)
    return True
