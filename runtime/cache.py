"""Values that live from one diffusion step to a later one: staleness caches.

A stale program reads what an earlier step left: an exchange still in flight (a
`Pending`), or a finished one with what is needed to use it (the token order, the
counts). Passes insert `CacheWrite(key)` and `CacheRead(key)` nodes; the runtime binds
one `StepCache` to every program of a rank, so a key written by the synchronous program
at step t is read by the stale program at step t+1.

Byte accounting counts every tensor held (in-flight buffers included) and fails with a
clear error when the plan's limit would be exceeded.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from .comm import Pending
from .expert_ops import unpermute


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


def in_flight(pending: Pending, order, send_counts, recv_counts) -> InFlight:
    """Graph node: bundle an exchange with its bookkeeping."""
    return InFlight(pending, order, send_counts, recv_counts)


def ready(tensor: torch.Tensor) -> Pending:
    """Graph node: a finished exchange (the synchronous program fills caches with these)."""
    return Pending(tensor, None)


class StepCache:
    """Named values carried across diffusion steps, with byte accounting and a limit."""

    def __init__(self, limit_bytes: int | None = None):
        self.limit_bytes = limit_bytes
        self.entries: dict[str, InFlight | torch.Tensor] = {}
        self.peak_bytes = 0

    def nbytes(self) -> int:
        tensors = [t for v in self.entries.values() for t in (v.tensors() if isinstance(v, InFlight) else [v])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def write(self, key: str, value: InFlight | torch.Tensor) -> None:
        self.entries[key] = value
        used = self.nbytes()
        self.peak_bytes = max(self.peak_bytes, used)
        if self.limit_bytes is not None and used > self.limit_bytes:
            raise MemoryError(f"staleness caches hold {used / 2**20:.2f} MiB, over the plan's limit of "
                              f"{self.limit_bytes / 2**20:.2f} MiB (staleness.cache_limit_mb); raise the limit, "
                              "keep more layers synchronous (selective_sync) or use a smaller batch")

    def read(self, key: str) -> InFlight | torch.Tensor:
        if key not in self.entries:
            raise RuntimeError(f"staleness cache {key!r} is empty: a stale step ran before any synchronous step "
                               "filled it; keep staleness.warmup_steps >= 1")
        return self.entries[key]

    def drain(self) -> None:
        """Finish every exchange still in flight and forget everything (between samples)."""
        for value in self.entries.values():
            if isinstance(value, InFlight):
                value.pending.wait()
        self.entries.clear()


class CacheNode(nn.Module):
    """A graph node bound to its rank's StepCache when the runtime starts."""

    def __init__(self, key: str):
        super().__init__()
        self.key = key
        self.cache: StepCache | None = None

    def extra_repr(self) -> str:
        return f"key={self.key!r}"

    def _cache(self) -> StepCache:
        if self.cache is None:
            raise RuntimeError(f"{type(self).__name__} {self.key!r} has no cache; run through CompiledModel.to_runtime()")
        return self.cache


class CacheWrite(CacheNode):
    def forward(self, value: InFlight) -> None:
        self._cache().write(self.key, value)


class CacheRead(CacheNode):
    def forward(self) -> InFlight:
        return self._cache().read(self.key)


class SlotCache(CacheNode):
    """Conditional communication's unpermute: returns the weighted sum of a token's K slot
    outputs, taking the slots that were not sent from the outputs cached when all K were
    last sent, and caching all K whenever they were. (`unpermute`'s contract otherwise.)"""

    def forward(self, returned: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = weights.shape
        if order.numel() == num_tokens * top_k:  # every slot was sent: refresh the cache
            slots = returned.new_empty((num_tokens * top_k, returned.shape[-1]))
            routed = unpermute(returned, order, weights, slots=slots)
            self._cache().write(self.key, slots)
            return routed
        return unpermute(returned, order, weights, slots=self._cache().read(self.key).clone())


def bind_cache(module: nn.Module, cache: StepCache) -> None:
    for sub in module.modules():
        if isinstance(sub, CacheNode):
            sub.cache = cache
