"""`moedit.parallelize(pipe, plan)`: a diffusers pipeline's transformer runs under a plan.

    pipe = HiDreamImagePipeline.from_pretrained(...)          # on every rank, under torchrun
    pipe = moedit.parallelize(pipe, "examples/plans/dice.yaml")
    image = pipe(prompt, generator=torch.Generator().manual_seed(0)).images[0]   # the same on every rank

Nothing else in the pipeline changes: its text encoders, scheduler loop and VAE run as they
always do, on every rank (each rank encodes the prompt and decodes the latents of the whole
batch: the same work as one process, repeated; for the MoE-DiTs this supports the
transformer's steps dominate). Only `pipe.transformer` is replaced, by a `ParallelTransformer`
that passes every attribute but the call through to the original model, and the pipeline's
class gains a `__call__` that marks where a sample begins. Save a pipeline before
parallelizing it: `save_pretrained` does not save the wrapper.

[Note: pipeline samples]
The first transformer call compiles the model for that call's shapes (`compile(...,
example_inputs=...)`) and starts the runtime; a later call with other shapes captures again
(cached), as `Runtime.denoise` does. Each `pipe(...)` call is one sample: its first
transformer call opens it (`Runtime.reset`) with as many steps as the scheduler has
timesteps left (`len(scheduler.timesteps) - scheduler.begin_index`), so the warm-up,
`sync_every` and cool-down steps fall where the plan puts them and nothing a previous image
left (staleness caches, K/V buffers, slot caches) is read. A call past the sample's last
step also opens a new one, for loops written without `pipe(...)`.

A pipeline that calls the transformer more than once per step (NucleusMoE-Image: the
conditional and the unconditional prediction, one call each) gets one *stream* per call of
a step (`Runtime.stream`): each stream has its own caches and step counter, so the
unconditional call of step t reads what the unconditional call of step t-1 left, never the
conditional one's. The calls of one step are those with the step's timestep: the number of
calls made before the timestep first changes is the number of streams. (A pipeline that
batches the two halves, as HiDream-I1's does, is one stream; its batch is split over the
data ranks like any batch.)

Every rank must run the same pipeline call: the same prompt, settings and initial latents
(pass the same `generator` seed on every rank). The first transformer call of each sample
compares fingerprints of the `pipe(...)` arguments, the scheduler's timesteps and the
transformer's inputs across ranks (sizes, sums and position-weighted sums of tensors,
generator seeds, plain values; not objects such as callbacks) and stops every rank, naming
what differs, instead of letting each rank denoise its own noise. A rank that never calls
the pipeline makes the others stop after `runtime.timeout_s`, in the runtime's start-up
exchange (gloo's timeout message, which does not yet name the missing rank).

What it relies on: `pipe.transformer` (an `nn.Module` moedit can compile), `pipe.scheduler
.timesteps` (and `begin_index` where the scheduler has one), and the transformer's timestep
argument being named `t`, `timestep` or `timesteps`.
"""

from __future__ import annotations

import atexit
import inspect
import os
import weakref
import zlib
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from moedit.runtime.executor import join, timestep_of

from .compiled import compile
from .plan import Plan, PlanError
from .tracer import TraceError

__all__ = ["ParallelTransformer", "parallelize"]


