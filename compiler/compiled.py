"""`moedit.compile` and the `CompiledModel` it returns.

Compiling traces the model once, resolves the plan into data every later stage reads
(the step kinds, the selectively synchronous layers), then runs the pass pipeline on a
copy of the graph for each rank and step kind. Rank 0's programs are built by `compile`
(so a plan that breaks a pass fails there); the others on first use, so a torchrun
process builds only rank 0's, its own and those of the lower ranks it checks its
collective order against (the first rank of each of its groups, its point-to-point
peers) before it issues a single collective. No process group is needed and no weight
is copied: every per-rank module shares the model's parameters, and holds only the
experts that rank owns. Programs hold no run state (see [Note: the run input] in
graph.py), so one compiled model serves any number of runtimes.
"""

from __future__ import annotations

import functools
import json
import logging
import os

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from moedit.passes.conditional_comm import conditional_comm
from moedit.passes.displace import displace
from moedit.passes.expert_parallel import expert_parallel, local_experts, resolve_chunks
from moedit.passes.interweave import interweave
from moedit.passes.offload import offload
from moedit.passes.patch_parallel import patch_parallel
from moedit.passes.pipefusion import pipefusion
from moedit.passes.schedule import schedule
from moedit.passes.sequence_parallel import cfg_parallel, sequence_parallel
from moedit.passes.shortcut import shortcut, shortcut_rewrite, standard_layers
from moedit.passes.selective_sync import resolve_auto, synchronous_layers
from moedit.runtime.comm import P2P
from moedit.runtime.executor import Runtime, join
from moedit.runtime.expert_ops import swiglu_weights
from moedit.runtime.kernels import resolve as resolve_kernels

from ._explain import explain
from .adapters import batch_dims_for, overrides
from .capture import capture
from .graph import copy_module
from .pipeline import PassContext, PassFn, layers_of, run_passes
from .plan import Plan, PlanError
from .program import RankProgram
from .signature import Signature
from .steps import StepKind, StepPlan
from .tracer import record_sizes, trace
from .verify import collective_order, verify_collective_order, verify_programs, verify_staleness


log = logging.getLogger(__name__)

PIPELINE: list[PassFn] = [shortcut_rewrite, cfg_parallel, sequence_parallel, patch_parallel, expert_parallel, displace,
                          interweave, conditional_comm, pipefusion, shortcut, schedule, offload]


def _validate(plan: Plan, layers, traced: fx.GraphModule) -> None:
    """What the plan asks of this model, checked before any pass runs."""
    if not layers:
        experts = [name for name, asked in (
            ("expert_parallel.degree", plan.expert_parallel.degree > 1), ("staleness.mode", plan.staleness.mode != "sync"),
            ("conditional_comm", plan.conditional_comm.interval is not None), ("shortcut", plan.shortcut.enabled),
            ("offload", plan.offload.enabled)) if asked]
        if experts:
            raise PlanError(f"{', '.join(experts)}: the model has no MoE layer moedit recognises (a dense model "
                            "runs only the sequence, CFG, patch and PipeFusion plans); remove those settings, or "
                            "register an adapter for its MoE class with moedit.register_adapter")
    if plan.shortcut.enabled:
        standard = standard_layers(traced)
        if standard and not plan.shortcut.rewrite:
            raise PlanError(f"shortcut: MoE layers {standard} read their own block's attention output, so their "
                            "exchanges have nothing to overlap but the shared expert; use an ScMoE model (on the "
                            "command line --model digits-scmoe, in Python moedit.models.pretrained('digits-scmoe')), or set shortcut.rewrite: true to feed them "
                            "from the previous block (this changes the model's outputs)")
        if plan.shortcut.rewrite and not standard:
            raise PlanError("shortcut.rewrite: this model's MoE layers already read the previous block (an ScMoE "
                            "model); remove rewrite")
    cc = plan.conditional_comm
    for layer in layers:
        if layer.num_experts % plan.expert_parallel.degree:
            raise PlanError(
                f"expert_parallel.degree: experts ({layer.num_experts}, layer {layer.path}) must be divisible "
                f"by the expert-parallel degree ({plan.expert_parallel.degree}); choose a degree that divides "
                f"{layer.num_experts}"
            )
        if cc.interval is not None and layer.adapter.empty_slots:
            raise PlanError(f"conditional_comm: layer {layer.index} ({layer.path}) routes with empty slots (expert "
                            "choice): its exchanges never carry all K slots, which is when conditional "
                            "communication refreshes the slot outputs it reuses; remove conditional_comm from the plan")
        split = [(name, keys) for name, section, keys in (
            ("sequence_parallel", plan.sequence_parallel, "sequence_parallel.ulysses and sequence_parallel.ring"),
            ("patch_parallel", plan.patch_parallel, "patch_parallel.degree"),
            ("pipefusion", plan.pipefusion, "pipefusion.degree")) if section.degree > 1]
        if split and layer.adapter.empty_slots and not overrides(layer.adapter, "choose"):
            name, keys = split[0]
            raise PlanError(f"{name}: layer {layer.index} ({layer.path}) routes with empty slots (expert "
                            "choice), where the experts choose among the tokens a rank holds; split over ranks, an "
                            "image's tokens would be chosen from a part of it. moedit chooses over the whole image if "
                            "the adapter routes in two steps (scores and choose, see [Note: adapter shapes] in "
                            f"moedit/adapters.py); otherwise set {keys} to 1")
        if plan.offload.enabled and not layer.sharded:
            raise PlanError(f"offload: the experts of layer {layer.index} ({layer.path}) are views of packed "
                            "parameters, not submodules, so they cannot be moved one by one; disable offload, or "
                            "give the adapter per-expert modules")
        if cc.interval is not None and cc.drop != "threshold" and not cc.slots < layer.top_k:
            raise PlanError(f"conditional_comm.slots ({cc.slots}) must be below the top-k of layer {layer.index} "
                            f"({layer.top_k}): at least one slot per token is always sent")


