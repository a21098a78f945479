"""`moedit.compile` and the `CompiledModel` it returns.

Compiling traces the model once, then runs the pass pipeline on a copy of the graph for
each rank and program. Rank 0's programs are built by `compile` (so a plan that breaks a
pass fails there); the others on first use, so a torchrun process builds only rank 0's
and its own. No process group is needed and no weight is copied: every per-rank module
shares the model's parameters, and holds only the experts that rank owns.
"""

from __future__ import annotations

import json
import logging
import os

import torch.fx as fx
from torch import nn

from moedit.passes.conditional_comm import conditional_comm
from moedit.passes.displace import displace
from moedit.passes.expert_parallel import expert_parallel, local_experts
from moedit.passes.interweave import interweave
from moedit.passes.selective_sync import resolve_auto, selective_sync

from .pipeline import PassContext, copy_module, layers_of, run_passes
from .plan import Plan, PlanError
from .tracer import trace
from .verify import verify_programs

log = logging.getLogger(__name__)

PIPELINE = [expert_parallel, selective_sync, displace, interweave, conditional_comm]


def programs_of(plan: Plan) -> tuple[str, ...]:
    """The per-step programs a plan needs: "sync" always, "async" for a stale mode, and a
    "_drop" twin of each for the non-refresh steps of conditional communication."""
    base = ("sync",) if plan.staleness.mode == "sync" else ("sync", "async")
    if plan.conditional_comm.interval is None:
        return base
    return base + tuple(f"{name}_drop" for name in base)


def _validate(plan: Plan, layers) -> None:
    cc = plan.conditional_comm
    for layer in layers:
        if layer.num_experts % plan.expert_parallel.degree:
            raise PlanError(
                f"expert_parallel.degree: experts ({layer.num_experts}, layer {layer.path}) must be divisible "
                f"by the expert-parallel degree ({plan.expert_parallel.degree}); choose a degree that divides "
                f"{layer.num_experts}"
            )
        if cc.interval is not None and cc.drop != "threshold" and not cc.slots < layer.top_k:
            raise PlanError(f"conditional_comm.slots ({cc.slots}) must be below the top-k of layer {layer.index} "
                            f"({layer.top_k}): at least one slot per token is always sent")


def compile(model: nn.Module, plan: Plan | str | os.PathLike | None = None) -> "CompiledModel":
    """Trace `model`, apply `plan` to every rank's copy of the graph, and return the result.

    `plan` may be a Plan, a path to a YAML/JSON plan, or None for one rank, synchronous.
    """
    if plan is None:
        plan = Plan()
    elif not isinstance(plan, Plan):
        plan = Plan.from_file(plan)
    traced = trace(model)
    layers = layers_of(traced)
    _validate(plan, layers)
    plan, sensitivity = resolve_auto(model, layers, plan)
    compiled = CompiledModel(model, plan, traced, layers, sensitivity)
    compiled.graph(0)
    return compiled


class CompiledModel:
    """Per-rank programs for one model and plan."""

    def __init__(self, model: nn.Module, plan: Plan, traced: fx.GraphModule, layers,
                 sensitivity: list[float] | None = None):
        self.model = model
        self.plan = plan
        self.layers = layers
        self.world_size = plan.world_size
        self.programs = programs_of(plan)
        self.pass_log: list[dict] = []  # one entry per (rank, program, pass), in build order
        self.sensitivity = sensitivity  # per layer, when selective_sync chose "auto"
        self._traced = traced
        self._per_rank: dict[int, dict[str, fx.GraphModule]] = {}

    def _build(self, rank: int) -> dict[str, fx.GraphModule]:
        programs = {}
        for program in self.programs:
            ctx = PassContext(plan=self.plan, world_size=self.world_size, rank=rank, layers=self.layers,
                              program=program)
            programs[program], program_log = run_passes(copy_module(self._traced), ctx, PIPELINE)
            self.pass_log += program_log
        verify_programs(programs)
        return programs

    def graph(self, rank: int, program: str = "sync") -> fx.GraphModule:
        """The rewritten GraphModule rank `rank` runs on steps of kind `program`
        ("sync", or "async" for stale plans; "_drop" twins with conditional communication)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {rank}")
        if program not in self.programs:
            raise ValueError(f"program must be one of {self.programs}, got {program!r}")
        if rank not in self._per_rank:
            self._per_rank[rank] = self._build(rank)
        return self._per_rank[rank][program]

    def explain(self, batch_size: int = 8) -> str:
        """A per-layer table of expert placement, inserted nodes and bytes moved per step."""
        from ._explain import explain

        return explain(self, batch_size)

    def dump(self, directory: str | os.PathLike) -> None:
        """Write each rank's graph code, the pass log, the plan and explain() under `directory`."""
        os.makedirs(directory, exist_ok=True)
        for rank in range(self.world_size):
            for program in self.programs:
                gm = self.graph(rank, program)
                suffix = "" if program == "sync" else f"_{program}"
                with open(os.path.join(directory, f"rank{rank}{suffix}.py"), "w") as f:
                    f.write(gm.code)
        with open(os.path.join(directory, "pass_log.json"), "w") as f:
            json.dump(self.pass_log, f, indent=1)
        with open(os.path.join(directory, "plan.json"), "w") as f:
            json.dump(self.plan.to_dict(), f, indent=1)
        with open(os.path.join(directory, "explain.txt"), "w") as f:
            f.write(self.explain() + "\n")

    def experts_of(self, rank: int) -> list[int]:
        """Global ids of the experts `rank` holds (the same in every layer)."""
        return local_experts(self.layers[0].num_experts, self.world_size, rank)

    def to_runtime(self, device=None):
        """Join (or start) the process group and return this rank's `Runtime`."""
        from moedit.runtime.executor import Runtime

        return Runtime.start(self, device=device)
