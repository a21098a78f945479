"""The step executor: runs one rank's compiled programs, one per diffusion step.

The runtime runs a `RankProgram` (moedit/program.py, [Note: compiler and runtime]): one
program per step kind (`moedit.steps`); before every step the executor asks its `StepPlan`
which kind the step is, and runs that program with the run's state as its `run` input. It
owns the step counter: `reset(steps=N)` starts a sample of N steps, `sample()` does that
itself.

[Note: samples]
A plan whose steps read what earlier steps left (staleness caches, K/V buffers, cached slot
outputs) must know where a sample begins: step 0 of a new sample runs the synchronous
program and reads nothing of the last one. `Runtime.denoise` cannot tell that from its
arguments, so for such plans it refuses a call outside a sample opened by `reset(steps=N)`:
the first call before any `reset`, the (N+1)-th call of a sample of N steps, and a call whose
timestep (an input named `t`, `timestep` or `timesteps`) turns back against the direction the
sample's timesteps ran so far (a new sample begun early, without `reset`), each with a message
naming `reset`; a step that raises closes the sample too. What the guard cannot see: a model
with no timestep input whose sample ends early, and a sampler that calls the model twice per
step (conditional and unconditional halves as separate calls), where the second call would
read the first one's caches: batch the two halves, as `sample()` does, or give each call of
a step its own stream. Plans that carry nothing across steps need no `reset`.

[Note: streams]
A sampler that calls the model more than once per step with inputs that differ (a diffusers
pipeline that predicts the conditional and the unconditional noise in two calls) needs each
call of step t to read what the same call of step t-1 left. `Runtime.stream(i)` makes stream
i of the open sample current: each stream has its own caches, step counter and step kinds,
and `reset` empties them all. `moedit.parallelize` picks the stream of each call (see
[Note: pipeline samples] in moedit/parallelize.py). The staleness cache limit holds per stream.

The global batch is split over the mesh's "data" axis (a plain expert-parallel plan: every
rank); ranks that differ only in the pipefusion, cfg, patch, ring or ulysses axes get the same
images and their programs split the work inside (moedit/passes/sequence_parallel.py,
patch_parallel.py, pipefusion.py). Every rank draws the same initial noise (and DDPM's noise
at every step) for the whole batch from the seed and keeps its shard, so results do not
depend on the world size.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from tqdm.auto import tqdm

from moedit.plan import Plan, PlanError
from moedit.program import RankProgram
from moedit.signature import Signature
from moedit.steps import StepKind
from moedit.verify import verify_collective_order

from .cache import StepCache
from .comm import MAIN, Exchange, Pending, device_for, init_process_group, pick_backend
from .expert_ops import LocalExperts
from .mesh import Mesh
from .offload import ExpertStore
from .sampling import SAMPLERS, initial_noise, step_noise
from .sequence_ops import pad_rows, unpad_rows
from .state import RunState
from .regions import instrument
from .timeline import Span, Timeline

log = logging.getLogger(__name__)

BATCH_AXIS = "data"  # the axis the global batch is split over
TIMESTEP_NAMES = ("t", "timestep", "timesteps")  # forward arguments that hold the diffusion timestep
WORLD = "world"  # every rank: the runtime's own checks


def join(plan: Plan) -> tuple[str, int]:
    """Join (or start) the default process group a runtime of `plan` runs in; return its
    backend and this process's rank. A group of another size than the plan's is a PlanError."""
    backend = pick_backend(plan.runtime.backend)
    init_process_group(backend, plan.runtime.timeout_s, plan.world_size)
    world = dist.get_world_size()
    if world != plan.world_size:
        raise PlanError(f"the plan was compiled for {plan.world_size} ranks but the process group has {world}; "
                        f"launch with --nproc_per_node={plan.world_size} or change the plan's axes "
                        f"({plan.mesh.describe()}) to multiply to {world}")
    return backend, dist.get_rank()


class Runtime:
    """One rank's view of a compiled model inside a process group. Every rank must call
    `close()` (or use the runtime as a context manager)."""

    def __init__(self, program: RankProgram, state: RunState, device: torch.device):
        self.program = program  # what the compiler built for this rank (for a captured model: its first capture)
        self.programs = program.programs  # step kind -> the program this rank runs now, on `device`
        self.state = state  # everything this run owns; passed to every program as `run`
        self.rank = program.rank
        self.world_size = program.plan.world_size
        self.device = device
        self.total_steps: int | None = None  # of the current sample, once reset(steps=N) opened one
        self.step_log: list[StepKind] = []  # the kind each step of the current sample ran
        self.step_times: list[float] = []  # seconds per diffusion step of the last sample()
        self.blocked_times: list[float] = []  # of which blocked on exchanges
        self.blocked_by: list[dict[str, float]] = []  # the same per step, by exchange name ("dispatch", ...)
        self.sent_bytes: list[int] = []  # bytes sent to other ranks, per step of the last sample()
        # a captured model: the programs for each global call signature met so far (see `prepare`)
        self._captures: dict[Signature, RankProgram] = {}
        self._timesteps: list[float] = []  # of the current sample's denoise calls, where the call names one
        # the open sample's streams (see [Note: streams]); the current one's entry is refreshed
        # when another becomes current: until then `state` and the fields above hold it
        self._streams = [_Stream(state.cache)]
        self._stream = 0  # the current stream's index
        self._closed = False

    @classmethod
    def start(cls, program: RankProgram, backend: str, device=None, profile: bool = False) -> "Runtime":
        """The runtime of `program` in the process group `join` joined, on `device` (default: the
        backend's device for this rank), recording a timeline with `profile`."""
        plan = program.plan
        device = torch.device(device) if device is not None else device_for(backend)
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(device)  # NCCL and the timing events use the current device's streams
        if program.kernels == "triton" and device.type != "cuda" and torch.cuda.is_available():
            # (without CUDA the kernels run under Triton's interpreter, as the tests run them)
            raise PlanError(f"the programs were compiled with kernels: triton, which run on CUDA tensors, but this "
                            f"runtime runs on {device}; compile with kernels: torch")
        # Compared before any group is made: ranks that disagree would otherwise hang creating them.
        used = _check_collective_order_across_processes(program.orders, plan.mesh)
        # Groups of our own, so the plan's timeout bounds every collective even when the caller
        # created the default group with another one. Every rank creates every group (a collective
        # call), also those only other ranks use (PipeFusion's stages issue different exchanges).
        mesh = Mesh(plan.mesh, {(BATCH_AXIS, MAIN), (WORLD, MAIN)} | used, backend, plan.runtime.timeout_s)
        try:
            limit = plan.staleness.cache_limit_mb
            state = RunState(mesh, StepCache(None if limit is None else int(limit * 2**20)), program.rank,
                             plan.runtime.timeout_s)
            state.timeline = Timeline(program.rank, device if backend == "nccl" else None) if profile else None
            program = dataclasses.replace(program, programs=_ready(program.programs, device, state.timeline))
            if plan.offload.enabled:
                state.experts = _expert_store(plan, program.programs, device)
        except BaseException:
            mesh.close()  # the groups are made: leave them, or they outlive the failed start
            raise
        return cls(program, state, device)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- step control ---------------------------------------------------------------
    def reset(self, steps: int | None = None, seed: int = 0) -> None:
        """Start a new sample of `steps` diffusion steps: finish exchanges in flight, empty the
        caches, step 0, and seed `seed` for anything random in the plan (conditional_comm.drop:
        random). Plans that carry state across steps need it before every sample, with `steps`
        (see [Note: samples]); `sample()` calls it itself."""
        for cache in self._other_caches():
            self._drain(cache)
        self._drain()
        self.state.cache.entries.clear()
        if self.state.experts is not None:
            self.state.experts.forget_fetches()
        if self.state.timeline is not None:
            self.state.timeline.forget_in_flight()
        self.state.step, self.state.seed, self.state.kind = 0, seed, None
        self.total_steps, self.step_log, self._timesteps = steps, [], []
        plan = self.program.steps
        if steps and plan.stale and self.rank == 0 and all(kind.synchronous for kind in plan.table(steps)):
            warnings.warn(f"all {steps} steps of this sample run synchronously (the plan's warm-up, cool-down and "
                          "sync_every steps cover them), so its staleness never starts and only costs: sample more "
                          "steps or lower the plan's warmup_steps")
        self._streams, self._stream = [_Stream(self.state.cache)], 0

    def stream(self, index: int) -> None:
        """Make stream `index` of the open sample current (see [Note: streams]); index
        len(streams) starts a new one at step 0. Stream 0 is current after `reset`."""
        if index == self._stream:
            return
        if self.total_steps is None:
            raise ValueError("runner.stream: no sample is open; call runner.reset(steps=N, seed=...) first")
        count = len(self._streams)
        if not 0 <= index <= count:
            raise ValueError(f"runner.stream({index}): the sample has {count} stream(s); the next new one is {count}")
        state = self.state
        self._streams[self._stream] = _Stream(state.cache, state.step, state.kind, self.step_log, self._timesteps)
        if index == count:
            self._streams.append(_Stream(StepCache(state.cache.limit_bytes)))
        chosen = self._streams[index]
        state.cache, state.step, state.kind, self.step_log, self._timesteps = (
            chosen.cache, chosen.step, chosen.kind, chosen.log, chosen.timesteps)
        self._stream = index

    def _other_caches(self) -> list[StepCache]:
        return [stream.cache for i, stream in enumerate(self._streams) if i != self._stream]

    def _drain(self, cache: StepCache | None = None) -> None:
        """Wait for every exchange still in flight (a stale step's last dispatch, say) in
        `cache` (default: the current stream's)."""
        for pending in (self.state.cache if cache is None else cache).running():
            self.state.wait(pending)
        self.state.settle()

    def _run(self, *inputs, **kwargs):
        if self._closed:
            raise RuntimeError("this runtime is closed; start a new one with compiled.to_runtime()")
        steps = self.program.steps
        if steps.carries_state and self.total_steps is None:
            raise ValueError("this plan's steps read what earlier steps left (staleness caches, K/V buffers or "
                             "cached slot outputs), so a sample must be opened first: call runner.reset(steps=N, "
                             "seed=...) before its first step (see [Note: samples] in moedit/runtime/executor.py)")
        if steps.carries_state and self.state.step >= self.total_steps:
            raise ValueError(f"the sample opened by reset(steps={self.total_steps}) has run all its steps; call "
                             "runner.reset(steps=N, seed=...) before the first step of the next sample, so that "
                             "its step 0 reads nothing the last sample left")
        kind = steps.kind_at(self.state.step, self.total_steps)
        if kind.synchronous and self.state.kind is not None and not self.state.kind.synchronous:
            self._drain()  # a synchronous program refills the caches without reading the exchanges in them
        self.state.kind = kind
        self.step_log.append(kind)
        try:
            out = self.programs[kind](*inputs, **kwargs, run=self.state)
        except BaseException:
            self.total_steps = None  # a sample cut short: the next step must open a new one
            raise
        self.state.settle()
        if self.state.timeline is not None:
            self.state.timeline.end_step()
        if self.state.cache.limit_bytes is not None:
            self._check_cache_limit()
        self.state.step += 1
        return out

    def _check_continues(self, call: "_Call") -> None:
        """Refuse a step whose timestep turns back (see [Note: samples]): the sample's timesteps
        so far ran one way, so this call starts a new sample without `reset`."""
        value = call.timestep()
        if value is None or not self.program.steps.carries_state or self.total_steps is None:
            return
        seen = self._timesteps
        direction = next((b - a for a, b in zip(seen, seen[1:]) if b != a), 0.0)
        if seen and direction * (value - seen[-1]) < 0:
            raise ValueError(f"denoise: timestep {value:g} does not continue the sample, whose steps so far went "
                             f"from {seen[0]:g} to {seen[-1]:g}; call runner.reset(steps=N, seed=...) before the "
                             "first step of every sample, so that it reads nothing the last sample left")
        seen.append(value)

    def _check_cache_limit(self) -> None:
        """Stop every rank together once any rank's caches have outgrown the plan's limit."""
        peak = torch.tensor([self.state.cache.peak_bytes], dtype=torch.int64, device=self.device)
        gathered = self._all_gather("check of the cache sizes", peak, WORLD)
        problem = self.state.cache.over_limit([int(p) for p in gathered])
        if problem is not None:
            raise MemoryError(problem)

    # -- batch sharding -------------------------------------------------------------
    def _shard(self, *tensors):
        return [self._split(t).to(self.device) if isinstance(t, torch.Tensor) else t for t in tensors]

    def all_gather(self, name: str, tensor: torch.Tensor, axis: str = WORLD) -> list[torch.Tensor]:
        """Every rank's `tensor` (of one shape everywhere), in rank order: a check of the
        runtime's own, on its groups, bounded by the plan's timeout."""
        return self._all_gather(name, tensor.to(self.device), axis)

    def _all_gather(self, name: str, tensor: torch.Tensor, axis: str = BATCH_AXIS) -> list[torch.Tensor]:
        exchange = Exchange(name, None, axis)
        parts = [torch.empty_like(tensor) for _ in range(self.program.plan.mesh.size(axis))]
        work = dist.all_gather(parts, tensor, group=self.state.group(exchange), async_op=True)
        self.state.wait(self.state.issued(Pending(parts[0], work, exchange)))
        self.state.settle()
        return parts

    def _gather(self, local: torch.Tensor, batch: int) -> torch.Tensor:
        """Concatenate every data shard (shards may differ in size by one)."""
        parts = self._all_gather("gather of the output batch", pad_rows(local, batch, self.program.plan.mesh.data))
        return unpad_rows(torch.stack(parts), batch)

    # -- public API ---------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, *args, **kwargs):
        """One model evaluation on a global batch: takes what the model's forward takes and
        returns what it returns, on every rank.

        Tensors are split over the data ranks along their batch axis: the first, unless
        `compile`'s `batch_dims` names another for that input, or None to give every rank all
        of it. The batch size is the first split tensor's; with more than one data rank, a
        tensor whose batch axis has another size is an error that names it (mark it in
        `batch_dims`). 0-dim tensors and everything else are passed as they are. Output
        tensors are gathered along their first axis (0-dim ones are this rank's) and returned
        on the first input tensor's device. A model compiled with `example_inputs` is captured
        again for a call of another signature (cached).

        For a stale plan each call is one diffusion step: call `reset(steps=N, seed=...)`
        before the first step of every sample."""
        call = self._shard_call(args, kwargs)
        self._check_continues(call)
        if self.program.signature is None:
            local_args, local_kwargs = call.signature.call(call.local)
            out = self._run(*local_args, **local_kwargs)
        else:
            program = self._captured_for(call)
            out = program.outputs(self._run(*call.local))
        device = call.tensors[0].device

        def gather(o: torch.Tensor) -> torch.Tensor:
            return o.to(device) if o.dim() == 0 else self._gather(o[:0] if call.stand_in else o, call.batch).to(device)

        return pytree.tree_map_only(torch.Tensor, gather, out)

    def prepare(self, *args, **kwargs) -> None:
        """Have the programs for a call like `denoise(*args, **kwargs)` ready, without running a
        step: for a captured model, capture it for this call's shapes if no earlier call had
        them. `denoise` does this itself; call it on every rank to keep the capture out of the
        timing of the first step."""
        call = self._shard_call(args, kwargs)
        if self.program.signature is not None:
            self._captured_for(call)

    def _shard_call(self, args: tuple, kwargs: dict) -> "_Call":
        """Bind a call to the model's forward and cut this rank's part of its batch."""
        signature, tensors = Signature.of(self.program.model, args, kwargs)
        axes = [self.program.batch_dims.get(name, 0) for name in signature.names]
        has_batch = [a is not None and t.dim() > a for t, a in zip(tensors, axes)]
        if not any(has_batch):
            raise ValueError("denoise needs at least one tensor input with a batch axis to split over the ranks")
        batch = next(t.shape[a] for t, a, b in zip(tensors, axes, has_batch) if b)
        layout = self.program.plan.mesh
        split = layout.size(BATCH_AXIS) > 1
        odd = [f"{name} {list(t.shape)} (axis {a})" for name, t, a, b in zip(signature.names, tensors, axes, has_batch)
               if b and t.shape[a] != batch]
        if odd and split:
            raise ValueError(f"denoise: the batch has {batch} samples ({signature.names[has_batch.index(True)]}), but "
                             f"{', '.join(odd)} has another size on its batch axis; name each such input in "
                             "compile(..., batch_dims={name: its batch axis, or None to give it whole to every rank})")
        # With fewer samples than data ranks the last ranks get none; a captured forward may not take
        # an empty batch, so such a rank runs on a copy of sample 0 (joining every exchange) and keeps nothing.
        stand_in = self.program.signature is not None and layout.index(BATCH_AXIS, self.rank) >= batch
        local = []
        for tensor, axis, batched in zip(tensors, axes, has_batch):
            if batched and split:
                tensor = tensor.narrow(axis, 0, 1) if stand_in else self._split(tensor, axis)
            local.append(tensor.to(self.device))
        return _Call(signature, tensors, local, batch, stand_in)

    def _captured_for(self, call: "_Call") -> RankProgram:
        """The captured programs for `call`, made current. Keyed by the *global* call's signature,
        which every rank sees alike, so every rank captures again at the same call, before its
        step begins (a rank's own shard may differ in size by one). A later capture must issue
        the first one's exchanges: every rank checked at start that they agree on those, so
        they still agree."""
        if call.signature not in self._captures:
            local = call.signature.with_tensors(call.local)
            program = self.program if local == self.program.signature else self.program.specialise(local, call.local)
            if program is not self.program:
                for kind, order in program.orders.items():
                    if order != self.program.orders[kind]:
                        raise PlanError(f"rank {self.rank}: the capture for {local.describe()} issues other exchanges "
                                        f"in its {kind} program than the first capture; the model's MoE layers must "
                                        "not depend on its input shapes")
                program = dataclasses.replace(program, programs=_ready(program.programs, self.device,
                                                                       self.state.timeline))
            self._captures[call.signature] = program
        program = self._captures[call.signature]
        self.programs = program.programs
        return program

    def _split(self, tensor: torch.Tensor, axis: int = 0) -> torch.Tensor:
        """This rank's part of `tensor` along `axis` (the data axis's shards may differ by one)."""
        layout = self.program.plan.mesh
        return tensor.tensor_split(layout.size(BATCH_AXIS), dim=axis)[layout.index(BATCH_AXIS, self.rank)]

    @torch.no_grad()
    def sample(self, class_labels, steps: int = 50, cfg_scale: float = 1.5, seed: int = 0,
               sampler: str = "rflow", progress: bool = True) -> torch.Tensor:
        """Sampling of one image per label with `sampler` ("rflow", "ddpm" or "ddim", see
        moedit.runtime.sampling); every rank returns the full batch. `progress`: rank 0 shows a bar.

        All noise (the initial latents, DDPM's noise at every step) is drawn for the global
        batch from `seed` and sharded, so the images do not depend on the number of ranks."""
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; use one of {sorted(SAMPLERS)} (rflow for rectified-flow "
                             "models such as DiT-MoE XL and G, ddpm or ddim for Gaussian diffusion such as S and B)")
        cfg = getattr(self.program.model, "config", None)
        if cfg is None or not hasattr(cfg, "in_channels"):
            raise TypeError("Runtime.sample needs a model with a DiT-style `config` (in_channels, input_size, "
                            "num_classes); call Runtime.denoise inside your own sampler instead")
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        bad = labels[(labels < 0) | (labels >= cfg.num_classes)]
        if bad.numel():
            raise ValueError(f"class labels must be in 0..{cfg.num_classes - 1}, got {bad.tolist()}")
        if cfg_scale != 1.0 and getattr(cfg, "class_dropout_prob", 1.0) <= 0:
            raise ValueError("this model was built with class_dropout_prob=0, so it has no null class for "
                             "classifier-free guidance; use cfg_scale=1.0")
        z = initial_noise(labels.shape[0], cfg.in_channels, cfg.input_size, seed)
        z_local, y_local = self._shard(z, labels)
        global_noise = step_noise(labels.shape[0], cfg.in_channels, cfg.input_size, seed)
        self.reset(steps, seed)
        self.step_times, self.blocked_times, self.blocked_by, self.sent_bytes = [], [], [], []
        bar = tqdm(total=steps, desc="sampling", disable=self.rank != 0 or not progress, leave=False)
        last, blocked, sent = time.perf_counter(), self.state.blocked_s, self.state.sent_bytes
        by_name = dict(self.state.blocked_by)

        def on_step(i, latents):
            nonlocal last, blocked, sent, by_name
            if self.program.plan.runtime.check_finite:
                self._check_finite(latents, i)
            now = time.perf_counter()
            self.step_times.append(now - last)
            self.blocked_times.append(self.state.blocked_s - blocked)
            self.blocked_by.append({name: t - by_name.get(name, 0.0) for name, t in self.state.blocked_by.items()})
            self.sent_bytes.append(self.state.sent_bytes - sent)
            last, blocked, sent = now, self.state.blocked_s, self.state.sent_bytes
            by_name = dict(self.state.blocked_by)
            bar.update()

        try:
            out = SAMPLERS[sampler](self._run, z_local, y_local, steps=steps, cfg_scale=cfg_scale,
                                    null_class=cfg.num_classes, noise=lambda i: self._shard(global_noise(i))[0],
                                    on_step=on_step)
        finally:
            bar.close()
        self._drain()
        return self._gather(out, labels.shape[0]).cpu()

    def _check_finite(self, latents: torch.Tensor, step: int) -> None:
        """Stop every rank together if any rank's latents hold NaN or Inf."""
        bad = torch.tensor([0.0 if bool(torch.isfinite(latents).all()) else 1.0], device=self.device)
        flags = self._all_gather("check for non-finite latents", bad, WORLD)
        ranks = [r for r, f in enumerate(flags) if f.item()]
        if ranks:
            raise FloatingPointError(f"non-finite latents after diffusion step {step} on rank(s) {ranks}; "
                                     "check the checkpoint and the input dtype")

    def timeline(self) -> list[list[Span]]:
        """Every rank's recorded spans, in rank order (on every rank; profiling runtimes only).
        Write them with `moedit.runtime.timeline.chrome_trace` or `draw`."""
        if self.state.timeline is None:
            raise RuntimeError("this runtime does not profile; start it with compiled.to_runtime(profile=True)")
        spans: list = [None] * self.world_size
        dist.all_gather_object(spans, self.state.timeline.snapshot(), group=self.state.mesh.group(WORLD, MAIN))
        return spans

    def close(self) -> None:
        """Finish the exchanges still in flight and leave this runtime's process groups. A
        default group moedit created stays until the process exits, so another runtime can
        start in it. After a failed exchange nothing is waited for: the peer may be gone. The
        stacked expert weights the Triton kernels keep are dropped too; another runtime of the
        same compiled model stacks them again on its next step."""
        if self._closed:
            return
        self._closed = True
        caches = [self.state.cache, *self._other_caches()]
        if not self.state.failed:
            for cache in caches:
                self._drain(cache)
        self.state.mesh.close()
        # What this runtime holds beyond the model's weights goes now, not at garbage collection:
        # cached activations, the store's device and pinned copies, the kernels' stacked weights.
        for cache in caches:
            cache.entries.clear()
        if self.state.experts is not None:
            self.state.experts.release()
        if self.state.timeline is not None:
            self.state.timeline.forget_in_flight()
        for program in [self.program, *self._captures.values()]:
            for gm in program.programs.values():
                for module in gm.modules():
                    if isinstance(module, LocalExperts):
                        module.release()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ready(programs: dict, device: torch.device, timeline: Timeline | None) -> dict:
    """`programs` instrumented for the timeline (if profiling) and on `device`."""
    if timeline is not None:
        programs = {kind: instrument(gm) for kind, gm in programs.items()}
    for gm in programs.values():
        gm.to(device)
    return programs


def _expert_store(plan, programs, device) -> ExpertStore:
    """One store for the offloaded experts of every program of this rank (they share them)."""
    experts = {}
    for gm in programs.values():
        for module in gm.modules():
            if isinstance(module, LocalExperts) and module.offload_layer is not None:
                experts.update({(module.offload_layer, e): expert for e, expert in zip(module.expert_ids,
                                                                                          module._experts)})
    return ExpertStore(experts, device, plan.offload)


def _check_collective_order_across_processes(orders: dict, layout) -> set[tuple[str, str]]:
    """Each process built its programs itself (and checked them against its own builds of
    other ranks'); here the ranks compare what they will actually issue (`orders`: per
    program, `collective_order`), before the first exchange, so a divergence (a calibration
    that came out differently on one rank, say) is an error on every rank instead of a
    hang. Returns every communicator (axis, channel) some rank uses."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, orders)  # on the default group: ours do not exist yet
    for kind in orders:
        verify_collective_order({rank: other[kind] for rank, other in enumerate(gathered)}, kind, layout)
    return {comm for other in gathered for order in other.values() for comm in order}


@dataclasses.dataclass
class _Stream:
    """What one stream of a sample carries from step to step (see [Note: streams])."""

    cache: StepCache
    step: int = 0
    kind: StepKind | None = None
    log: list[StepKind] = dataclasses.field(default_factory=list)
    timesteps: list[float] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class _Call:
    """A `denoise` call bound to the model's forward, and this rank's part of it."""

    signature: Signature  # of the global call
    tensors: list[torch.Tensor]  # the call's tensors, global
    local: list[torch.Tensor]  # this rank's part of each, on the runtime's device
    batch: int  # samples in the global batch
    stand_in: bool  # this rank holds no sample and runs on a copy of sample 0

    def timestep(self) -> float | None:
        return timestep_of(dict(zip(self.signature.names, self.tensors)))


def timestep_of(values: dict) -> float | None:
    """A call's diffusion timestep (its first sample's), if one of its named values (a tensor
    or a number) is named for one (TIMESTEP_NAMES)."""
    for name, value in values.items():
        if name not in TIMESTEP_NAMES:
            continue
        if isinstance(value, torch.Tensor) and value.numel():
            return float(value.reshape(-1)[0])
        if isinstance(value, (int, float)):
            return float(value)
    return None