def _kernels(plan: Plan, traced: fx.GraphModule, layers) -> str:
    """The plan's `kernels`, resolved for this machine, backend and model (see moedit/runtime/kernels).
    `auto` that falls back to torch although CUDA is available says why, in a warning."""
    try:
        kernels, why_not = resolve_kernels(plan.kernels, torch.cuda.is_available(), plan.runtime.backend)
    except ValueError as err:
        raise PlanError(str(err)) from None
    if kernels == "triton":
        unfit = [layer.path for layer in layers for expert in layer.adapter.experts(
            traced.get_submodule(layer.path)) if swiglu_weights(expert) is None]
        if unfit and plan.kernels == "triton":
            raise PlanError(f"kernels: triton runs SwiGLU experts (gate_proj, up_proj, down_proj, no bias); the "
                            f"experts of {sorted(set(unfit))} are not; use kernels: torch")
        if unfit:
            kernels, why_not = "torch", (f"the experts of {sorted(set(unfit))} are not SwiGLU (gate_proj, up_proj, "
                                         "down_proj, no bias), which is all the Triton kernels run")
    if why_not is not None:
        log.warning("kernels: auto chose the torch kernels although CUDA is available: %s; set kernels: torch to "
                    "choose them explicitly", why_not)
    return kernels


def compile(model: nn.Module, plan: Plan | str | os.PathLike | None = None, *, example_inputs=None,
            batch_dims: dict[str, int | None] | None = None) -> "CompiledModel":
    """Trace `model`, apply `plan` to every rank's copy of the graph, and return the result.

    `plan` may be a Plan, a path to a YAML/JSON plan, or None for one rank, synchronous.
    `example_inputs` (a dict of the forward's keyword arguments, or a tuple of positional
    ones): capture the forward for these inputs' shapes instead of tracing it symbolically,
    for models whose forward branches or loops on shapes (see moedit/capture.py).
    `batch_dims`: the batch axis of each forward argument whose batch axis is not the first
    (by the name the program gives it, e.g. {"encoder_hidden_states_llama3": 1}; None: not
    split); `Runtime.denoise` splits inputs along it. Default: what `register_batch_dims`
    registered for the model's class (the shipped diffusers adapters do for HiDream-I1).
    """
    if plan is None:
        plan = Plan()
    elif not isinstance(plan, Plan):
        plan = Plan.from_file(plan)
    signature = None
    if example_inputs is None:
        traced = trace(model)
        if (plan.schedule.policy == "overlap" or plan.sequence_parallel.degree > 1 or plan.patch_parallel.degree > 1
                or plan.pipefusion.degree > 1):
            record_sizes(traced, model)
    else:
        args, kwargs = ((), example_inputs) if isinstance(example_inputs, dict) else (tuple(example_inputs), {})
        if plan.cfg_parallel:
            raise PlanError("cfg_parallel halves the batch inside the program, but a captured forward holds the "
                            "batch size it was captured for; remove cfg_parallel: a CFG batch (cond and uncond "
                            "concatenated, as diffusers pipelines call the transformer) is split over the ranks by "
                            "Runtime.denoise like any batch")
        traced, signature, out_spec = capture(model, args, kwargs)
        batch_dims = batch_dims_for(model) if batch_dims is None else batch_dims
        unknown = sorted(set(batch_dims or {}) - set(signature.names))
        if unknown:
            raise ValueError(f"batch_dims names {unknown}, which are not tensor inputs of the example call; its "
                             f"tensor inputs: {', '.join(signature.names)}")
    layers = layers_of(traced)
    _validate(plan, layers, traced)
    plan, sensitivity = resolve_auto(model, layers, plan)
    plan, chunk_basis = resolve_chunks(plan)
    compiled = CompiledModel(model, plan, traced, layers, sensitivity)
    compiled.chunk_basis = chunk_basis
    compiled.signature, compiled.batch_dims = signature, dict(batch_dims or {})
    if signature is not None:
        compiled.out_spec = out_spec
    compiled.graph(0)
    return compiled


