"""Values that live from one diffusion step to a later one: staleness caches.

A stale program reads what an earlier step left: an exchange still in flight (a
`Pending`: patch parallelism's K/V gathers), or one with what is needed to use it (an
`InFlight`: the token order, the counts), or a tensor (PipeFusion's K/V buffers). Passes
insert `cache_write` and `cache_read` ops (moedit/runtime/ops.py); each run has one
`StepCache` that every program reads through its `run` input, so a key written by the
synchronous program at step t is read by the stale program at step t+1.

Byte accounting counts every tensor the cache holds (the receive buffers of exchanges in
flight included; their send buffers belong to the collective) and fails with a clear error
when the plan's limit is exceeded.
"""

from __future__ import annotations

import dataclasses

import torch

from .comm import Pending


@dataclasses.dataclass
class InFlight:
    """One layer's exchange and what its consumer needs: the token order of the step whose
    tokens these are, and the per-(rank, local expert) counts both ways."""

    pending: Pending
    order: torch.Tensor
    send_counts: torch.Tensor
    recv_counts: torch.Tensor

    def tensors(self):
        return [self.pending.output, self.order, self.send_counts, self.recv_counts]


class StepCache:
    """Named values carried across diffusion steps, with byte accounting and a limit."""

    def __init__(self, limit_bytes: int | None = None):
        self.limit_bytes = limit_bytes
        self.entries: dict[str, InFlight | Pending | torch.Tensor] = {}
        self.peak_bytes = 0

    def nbytes(self) -> int:
        tensors = [t for v in self.entries.values() for t in _tensors(v)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def write(self, key: str, value: InFlight | Pending | torch.Tensor) -> None:
        self.entries[key] = value
        self.peak_bytes = max(self.peak_bytes, self.nbytes())

    def over_limit(self, per_rank_bytes: list[int]) -> str | None:
        """Given every rank's peak bytes, the error to raise on every rank, or None. (Routing
        differs between ranks, so they agree on the verdict rather than each judging alone.)"""
        if self.limit_bytes is None or max(per_rank_bytes) <= self.limit_bytes:
            return None
        held = ", ".join(f"rank {r}: {b / 2**20:.2f} MiB" for r, b in enumerate(per_rank_bytes))
        return (f"staleness caches hold more than the plan's limit of {self.limit_bytes / 2**20:.2f} MiB "
                f"(staleness.cache_limit_mb) at their peak ({held}); raise the limit, keep more layers "
                "synchronous (selective_sync) or use a smaller batch")

    def read(self, key: str) -> InFlight | Pending | torch.Tensor:
        if key not in self.entries:
            raise RuntimeError(f"staleness cache {key!r} is empty: a stale step ran before any synchronous step "
                               "filled it; keep staleness.warmup_steps >= 1")
        return self.entries[key]

    def running(self) -> list[Pending]:
        """The exchanges that are still running."""
        pending = [v.pending if isinstance(v, InFlight) else v for v in self.entries.values()]
        return [p for p in pending if isinstance(p, Pending) and p.work is not None]


def _tensors(value: InFlight | Pending | torch.Tensor) -> list[torch.Tensor]:
    if isinstance(value, InFlight):
        return value.tensors()
    return [value.output if isinstance(value, Pending) else value]
