"""The local (non-communicating) pieces of an expert-parallel MoE layer.

Shape legend: T tokens on this rank, K experts per token, H hidden, P ranks in the
expert-parallel group, L = E / P local experts per rank, R rows received.
Layout: expert e lives on rank e % P as local expert e // P (DICE's layout).

    route      tokens [T,H]           -> expert_ids [T,K], weights [T,K] (id -1: an empty slot)
    permute    tokens, expert_ids     -> rows [T*K,H] sorted by (rank, local expert),
                                         order [T*K], send_counts [P,L]
    (dispatch) rows                   -> received [R,H], grouped by (source rank, local expert)
    experts    received, recv_counts  -> outputs [R,H], same order
    (combine)  outputs                -> returned [T*K,H], in `rows` order
    unpermute  returned, order, weights -> routed [T,H] = sum_k weights[:,k] * expert_k(token)
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

from .kernels import load as load_kernels

# [Note: layer views]
# The graph nodes below are children of the MoE layer they serve, and they reach that
# layer's gate and experts through plain Python references rather than as registered
# submodules. Registering them would make the module tree cyclic (layer -> router ->
# layer) or list every expert's weights twice in the state dict. The weights stay
# registered at their original paths, so `.to(device)` and `state_dict()` see them once.


class Router(nn.Module):
    """Graph node for a MoE layer's gate, through its adapter. [T,H], *extra -> ([T,K], [T,K]).

    For an adapter with `empty_slots` (expert-choice routing, see [Note: adapter shapes] in
    moedit/adapters.py) it checks that K is the adapter's top_k, the same on every call (a
    stale layer unpermutes one step's rows with another step's weights), and zeroes the
    weights of empty slots (id -1), whose outputs are then zero in any step."""

    def __init__(self, adapter, moe: nn.Module):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "_moe", moe)  # a view, see [Note: layer views]

    def forward(self, tokens, *extra, **extra_kwargs):
        expert_ids, weights = self.adapter.route(self._moe, tokens, *extra, **extra_kwargs)
        return self.checked(expert_ids, weights)

    def checked(self, expert_ids, weights):
        expert_ids = expert_ids.long()
        if self.adapter.empty_slots:
            top_k = self.adapter.top_k(self._moe)
            if expert_ids.shape[-1] != top_k:
                raise ValueError(f"{type(self.adapter).__name__}.route returned {expert_ids.shape[-1]} slots per "
                                 f"token, but its top_k is {top_k}; a layer with empty slots returns top_k slots "
                                 "on every call (E for expert choice), -1 where a slot holds no expert")
            weights = weights.masked_fill(expert_ids < 0, 0)
        return expert_ids, weights


class Scores(Router):
    """Graph node for the first step of an expert choice routed in two (see [Note: adapter shapes]):
    [T,H], *extra -> router scores [T,E]."""

    def forward(self, tokens, *extra, **extra_kwargs):
        return self.adapter.scores(self._moe, tokens, *extra, **extra_kwargs)


class Choice(Router):
    """... and the second: scores [B,N,E] over every token of each image -> (ids, weights) [B,N,E]."""

    def forward(self, scores):
        return self.checked(*self.adapter.choose(self._moe, scores))


def by_image(scores: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[T,E] -> [B,n,E], the batch and token dims of the layer's input x [B,n,H]."""
    return scores.unflatten(0, x.shape[:2])


