"""The pass pipeline: plain functions over an fx graph, a verifier after each.

A pass is `fn(gm, ctx) -> PassResult`. It rewrites `gm` in place (or returns a new
module), says truthfully whether it changed anything, and records each node it inserted
as an `Inserted` row (moedit/graph.py). `ctx` says what is being built: the plan, the
rank, the layer table, the kind of diffusion step the program runs, and which layers
the plan keeps synchronous.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable, NamedTuple

import torch.fx as fx
from torch import nn

from .adapters import MoEAdapter, adapter_for
from .graph import META, Inserted
from .plan import Plan
from .steps import StepKind
from .tracer import moe_nodes
from .verify import verify_graph

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MoELayer:
    """What a pass needs to know of one MoE layer, read once from the traced model."""

    index: int
    path: str  # module path in the model, e.g. "blocks.3.moe"
    adapter: MoEAdapter
    num_experts: int
    top_k: int
    hidden_size: int
    element_size: int  # bytes per activation element
    sharded: bool = True  # the experts are submodules, so a rank drops other ranks' (see [Note: adapter shapes])

    @classmethod
    def of(cls, gm: fx.GraphModule, node: fx.Node) -> "MoELayer":
        moe = gm.get_submodule(node.target)
        adapter = adapter_for(moe)
        experts = adapter.experts(moe)
        weight = next(experts[0].parameters(), None)
        weight = next(moe.parameters()) if weight is None else weight
        submodules = {id(m) for m in moe.modules()}
        return cls(index=node.meta[META]["layer"], path=node.target, adapter=adapter,
                   num_experts=len(experts), top_k=adapter.top_k(moe), hidden_size=adapter.hidden_size(moe),
                   element_size=weight.element_size(), sharded=all(id(e) in submodules for e in experts))

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's activation row, as the exchanges send it."""
        return self.hidden_size * self.element_size


@dataclasses.dataclass(frozen=True)
class PassContext:
    plan: Plan
    world_size: int
    rank: int
    layers: tuple[MoELayer, ...]
    step: StepKind  # the kind of diffusion step this program runs
    synchronous_layers: frozenset[int] = frozenset()  # layers the plan never runs stale (all under mode sync)
    chunks: int = 1  # how many pipelined chunks the synchronous layers' tokens travel in
    kernels: str = "torch"  # "torch" or "triton" (the plan's `kernels`, resolved for this machine)

    @property
    def ep_size(self) -> int:
        """Ranks the routed experts are sharded over (this rank's expert-parallel group)."""
        return self.plan.mesh.ep

    @property
    def ep_rank(self) -> int:
        """This rank's place in its expert-parallel group: it holds experts e with e % ep_size == ep_rank."""
        return self.plan.mesh.index("ep", self.rank)

    @property
    def stale_layers(self) -> tuple[MoELayer, ...]:
        """The layers the plan runs stale on stale steps (on synchronous steps the stale
        passes only make them fill the caches the next stale step reads)."""
        if self.plan.staleness.mode == "sync":
            return ()
        return tuple(layer for layer in self.layers if layer.index not in self.synchronous_layers)


class PassResult(NamedTuple):
    gm: fx.GraphModule
    changed: bool
    inserted: list[Inserted]


PassFn = Callable[[fx.GraphModule, PassContext], PassResult]


class PassError(RuntimeError):
    """A pass broke a graph invariant; the message names the passes that ran."""


def layers_of(gm: fx.GraphModule) -> tuple[MoELayer, ...]:
    return tuple(MoELayer.of(gm, node) for node in moe_nodes(gm))


def run_passes(gm: fx.GraphModule, ctx: PassContext, passes: list[PassFn]) -> tuple[fx.GraphModule, list[dict]]:
    """Run `passes` in order, verifying the graph after each. Returns the module and the pass log."""
    pass_log = []
    for fn in passes:
        name = fn.__name__
        result = fn(gm, ctx)
        gm = result.gm
        try:
            verify_graph(gm)
        except RuntimeError as err:
            ran = ", ".join([entry["pass"] for entry in pass_log] + [name])
            raise PassError(f"graph invariant broken after pass {name!r} on rank {ctx.rank}, program {ctx.step} "
                            f"(passes run: {ran}): {err}") from err
        gm.recompile()
        log.debug("rank %d, %s program, after %s:\n%s", ctx.rank, ctx.step, name, gm.code)
        pass_log.append({"pass": name, "rank": ctx.rank, "program": ctx.step.name, "changed": result.changed,
                         "inserted": [dataclasses.asdict(row) for row in result.inserted]})
    return gm, pass_log


def shallow_copy(module: nn.Module) -> nn.Module:
    """A new module object of the same class sharing `module`'s parameters, buffers and
    children; adding a child to the copy leaves the original untouched."""
    clone = module.__new__(type(module))
    clone.__dict__ = dict(module.__dict__)
    clone._parameters = dict(module._parameters)
    clone._buffers = dict(module._buffers)
    clone._modules = dict(module._modules)
    return clone


def strip_modules(module: nn.Module, replace: dict[int, nn.Module]) -> nn.Module:
    """A shallow copy of `module` in which each submodule whose id is in `replace` is swapped
    for its replacement. Untouched subtrees are shared with the original."""
    if id(module) in replace:
        return replace[id(module)]
    clone = shallow_copy(module)
    clone._modules = {name: child if not any(id(m) in replace for m in child.modules()) else
                      strip_modules(child, replace) for name, child in module._modules.items()}
    return clone