def parallelize(pipe, plan: Plan | dict | str | os.PathLike, **compile_options) -> Any:
    """Route `pipe`'s transformer calls through moedit's runtime under `plan` (a `Plan`, its
    keyword arguments as a dict, or a plan file) and return `pipe`. `compile_options` go to `moedit.compile` (`batch_dims`,
    ...; the shipped diffusers adapters supply HiDream-I1's). Run it on every rank, under
    torchrun with `--nproc_per_node` = the plan's world size (or in one process for a 1-rank
    plan). See [Note: pipeline samples]."""
    plan = plan if isinstance(plan, Plan) else Plan(**plan) if isinstance(plan, dict) else Plan.from_file(plan)
    transformer = getattr(pipe, "transformer", None)
    if isinstance(transformer, ParallelTransformer):
        raise PlanError(f"moedit.parallelize: this {type(pipe).__name__} is parallelized already")
    if isinstance(pipe, nn.Module):
        raise PlanError(f"moedit.parallelize takes a pipeline, not a model ({type(pipe).__name__}); compile a bare "
                        "model with moedit.compile(model, plan, example_inputs=...)")
    if not isinstance(transformer, nn.Module):
        modules = sorted(name for name, value in getattr(pipe, "__dict__", {}).items() if isinstance(value, nn.Module))
        raise PlanError(f"moedit.parallelize: {type(pipe).__name__} has no `transformer` module to parallelize "
                        f"(its modules: {', '.join(modules) or 'none'}); moedit compiles a pipeline's transformer")
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != plan.world_size:
        raise PlanError(f"moedit.parallelize: the plan needs {plan.world_size} rank(s) ({plan.mesh.describe()}) but "
                        f"{launched} were launched; run under `torchrun --nproc_per_node={plan.world_size}` or "
                        "change the plan")
    join(plan)  # now: the group's timeout is the plan's, and a bad launch fails here, not at the first step
    parallel = ParallelTransformer(transformer, plan, pipe, compile_options)
    # Set past DiffusionPipeline.__setattr__, which would record the wrapper's class in the
    # pipeline's config (save a pipeline before parallelizing it: the wrapper is not saved).
    object.__setattr__(pipe, "transformer", parallel)
    pipe.__class__ = _sampling(type(pipe))
    return pipe


_SAMPLING: dict[type, type] = {}


def _sampling(cls: type) -> type:
    """`cls` with a `__call__` that opens a new sample at the pipeline call's first step."""
    if cls not in _SAMPLING:
        def __call__(self, *args, **kwargs):
            self.transformer.new_sample((args, kwargs))
            return cls.__call__(self, *args, **kwargs)

        _SAMPLING[cls] = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                                    "__doc__": cls.__doc__})
    return _SAMPLING[cls]