def permute(tokens: torch.Tensor, expert_ids: torch.Tensor, world_size: int, num_local: int,
            keep: torch.Tensor | None = None, kernels: str = "torch"):
    """Sort each (token, slot) copy by destination rank, then local expert.

    `keep` [T,K] (bool), if given, leaves the unmarked slots out (conditional
    communication, and the empty slots of expert-choice layers: `expert_ids >= 0`);
    `order` then lists only the kept (token * K + slot) positions.
    `kernels` "triton": the rows are gathered by a kernel (moedit/runtime/kernels).
    """
    flat = expert_ids.reshape(-1)
    key = (flat % world_size) * num_local + flat // world_size
    if keep is not None:
        key = torch.where(keep.reshape(-1), key, world_size * num_local)  # dropped slots sort last
    order = torch.argsort(key, stable=True)
    # not bincount: on CUDA it reads the keys' min and max on the host, two syncs (see splits)
    counts = torch.zeros(world_size * num_local + 1, dtype=torch.long, device=key.device).scatter_add_(
        0, key, torch.ones_like(key))
    order = order[: int(counts[:-1].sum())] if keep is not None else order
    if kernels == "triton":
        rows = load_kernels().gather_rows(tokens, order, expert_ids.shape[1])
    else:
        rows = tokens[order // expert_ids.shape[1]]
    send_counts = counts[: world_size * num_local].reshape(world_size, num_local)
    return rows, order, send_counts


class DropSlots(nn.Module):
    """Conditional communication: which of each token's K slots to send this step.
    (run, expert_ids [T,K], weights [T,K]) -> keep [T,K] bool.

    Slots are sorted by score (top-k order), so "low" drops the last `count`, "high" the
    first `count`, "random" any `count` per token, and "threshold" every slot whose
    router weight is below `threshold` (never the top slot). "random" draws from the run's
    seed, step, this layer and the rank, so a seed gives the same images every time (at a
    given world size: each rank draws for its own tokens).
    """

    def __init__(self, policy: str, count: int = 1, threshold: float = 0.0, layer: int = 0, kernels: str = "torch"):
        super().__init__()
        self.policy, self.count, self.threshold, self.layer = policy, count, threshold, layer
        self.kernels = kernels

    def extra_repr(self) -> str:
        return f"policy={self.policy!r}, count={self.count}, threshold={self.threshold}, kernels={self.kernels!r}"

    def forward(self, run, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        top_k = expert_ids.shape[1]
        if self.kernels == "triton" and self.policy != "random" and top_k & (top_k - 1) == 0:
            return load_kernels().drop_slots(weights, self.policy, self.count, self.threshold)
        return self.reference(run, expert_ids, weights)

    def reference(self, run, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        num_tokens, top_k = expert_ids.shape
        keep = torch.ones(num_tokens, top_k, dtype=torch.bool, device=expert_ids.device)
        if self.policy == "low":
            keep[:, top_k - self.count:] = False
        elif self.policy == "high":
            keep[:, : self.count] = False
        elif self.policy == "random":
            key = f"{run.seed},{run.step},{self.layer},{run.rank}".encode()
            generator = torch.Generator().manual_seed(int.from_bytes(hashlib.blake2b(key, digest_size=7).digest()))
            scores = torch.rand(num_tokens, top_k, generator=generator)
            if expert_ids.is_cuda:  # a pageable copy would stall the host
                scores = scores.pin_memory()
            scores = scores.to(expert_ids.device, non_blocking=True)
            keep.scatter_(1, scores.topk(self.count, dim=1).indices, False)
        else:
            keep = weights >= self.threshold
            keep[:, 0] = True
        return keep


def splits(counts: torch.Tensor, *also: torch.Tensor) -> list[int]:
    """Rows per rank, as the Python list an all-to-all takes. [P,L] -> P ints.

    [Note: one host sync per layer]
    Count tensors live on the device; the exchanges and the experts need them as Python
    ints, and every device->host copy stalls the host until the GPU catches up. A layer's
    send counts are split with its receive counts as `also`, so both come over in one copy,
    which stays on the tensors (`host_counts`): the receive splits, the experts' group sizes
    and the expert offloading read it again for free. One sync per layer (with
    `expert_parallel.chunks`, the first chunk's splits bring every chunk's counts; trimming
    `order` in `permute` for a keep mask adds one)."""
    _to_host(counts, *also)
    return [sum(row) for row in host_counts(counts)]


def host_counts(counts: torch.Tensor) -> list[list[int]]:
    """`counts` [P, ...] as Python ints, one list per rank; copied from the device once per tensor."""
    _to_host(counts)
    flat, width = counts._moedit_host, counts.shape[1:].numel()
    return [flat[i * width: (i + 1) * width] for i in range(len(counts))]


def rows_per_expert(recv_counts: torch.Tensor) -> list[int]:
    """Rows each local expert receives, from all ranks: [P, L] counts -> L ints (host copy, see splits)."""
    return [sum(column) for column in zip(*host_counts(recv_counts))]


def _to_host(*tensors: torch.Tensor) -> None:
    """Keep on each tensor its values as a flat Python list, made by one device->host copy for all."""
    missing = list({id(t): t for t in tensors if not hasattr(t, "_moedit_host")}.values())
    if missing:
        flat = torch.cat([t.reshape(-1) for t in missing]).tolist()
        for t in missing:
            t._moedit_host, flat = flat[: t.numel()], flat[t.numel():]


class LocalExperts(nn.Module):
    """The experts this rank holds, run on rows grouped by (source rank, local expert)."""

    def __init__(self, experts: list[nn.Module], expert_ids: list[int], kernels: str = "torch"):
        super().__init__()
        object.__setattr__(self, "_experts", list(experts))  # views, see [Note: layer views]
        self.expert_ids = list(expert_ids)  # global ids, for explain() and dumps
        self.offload_layer: int | None = None  # set by the offload pass: the store's layer key
        self.kernels = kernels  # "triton": one grouped SwiGLU kernel launch per projection
        self._stacked: tuple | None = None  # (device, dtype, gate, up, down) for the kernels

    def extra_repr(self) -> str:
        return f"global_ids={self.expert_ids}, kernels={self.kernels!r}"

    def forward(self, received: torch.Tensor, recv_counts: torch.Tensor, fetched=None) -> torch.Tensor:
        """`fetched` (expert offloading, moedit/runtime/offload.py): run the experts on the
        device copies it made, not on the modules' own weights (with torch, not the kernels)."""
        num_local = len(self._experts)
        local_of_row = torch.arange(num_local, device=received.device).repeat(recv_counts.shape[0])
        local_of_row = torch.repeat_interleave(local_of_row, recv_counts.reshape(-1), output_size=len(received))
        by_expert = torch.argsort(local_of_row, stable=True)
        sizes = rows_per_expert(recv_counts)
        outputs = torch.empty_like(received)
        if self.kernels == "triton" and fetched is None:
            outputs[by_expert] = load_kernels().grouped_swiglu(received[by_expert], sizes, *self._weights(received))
            return outputs
        grouped = received[by_expert].split(sizes)
        if fetched is None:
            outputs[by_expert] = torch.cat([expert(rows) for expert, rows in zip(self._experts, grouped)])
            return outputs
        try:
            outputs[by_expert] = torch.cat([fetched.run(expert, e, rows) if len(rows) else rows
                                            for expert, e, rows in zip(self._experts, self.expert_ids, grouped)])
        finally:
            fetched.release()
        return outputs

    def _weights(self, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The experts' weights stacked [L,F,H], [L,F,H], [L,H,F] for the grouped kernel, made once
        per device and dtype (a second copy of this rank's expert weights)."""
        if self._stacked is None or self._stacked[:2] != (like.device, like.dtype):
            weights = [swiglu_weights(expert) for expert in self._experts]
            self._stacked = (like.device, like.dtype,
                             *(torch.stack(w).to(like.device, like.dtype).contiguous() for w in zip(*weights)))
        return self._stacked[2:]

    def release(self) -> None:
        """Drop the stacked copy of the experts' weights the Triton kernels run on (`_weights`), a
        second copy of this rank's expert weights. The experts themselves are the model's and
        stay; a later forward with the kernels stacks them again."""
        self._stacked = None


def swiglu_weights(expert: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """(gate, up, down) weights of a SwiGLU expert down(silu(gate x) * up x) without biases
    (`gate_proj`, `up_proj`, `down_proj`, as DiT-MoE's MoeMLP), or None: the kernels run only these."""
    layers = [getattr(expert, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if all(isinstance(layer, nn.Linear) and layer.bias is None for layer in layers):
        return tuple(layer.weight for layer in layers)
    return None


def unpermute(returned: torch.Tensor, order: torch.Tensor, weights: torch.Tensor,
              slots: torch.Tensor | None = None, kernels: str = "torch") -> torch.Tensor:
    """Put expert outputs back in (token, slot) order and sum the slots, weighted. -> [T,H].

    `slots` [T*K,H], if given, supplies the outputs of slots that were not sent (their
    positions are absent from `order`); it is updated in place with the returned rows.
    `kernels` "triton" (without `slots`): one kernel reads each token's rows and sums them.
    """
    if kernels == "triton" and slots is None:
        return load_kernels().weighted_sum(returned, order, weights)
    num_tokens, top_k = weights.shape
    if slots is None:
        slots = returned.new_zeros((num_tokens * top_k, returned.shape[-1]))
    slots[order] = returned
    return (slots.reshape(num_tokens, top_k, slots.shape[-1]) * weights.unsqueeze(-1).to(returned.dtype)).sum(dim=1)


class Merge(nn.Module):
    """The adapter's merge of routed and shared outputs (and the layer's extra inputs, if any)."""

    def __init__(self, adapter, moe: nn.Module):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "_moe", moe)  # a view, see [Note: layer views]

    def forward(self, routed, shared=None, *extra, **extra_kwargs):
        return self.adapter.combine(self._moe, routed, shared, *extra, **extra_kwargs)


class Output(nn.Module):
    """What the layer's forward returns, built by its adapter from the output [B,N,H]
    (a layer that returns (out, aux_loss), say)."""

    def __init__(self, adapter, moe: nn.Module):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "_moe", moe)  # a view, see [Note: layer views]

    def forward(self, out):
        return self.adapter.output(self._moe, out)


class OffloadedExpert(nn.Module):
    """Stands in for a local expert whose weights the run's `ExpertStore` holds (offloading),
    so that moving the program to the device leaves them in host memory."""

    def __init__(self, expert: int):
        super().__init__()
        self.expert = expert

    def extra_repr(self) -> str:
        return f"expert={self.expert}, in host memory"

    def forward(self, *args):
        raise RuntimeError(f"expert {self.expert} is offloaded; it runs through the run's expert store")


class RemovedExpert(nn.Module):
    """Stands in for an expert that lives on another rank."""

    def __init__(self, expert: int, rank: int):
        super().__init__()
        self.expert, self.rank = expert, rank

    def extra_repr(self) -> str:
        return f"expert={self.expert}, on rank {self.rank}"

    def forward(self, *args):
        raise RuntimeError(f"expert {self.expert} lives on rank {self.rank}; it cannot run here")
