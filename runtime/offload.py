"""Expert offloading (ScMoE, REFERENCE.md): routed experts live in host memory, and only
those a layer's tokens were routed to are copied to the device, least recently used first
out, under a budget of resident experts.

    fetch(layer, needed)   after the token counts are known: start copying the needed
                           experts that are not resident (evicting others), return a `Fetch`
    Fetch.run(expert, e, x) (the experts node) wait for expert e's copy and run it;
    Fetch.release()        once the layer's experts ran, they may be evicted

On CUDA the host copies are pinned and the copies run on a copy stream of their own,
ordered by events: the compute stream waits for a copy only when it reaches the experts,
so a copy issued before the block's attention (the shortcut schedule puts the fetch right
after the counts) is hidden behind it. On the CPU host and device memory are one, so the
copies are real but synchronous and save nothing; the tests there check exactness and
the budget, the memory figure needs a GPU. The budget bounds the copies the store holds;
on CUDA an evicted copy's memory returns to the caching allocator once the compute stream
is done with it.
"""

from __future__ import annotations

import collections

import torch
from torch import nn
from torch.func import functional_call


def expert_bytes(expert: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in expert.parameters())


def budget_in_experts(settings, bytes_per_expert: int) -> int:
    """The plan's offload budget (`Plan.offload`: resident_experts or budget_mb), in experts."""
    if settings.resident_experts is not None:
        return settings.resident_experts
    return int(settings.budget_mb * 2**20 // bytes_per_expert)


class OffloadError(RuntimeError):
    """The resident-expert budget cannot hold what the program needs at once."""


class ExpertStore:
    """This rank's routed experts: host copies of all, device copies of at most `budget`."""

    def __init__(self, experts: dict[tuple[int, int], nn.Module], device: torch.device, settings):
        """`settings`: the plan's `offload` section (resident_experts or budget_mb)."""
        self.device = device
        self.bytes_per_expert = max(map(expert_bytes, experts.values()), default=0)
        self.budget = budget_in_experts(settings, max(self.bytes_per_expert, 1))
        cuda = device.type == "cuda"
        # The experts' own weights are the host copies (pinned on CUDA); a model moved to the
        # device before compiling keeps its experts there as well, which saves nothing.
        self.host = {key: {name: (p.detach().cpu().pin_memory() if cuda else p.detach())
                           for name, p in module.named_parameters()} for key, module in experts.items()}
        self.resident: collections.OrderedDict = collections.OrderedDict()  # key -> {name: device tensor}, LRU first
        self.in_use: collections.Counter = collections.Counter()  # key -> fetches not yet run
        self.events: dict = {}  # key -> the CUDA event its copy recorded
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.copies = self.hits = self.peak_resident = 0
        self.released = False

    def fetch(self, layer: int, needed: list[int]) -> "Fetch":
        if self.released:
            raise RuntimeError("ExpertStore.fetch after release(): the runtime that owned this store was closed; "
                               "start a new runtime")
        keys = [(layer, e) for e in needed]
        for key in keys:  # all of them in use first, so that making room never evicts one of them
            self.in_use[key] += 1
            if key in self.resident:
                self.resident.move_to_end(key)
                self.hits += 1
        for key in keys:
            if key not in self.resident:
                self._make_room(key)
                self.resident[key] = self._copy(key)
                self.copies += 1
        self.peak_resident = max(self.peak_resident, len(self.resident))
        return Fetch(self, layer, keys)

    def _make_room(self, key) -> None:
        while len(self.resident) >= self.budget:
            victim = next((k for k in self.resident if not self.in_use[k]), None)
            if victim is None:
                raise OffloadError(f"offload: expert {key[1]} of layer {key[0]} must be resident, but all "
                                   f"{self.budget} resident experts are fetched for layers whose experts have not "
                                   f"run yet; raise offload.resident_experts (or budget_mb)")
            del self.resident[victim]
            self.events.pop(victim, None)

    def _copy(self, key) -> dict[str, torch.Tensor]:
        if self.stream is None:
            return {name: t.to(self.device, copy=True) for name, t in self.host[key].items()}
        with torch.cuda.stream(self.stream):
            params = {name: t.to(self.device, non_blocking=True) for name, t in self.host[key].items()}
            self.events[key] = torch.cuda.Event()
            self.events[key].record(self.stream)
        return params

    def params(self, key) -> dict[str, torch.Tensor]:
        """Expert `key`'s device weights, usable on the current stream."""
        params = self.resident[key]
        event = self.events.pop(key, None)
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for t in params.values():  # allocated on the copy stream, used on this one
                t.record_stream(stream)
        return params

    def forget_fetches(self) -> None:
        """Release every expert still marked in use (a step that failed between a fetch and its experts)."""
        self.in_use.clear()

    def release(self) -> None:
        """Drop every copy the store holds: the resident experts' device copies (on CUDA their
        memory returns to the caching allocator once the compute stream is done with them), their
        copy events, and the host copies (pinned ones on CUDA; on the CPU they are the model's own
        weights, of which only the references go). The store cannot fetch afterwards."""
        self.resident.clear()
        self.events.clear()
        self.in_use.clear()
        self.host = {}
        self.stream = None
        self.released = True


class Fetch:
    """One layer's needed experts, resident until the layer's experts have run."""

    def __init__(self, store: ExpertStore, layer: int, keys: list[tuple[int, int]]):
        self.store, self.layer, self.keys = store, layer, keys

    def run(self, expert: nn.Module, expert_id: int, x: torch.Tensor) -> torch.Tensor:
        """`expert` on its device copy of the weights."""
        return functional_call(expert, self.store.params((self.layer, expert_id)), (x,))

    def release(self) -> None:
        for key in self.keys:
            self.store.in_use[key] -= 1
