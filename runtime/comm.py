"""Communication: process-group set-up and the collectives the passes insert as graph nodes.

Collectives are small `nn.Module`s so that a per-rank graph calls them as
`self.blocks_0_moe_dispatch(...)`: `print(gm.code)` shows every exchange, and the process
group is bound onto them by `bind_groups` when a runtime starts (compiling needs none).

[Note: async handles]
An `*_start` node returns a `Pending` (the output buffer plus the work handle); exactly
one `wait` node turns it into a tensor. The graph verifier checks that pairing, so no
buffer is read before its exchange has finished.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


class BlockedClock:
    """Seconds this process has spent blocked on exchanges: in `wait` nodes and in the
    blocking counts exchange. Benchmarks read it to measure exposed communication."""

    seconds = 0.0

    @classmethod
    def add(cls, since: float) -> None:
        cls.seconds += time.perf_counter() - since


@dataclasses.dataclass
class Pending:
    """An exchange in flight: read `output` only after `wait`."""

    output: torch.Tensor
    work: dist.Work | None

    def wait(self) -> torch.Tensor:
        if self.work is not None:
            start = time.perf_counter()
            self.work.wait()
            self.work = None
            BlockedClock.add(start)
        return self.output


def wait(pending: Pending) -> torch.Tensor:
    """Graph node: block until an exchange started earlier has landed, then return its buffer."""
    return pending.wait()


class Collective(nn.Module):
    """A collective bound to one mesh axis ("ep" so far); the group arrives at run time."""

    def __init__(self, axis: str):
        super().__init__()
        self.axis = axis
        self.group: dist.ProcessGroup | None = None

    def extra_repr(self) -> str:
        return f"axis={self.axis!r}, bound={self.group is not None}"

    def _group(self) -> dist.ProcessGroup:
        if self.group is None:
            raise RuntimeError(f"{type(self).__name__} on axis {self.axis!r} has no process group; "
                               "run the graph through CompiledModel.to_runtime()")
        return self.group


class AllToAllStart(Collective):
    """Start an all-to-all with variable splits: rows [sum(send_splits), ...] are cut by
    `send_splits` (one count per destination rank) and rows arrive by `recv_splits`."""

    def forward(self, rows: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> Pending:
        output = rows.new_empty((sum(recv_splits), *rows.shape[1:]))
        work = dist.all_to_all_single(output, rows.contiguous(), recv_splits, send_splits,
                                      group=self._group(), async_op=True)
        return Pending(output, work)


class CountsStart(Collective):
    """Start the all-to-all of per-(rank, local expert) token counts, [P, L] -> [P, L].

    Stale layers launch it right after routing and wait on it only after they have run
    the previous step's experts, so it has landed by then (see README, "Counts")."""

    def forward(self, send_counts: torch.Tensor) -> Pending:
        recv_counts = torch.empty_like(send_counts)
        work = dist.all_to_all_single(recv_counts, send_counts, group=self._group(), async_op=True)
        return Pending(recv_counts, work)


class ExchangeCounts(Collective):
    """Blocking all-to-all of per-(rank, local expert) token counts: [P, E_local] -> [P, E_local].

    The receiver needs the counts before it can size its buffers; this is the one
    synchronising exchange per layer of synchronous expert parallelism.
    """

    def forward(self, send_counts: torch.Tensor) -> torch.Tensor:
        recv_counts = torch.empty_like(send_counts)
        start = time.perf_counter()
        dist.all_to_all_single(recv_counts, send_counts, group=self._group())
        BlockedClock.add(start)
        return recv_counts


def bind_groups(module: nn.Module, groups: dict[str, dist.ProcessGroup]) -> None:
    """Give every collective in `module` the process group of its axis."""
    for sub in module.modules():
        if isinstance(sub, Collective):
            if sub.axis not in groups:
                raise RuntimeError(f"no process group for mesh axis {sub.axis!r} (have {sorted(groups)})")
            sub.group = groups[sub.axis]


def pick_backend(requested: str) -> str:
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ValueError("runtime.backend is 'nccl' but CUDA is not available; use 'gloo' or 'auto'")
    return requested


def init_process_group(backend: str, timeout_s: float, world_size: int) -> None:
    """Join the default process group: the existing one, torchrun's, or a one-rank group.

    Every collective on it fails after `timeout_s` rather than hanging.
    """
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    elif world_size == 1:
        store = dist.HashStore()
        dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timeout)
    else:
        raise RuntimeError(
            f"this plan needs {world_size} ranks but no process group exists; launch with "
            f"`torchrun --nproc_per_node={world_size} ...` or call torch.distributed.init_process_group first"
        )
    log.info("rank %d/%d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)