class CompiledModel:
    """Per-rank programs for one model and plan, one per step kind."""

    def __init__(self, model: nn.Module, plan: Plan, traced: fx.GraphModule, layers,
                 sensitivity: list[float] | None = None, pipeline: list[PassFn] = PIPELINE, kernels: str | None = None):
        self.model = model
        self.plan = plan
        self.layers = layers
        self.world_size = plan.world_size
        self.steps = StepPlan.of(plan)  # which kind every diffusion step runs
        self.synchronous_layers = synchronous_layers(plan, len(layers))
        stale_steps = plan.staleness.STEPS[plan.staleness.mode]
        # per MoE layer: how many steps old its routed output is on a stale step (verify_staleness)
        self.claimed_staleness = {layer: 0 if layer in self.synchronous_layers else stale_steps
                                  for layer in range(len(layers))}
        self.pass_log: list[dict] = []  # one entry per (rank, program, pass), in build order
        self.sensitivity = sensitivity  # per layer, when selective_sync chose "auto"
        self.chunk_basis: dict | None = None  # what expert_parallel.chunks "auto" chose from
        self.pipeline = list(pipeline)
        self.kernels = kernels or _kernels(plan, traced, layers)  # "torch" or "triton"
        self._traced = traced
        self._per_rank: dict[int, dict[StepKind, fx.GraphModule]] = {}
        self.signature: Signature | None = None  # what the graph was captured for, if it was (moedit/capture.py)
        self.batch_dims: dict[str, int | None] = {}  # see `compile`
        self.out_spec: pytree.TreeSpec | None = None  # a captured graph's return structure (it returns tensors flat)
        self._specialised: dict[Signature, CompiledModel] = {}

    def specialise(self, signature: Signature, tensors: list[torch.Tensor]) -> "CompiledModel":
        """This model and plan captured for `signature` with `tensors` as its example (self if it
        is the one captured; cached). Only for models compiled with `example_inputs`."""
        if signature == self.signature:
            return self
        if signature not in self._specialised:
            traced, signature, out_spec = capture(self.model, *signature.call(tensors))
            other = CompiledModel(self.model, self.plan, traced, layers_of(traced), self.sensitivity, self.pipeline,
                                  kernels=self.kernels)  # chosen (and any fallback said) once
            other.signature, other.batch_dims, other.out_spec = signature, self.batch_dims, out_spec
            self._specialised[signature] = other
            log.info("captured %s again, for %s (%d captures)", type(self.model).__name__, signature.describe(),
                     len(self._specialised) + 1)
        return self._specialised[signature]

    @property
    def kinds(self) -> tuple[StepKind, ...]:
        """The step kinds this plan runs; each rank has one program per kind."""
        return self.steps.kinds

    def _build(self, rank: int) -> dict[StepKind, fx.GraphModule]:
        programs, logs = {}, []
        for kind in self.kinds:
            ctx = PassContext(plan=self.plan, world_size=self.world_size, rank=rank, layers=self.layers, step=kind,
                              synchronous_layers=self.synchronous_layers, chunks=self.plan.expert_parallel.chunks,
                              kernels=self.kernels)
            programs[kind], program_log = run_passes(copy_module(self._traced), ctx, self.pipeline)
            logs += program_log
        verify_programs(programs)
        verify_staleness(programs, self.claimed_staleness)
        if rank != 0:
            self._check_against_lower_ranks(rank, programs)
        self.pass_log += logs
        return programs

    def _check_against_lower_ranks(self, rank: int, programs: dict[StepKind, fx.GraphModule]) -> None:
        """Check `rank`'s collective order against the first rank of each of its groups, and
        its point-to-point exchanges against its lower-numbered peers' (each pair is checked
        when the higher rank is built, so building never recurses upwards)."""
        orders = {kind: collective_order(gm) for kind, gm in programs.items()}
        mesh = self.plan.mesh
        comms = {comm for order in (*orders.values(), *map(collective_order, self.programs(0).values()))
                 for comm in order}
        others = {mesh.group_of(axis, rank)[0] for axis, _ in comms}
        others |= {peer for axis, channel in comms if channel == P2P for peer in mesh.group_of(axis, rank)}
        for other in sorted(o for o in others if o < rank):
            for kind in self.kinds:
                verify_collective_order({other: collective_order(self.programs(other)[kind]), rank: orders[kind]},
                                        kind.name, mesh)

    def programs(self, rank: int) -> dict[StepKind, fx.GraphModule]:
        """Rank `rank`'s program for every step kind, built (and checked against lower ranks'
        collective order, see `_check_against_lower_ranks`) on first use."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank must be in 0..{self.world_size - 1}, got {rank}")
        if rank not in self._per_rank:
            self._per_rank[rank] = self._build(rank)
        return self._per_rank[rank]

    def graph(self, rank: int, kind: StepKind | str = "sync") -> fx.GraphModule:
        """The rewritten GraphModule rank `rank` runs on steps of `kind` (a StepKind or its
        name: "sync", "async" for stale plans, a "_drop" twin with conditional communication)."""
        kind = StepKind.named(kind) if isinstance(kind, str) else kind
        if kind not in self.kinds:
            raise ValueError(f"step kind must be one of {[k.name for k in self.kinds]}, got {kind.name!r}")
        return self.programs(rank)[kind]

    def check_collective_order(self) -> None:
        """Build every rank's programs and check that each communicator sees the same
        exchanges in the same order on every rank of a group, and that point-to-point sends
        and receives pair up (RuntimeError at the first divergence)."""
        for rank in range(self.world_size):
            self.programs(rank)

    def explain(self, batch_size: int = 8, steps: int = 25) -> str:
        """Per layer: expert placement, inserted nodes and bytes moved per step; and which
        step kind each of `steps` diffusion steps runs."""
        return explain(self, batch_size, steps)

    def dump(self, directory: str | os.PathLike) -> None:
        """Write each rank's graph code, the pass log, the plan and explain() under `directory`."""
        os.makedirs(directory, exist_ok=True)
        for rank in range(self.world_size):
            for kind, gm in self.programs(rank).items():
                suffix = "" if kind.name == "sync" else f"_{kind.name}"
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
        mesh = self.plan.mesh
        return local_experts(self.layers[0].num_experts, mesh.ep, mesh.index("ep", rank))

    def rank_program(self, rank: int) -> RankProgram:
        """What the runtime of rank `rank` runs (see [Note: compiler and runtime] in program.py)."""
        specialise = None if self.signature is None else functools.partial(self._specialised_program, rank)
        return RankProgram(rank=rank, plan=self.plan, steps=self.steps, programs=self.programs(rank),
                           kernels=self.kernels, model=self.model, signature=self.signature,
                           batch_dims=self.batch_dims, out_spec=self.out_spec, specialise=specialise)

    def _specialised_program(self, rank: int, signature: Signature, tensors: list[torch.Tensor]) -> RankProgram:
        return self.specialise(signature, tensors).rank_program(rank)

    def to_runtime(self, device=None, profile: bool = False) -> Runtime:
        """Join (or start) the process group and return this rank's `Runtime`. With `profile`,
        it records a timeline of every compute region and exchange (`Runtime.timeline()`).

        Runtimes of one compiled model share its programs and the model's weights, and
        nothing else: they must run on one device (starting one moves the weights there)."""
        backend, rank = join(self.plan)
        return Runtime.start(self.rank_program(rank), backend, device=device, profile=profile)
