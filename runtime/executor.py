"""The step executor: runs one rank's compiled programs, one per diffusion step.

A stale plan compiles two programs per rank: "sync" (exact; it also fills the
staleness caches) and "async" (stale layers consume earlier steps' exchanges). The
executor owns the step counter and picks the program: warm-up steps, cool-down steps
and every `sync_every`-th step run "sync", the rest "async".

The global batch is split over the ranks (dense layers run data-parallel, experts run
expert-parallel across the same ranks); every rank draws the same initial noise for the
whole batch from the seed and keeps its shard, so results do not depend on the world size.
"""

from __future__ import annotations

import datetime
import logging
import time

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from moedit.models.sampling import initial_noise, rectified_flow_sample

from moedit.plan import PlanError

from .cache import StepCache, bind_cache
from .comm import BlockedClock, Collective, bind_groups, init_process_group, pick_backend

log = logging.getLogger(__name__)


class Runtime:
    """One rank's view of a compiled model inside a process group."""

    def __init__(self, compiled, programs: dict, groups: dict, rank: int, world_size: int, device: torch.device,
                 owns_default_group: bool = False):
        self.compiled = compiled
        self.programs = programs
        self.gm = programs["sync"]
        self.groups = groups  # mesh axis -> process group
        self.group = groups["ep"]  # for the runtime's own gathers
        limit = compiled.plan.staleness.cache_limit_mb
        self.cache = StepCache(None if limit is None else int(limit * 2**20))
        for gm in programs.values():
            bind_cache(gm, self.cache)
        self.step = 0  # diffusion steps run since the last reset()
        self.total_steps: int | None = None  # known inside sample(), for cool-down
        self.program_log: list[str] = []  # the program each step ran
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.step_times: list[float] = []  # seconds per diffusion step of the last sample()
        self.blocked_times: list[float] = []  # of which blocked on exchanges (see BlockedClock)
        self.owns_default_group = owns_default_group  # start() created it, so close() destroys it

    @classmethod
    def start(cls, compiled, device=None) -> "Runtime":
        plan = compiled.plan
        backend = pick_backend(plan.runtime.backend)
        created = not dist.is_initialized()
        init_process_group(backend, plan.runtime.timeout_s, compiled.world_size)
        world, rank = dist.get_world_size(), dist.get_rank()
        if world != compiled.world_size:
            raise PlanError(f"the plan was compiled for {compiled.world_size} ranks but the process group has "
                            f"{world}; launch with --nproc_per_node={compiled.world_size} or set "
                            f"expert_parallel.degree: {world}")
        if device is None:
            device = torch.device(f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu")
        # Groups of our own, so the plan's timeout bounds every collective even when the
        # caller created the default group with another one; one per mesh axis the
        # programs use (all over the same ranks so far).
        programs = {name: compiled.graph(rank, name) for name in compiled.programs}
        axes = sorted({"ep"} | {m.axis for gm in programs.values() for m in gm.modules() if isinstance(m, Collective)})
        timeout = datetime.timedelta(seconds=plan.runtime.timeout_s)
        groups = {axis: dist.new_group(list(range(world)), timeout=timeout) for axis in axes}
        for gm in programs.values():
            bind_groups(gm, groups)
            gm.to(device)
        return cls(compiled, programs, groups, rank, world, torch.device(device), owns_default_group=created)

    # -- step control ---------------------------------------------------------------
    def program_for(self, step: int) -> str:
        """The program for diffusion step `step` (0-based), as the plan says: "sync" or
        "async", with "_drop" on the non-refresh steps of conditional communication."""
        plan, total = self.compiled.plan, self.total_steps
        stale = plan.staleness
        synchronous = (stale.mode == "sync" or step < stale.warmup_steps
                       or (total is not None and step >= total - stale.cooldown_steps)
                       or (stale.sync_every is not None and step % stale.sync_every == 0))
        interval = plan.conditional_comm.interval
        refresh = interval is None or step % interval == 0
        return ("sync" if synchronous else "async") + ("" if refresh else "_drop")

    def reset(self) -> None:
        """Start a new sample: finish exchanges in flight, empty the caches, step 0."""
        self.cache.drain()
        self.step, self.total_steps, self.program_log = 0, None, []

    def _run(self, x, t, y):
        program = self.program_for(self.step)
        self.program_log.append(program)
        out = self.programs[program](x, t, y)
        self.step += 1
        return out

    # -- batch sharding -------------------------------------------------------------
    def _shard(self, *tensors):
        return [t.tensor_split(self.world_size)[self.rank].to(self.device) for t in tensors]

    def _gather(self, local: torch.Tensor, batch: int) -> torch.Tensor:
        """Concatenate every rank's shard (shards may differ in size by one)."""
        rows = -(-batch // self.world_size)
        padded = local.new_zeros((rows, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        sizes = [len(s) for s in torch.arange(batch).tensor_split(self.world_size)]
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])

    # -- public API ---------------------------------------------------------------------
    @torch.no_grad()
    def denoise(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One model evaluation on a global batch; every rank returns the full output.

        Each call is one diffusion step for a stale plan (call reset() between samples)."""
        out = self._run(*self._shard(x, t, y))
        return self._gather(out, x.shape[0]).cpu()

    @torch.no_grad()
    def sample(self, class_labels, steps: int = 50, cfg_scale: float = 1.5, seed: int = 0) -> torch.Tensor:
        """Rectified-flow sampling of one image per label; every rank returns the full batch."""
        cfg = getattr(self.compiled.model, "config", None)
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
        self.reset()
        self.total_steps = steps
        self.step_times, self.blocked_times = [], []
        blocked = BlockedClock.seconds
        bar = tqdm(total=steps, desc="sampling", disable=self.rank != 0, leave=False)
        last = time.perf_counter()

        def on_step(i, latents):
            nonlocal last, blocked
            if self.compiled.plan.runtime.check_finite:
                self._check_finite(latents, i)
            now = time.perf_counter()
            self.step_times.append(now - last)
            self.blocked_times.append(BlockedClock.seconds - blocked)
            last, blocked = now, BlockedClock.seconds
            bar.update()

        try:
            out = rectified_flow_sample(self._run, z_local, y_local, steps=steps, cfg_scale=cfg_scale,
                                        null_class=cfg.num_classes, on_step=on_step)
        finally:
            bar.close()
            self.cache.drain()
        return self._gather(out, labels.shape[0]).cpu()

    def _check_finite(self, latents: torch.Tensor, step: int) -> None:
        """Stop every rank together if any rank's latents hold NaN or Inf."""
        bad = torch.tensor([0.0 if bool(torch.isfinite(latents).all()) else 1.0], device=self.device)
        flags = [torch.zeros_like(bad) for _ in range(self.world_size)]
        dist.all_gather(flags, bad, group=self.group)
        ranks = [r for r, f in enumerate(flags) if f.item()]
        if ranks:
            raise FloatingPointError(f"non-finite latents after diffusion step {step} on rank(s) {ranks}; "
                                     "check the checkpoint and the input dtype")

    def close(self) -> None:
        """Leave the runtime's process groups, and the default one if start() created it.
        Every rank must call it."""
        if dist.is_initialized():
            for group in self.groups.values():
                dist.destroy_process_group(group)
            if self.owns_default_group:
                dist.destroy_process_group()
