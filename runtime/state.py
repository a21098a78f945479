"""What one run owns: the `run` input of every program (see [Note: the run input] in
moedit/graph.py).

A `RunState` belongs to one `Runtime`: its communicators, its staleness cache, its step
counter and seed, and the clock of time spent blocked on exchanges. Nothing of it is
stored in the compiled programs or in class attributes, so runtimes of one compiled model,
one after the other or side by side, never see each other's state.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moedit.steps import StepKind

from .cache import StepCache
from .comm import CollectiveError, Exchange, Pending, silent_ranks
from .mesh import Mesh

if TYPE_CHECKING:
    from .offload import ExpertStore
    from .timeline import Timeline


class RunState:
    def __init__(self, mesh: Mesh, cache: StepCache, rank: int, timeout_s: float):
        self.mesh = mesh
        self.cache = cache
        self.rank = rank
        self.timeout_s = timeout_s
        self.step = 0  # the diffusion step being run, counted from 0 in each sample
        self.kind: StepKind | None = None  # the kind of that step
        self.seed = 0  # the sample's seed (random slot dropping draws from it)
        self.blocked_s = 0.0  # seconds spent waiting for exchanges, since the runtime started
        self.blocked_by: collections.Counter = collections.Counter()  # the same, by exchange name
        self._stalls: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []  # CUDA waits not yet added up
        self.sent_bytes = 0  # bytes this rank's exchanges sent to other ranks, since the runtime started
        self.failed = False  # an exchange failed: the groups may be unusable
        self.timeline: Timeline | None = None  # set when the runtime profiles
        self.experts: ExpertStore | None = None  # the offloaded experts (plan offload)

    def issued(self, pending: Pending) -> Pending:
        """Note an exchange just started (on the timeline, when profiling)."""
        if self.timeline is not None:
            self.timeline.issued(pending.exchange, pending.work, self.step)
        return pending

    def group(self, exchange: Exchange) -> dist.ProcessGroup:
        return self.mesh.group(exchange.axis, exchange.channel)

    def wait(self, pending: Pending) -> torch.Tensor:
        """Wait until `pending` has landed; count the time as blocked. A failed or timed-out
        exchange raises `CollectiveError` naming the exchange, the step and the timeout.

        Under NCCL the wait blocks the compute stream (the current stream of the tensor's device),
        not the host: the time blocked is the stream's, measured between CUDA events on either
        side of the wait and added up by `settle()`; under gloo it is the host's."""
        if pending.work is None:
            return pending.output
        name = pending.exchange.name if pending.exchange else "other"
        # NCCL's wait only orders the stream (gloo's blocks the host, even with CUDA tensors)
        stream = (torch.cuda.current_stream(pending.output.device) if pending.output.is_cuda and pending.exchange
                  and dist.get_backend(self.group(pending.exchange)) == "nccl" else None)
        start = time.perf_counter()
        if stream is not None:
            before = torch.cuda.Event(enable_timing=True)
            before.record(stream)
        try:
            pending.work.wait()
        except RuntimeError as err:
            self.failed = True
            waited = time.perf_counter() - start
            silent = silent_ranks(dist.get_rank(), self.mesh)
            culprit = (f"rank(s) {', '.join(map(str, silent))} did not join (they were not waiting on any exchange "
                       "when this one gave up: stalled or dead)" if silent else "a peer rank stalled or died")
            raise CollectiveError(
                f"rank {self.rank}: exchange {pending.exchange} failed at diffusion step {self.step} "
                f"({self.kind} program) after {waited:.1f} s of waiting (runtime.timeout_s = {self.timeout_s:g}): "
                f"{culprit}; look for its error first. Backend said: {str(err).splitlines()[0]}") from err
        finally:
            if stream is None:
                self._blocked(name, time.perf_counter() - start)
        if stream is not None:
            after = torch.cuda.Event(enable_timing=True)
            after.record(stream)
            self._stalls.append((name, before, after))
            if self.timeline is not None:
                self.timeline.waited(pending.work, after)
        pending.work = None
        if pending.expand is not None:
            pending.output, pending.expand = pending.expand(pending.output), None
        return pending.output

    def _blocked(self, name: str, seconds: float) -> None:
        self.blocked_s += seconds
        self.blocked_by[name] += seconds

    def settle(self) -> None:
        """Add the CUDA streams' blocked time of the waits so far (one host sync; nothing on the CPU)."""
        if self._stalls:
            self._stalls[-1][2].synchronize()
            for name, before, after in self._stalls:
                self._blocked(name, before.elapsed_time(after) / 1e3)
            self._stalls.clear()