class ParallelTransformer(nn.Module):
    """A pipeline's transformer run by moedit: calling it runs one step of the current sample
    on every rank and returns what the model returns; every other attribute (`config`,
    `dtype`, `max_seq`, ...) is the original model's. The runtime starts at the first call
    and ends with `close()` (or at exit)."""

    def __init__(self, model: nn.Module, plan: Plan, pipe, compile_options: dict):
        super().__init__()
        self.model = model
        self._plan, self._options = plan, compile_options
        self._pipe = weakref.ref(pipe)  # its scheduler, read at each sample (the user may swap it)
        self.runtime = None  # moedit's Runtime, from the first call on
        self._bind = inspect.signature(type(model).forward).bind
        self._open = False  # a sample is open and has steps left
        self._steps = 0  # of the open sample, per stream
        self._calls = 0  # of the open sample
        self._streams: int | None = None  # calls per step, once the timestep has changed
        self._first_timestep: float | None = None
        self._pipe_call: Any = None  # the arguments of the pipeline call running now

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["model"], name)

    def new_sample(self, pipe_call: Any = None) -> None:
        """The next call is step 0 of a new sample (the pipeline's `__call__` says so, with its
        arguments, which every rank must share)."""
        self._open, self._pipe_call = False, pipe_call

    def forward(self, *args, **kwargs):
        bound = self._bind(self.model, *args, **kwargs)
        call = {name: value for name, value in bound.arguments.items() if name != "self"}
        if self.runtime is None:
            self.runtime = self._start(call)
        if self.runtime.closed:
            raise RuntimeError("moedit.parallelize: this pipeline's runtime was closed; parallelize a fresh pipeline")
        timestep = timestep_of(call)
        if not self._open:
            self._begin(call, timestep)
        elif self._streams is None and timestep != self._first_timestep:
            self._streams = self._calls  # the calls of step 0 were one per stream
        streams = self._streams or self._calls + 1
        self.runtime.stream(self._calls % streams)
        out = self.runtime.denoise(**call)
        self._calls += 1
        if self._streams is not None and self._calls == self._steps * self._streams:
            self._open = False  # the sample's last step: a further call begins a new one
        return out

    def close(self) -> None:
        """Finish the runtime (every rank), as `Runtime.close`; also done at exit."""
        if self.runtime is not None:
            self.runtime.close()

    # -- helpers --------------------------------------------------------------------------
    def _start(self, call: dict):
        name = type(self.model).__name__
        try:
            compiled = compile(self.model, self._plan, example_inputs=call, **self._options)
        except (TraceError, TypeError, NotImplementedError) as err:
            raise PlanError(f"moedit.parallelize: cannot capture the pipeline's transformer ({name}): {err}") from err
        runtime = compiled.to_runtime()
        atexit.register(_close, weakref.ref(self))  # before the default group goes (last registered runs first)
        return runtime

    def _begin(self, call: dict, timestep: float | None) -> None:
        """Open a sample of as many steps as the scheduler has timesteps left."""
        scheduler = getattr(self._pipe(), "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is None:
            raise PlanError("moedit.parallelize: the pipeline's scheduler has no timesteps set when the transformer "
                            "is first called; moedit counts a sample's steps from scheduler.timesteps")
        self._steps = len(timesteps) - (getattr(scheduler, "begin_index", None) or 0)
        self._check_same_on_every_rank({"the arguments of pipe(...)": self._pipe_call,
                                        "scheduler.timesteps": timesteps,
                                        **{f"the transformer's `{name}`": value for name, value in call.items()}})
        self.runtime.reset(steps=self._steps)
        self._open, self._calls, self._streams, self._first_timestep = True, 0, None, timestep
        if timestep is None:
            self._streams = 1  # no timestep to tell the calls of a step apart: one call a step

    def _check_same_on_every_rank(self, values: dict) -> None:
        """Stop on every rank, naming the first value that differs, unless every rank was given
        the same pipeline call and transformer inputs (by a fingerprint of each; see `_fingerprint`)."""
        if self.runtime.world_size == 1:
            return
        names, prints = [], []
        for name, value in values.items():
            for leaf in pytree.tree_leaves(value):
                names.append(name)
                prints.append(_fingerprint(leaf))
        mine = torch.tensor(prints, dtype=torch.float64)
        check = "check that every rank has the same inputs"
        counts = self.runtime.all_gather(check, torch.tensor([len(prints)]))
        if any(int(c) != len(prints) for c in counts):
            raise ValueError("moedit.parallelize: the ranks' pipeline calls differ in their arguments; every rank "
                             "must make the same call (same prompt, settings and generator seed)")
        for rank, other in enumerate(self.runtime.all_gather(check, mine)):
            differs = ~torch.isclose(other.cpu(), mine, rtol=1e-6, atol=1e-9).all(-1)
            if differs.any():
                raise ValueError(f"moedit.parallelize: {names[int(differs.nonzero()[0])]} differ between rank "
                                 f"{rank} and rank {self.runtime.rank}; every rank must make the same pipeline call "
                                 "(same prompt, settings and generator=torch.Generator().manual_seed(seed))")


def _fingerprint(value) -> list[float]:
    """Four numbers that differ where two ranks' values differ: a tensor's size, sum, and two
    position-weighted sums (order and sign show); a generator's seed; a plain value's repr;
    anything else (a callback, say) by its type name, since its repr names an address."""
    if isinstance(value, torch.Tensor):
        x = value.detach().flatten().double().cpu()
        position = torch.arange(x.numel(), dtype=torch.float64)
        return [float(x.numel()), float(x.sum()), float((x * torch.cos(position)).sum()),
                float((x * torch.sin(0.37 * position)).sum())]
    if isinstance(value, torch.Generator):
        text = f"generator {value.initial_seed()}"
    elif value is None or isinstance(value, (str, int, float, bool)):
        text = repr(value)
    else:
        text = type(value).__qualname__
    return [float(zlib.crc32(text.encode())), 0.0, 0.0, 0.0]


def _close(ref: weakref.ref) -> None:
    transformer = ref()
    if transformer is not None:
        transformer.close()
