"""The local pieces of sequence-parallel attention (moedit/passes/sequence_parallel.py).

Shape legend: B batch, h heads, d head size, n tokens on this rank, U the Ulysses degree,
G ranks in a gather. q, k, v travel stacked as one [3,B,h,n,d] tensor ("qkv", k and v as
"kv" [2,B,h,n,d]).

Ulysses trades a token shard of every head for every token of a head shard:

    heads_to_ranks   [3,B,h,n,d]     -> [U,3,B,h/U,n,d]   row j goes to rank j (all-to-all)
    ranks_to_tokens  [U,3,B,h/U,n,d] -> [3,B,h/U,U*n,d]   row j came from rank j: its tokens
    tokens_to_ranks  [B,h/U,U*n,d]   -> [U,B,h/U,n,d]     and back, after attention
    ranks_to_heads   [U,B,h/U,n,d]   -> [B,h,n,d]

Ring attention keeps q and passes k and v around; each block's partial result carries the
log-sum-exp of its scores so that blocks merge exactly (`merge_blocks`).

Patch parallelism and PipeFusion keep a K/V buffer per attention layer over every token,
[2,B,h,N,d], in which only some patches' K/V are this step's (`with_piece`, `write_patch`);
`KVAttention` attends a patch's queries to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Projections(nn.Module):
    """Graph node for an attention layer's q/k/v projection, through its adapter. [B,n,H] -> [3,B,h,n,d]."""

    def __init__(self, adapter, attn: nn.Module):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "_attn", attn)  # a view, see [Note: layer views] in expert_ops.py

    def forward(self, x):
        return torch.stack(self.adapter.qkv(self._attn, x))


class OutputProjection(nn.Module):
    """Graph node for an attention layer's head merge and output projection. [B,h,n,d] -> [B,n,H]."""

    def __init__(self, adapter, attn: nn.Module):
        super().__init__()
        self.adapter = adapter
        object.__setattr__(self, "_attn", attn)  # a view

    def forward(self, out):
        return self.adapter.out(self._attn, out)


class KVAttention(nn.Module):
    """Graph node for the attention of one patch's queries to a K/V buffer over every token whose
    other patches may be from an earlier step: qkv [3,B,h,n,d] (this patch), kv [2,B,h,N,d] ->
    [B,h,n,d]. A module, so a test can watch which K/V each attention read."""

    def __init__(self, scale: float | None):
        super().__init__()
        self.scale = scale

    def forward(self, qkv, kv):
        return F.scaled_dot_product_attention(qkv[0], kv[0], kv[1], scale=self.scale)


def kv_of(qkv: torch.Tensor) -> torch.Tensor:
    """[3,B,h,n,d] -> k and v [2,B,h,n,d] in storage of their own (a buffer kept across steps
    must not keep q alive)."""
    return qkv[1:].clone()


def piece_bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    """Where piece `index` of `total` items split into `parts` starts and stops, as `tensor_split` cuts."""
    sizes = [total // parts + (i < total % parts) for i in range(parts)]
    start = sum(sizes[:index])
    return start, start + sizes[index]


def write_patch(kv: torch.Tensor, qkv: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    """Overwrite patch `index` of `parts` in the K/V buffer kv [2,B,h,N,d] with this step's k and v
    from qkv [3,B,h,n,d], in place; returns the buffer."""
    start, stop = piece_bounds(kv.shape[-2], parts, index)
    kv[..., start:stop, :] = qkv[1:]
    return kv


def with_piece(gathered: torch.Tensor, qkv: torch.Tensor, index: int) -> torch.Tensor:
    """Every rank's k and v from an all-gather, [G,2,B,h,n,d] -> [2,B,h,G*n,d] (a copy), with this
    rank's piece (`index`) replaced by this step's k and v from qkv [3,B,h,n,d]."""
    gathered[index] = qkv[1:]  # the gathered buffer is done with: overwrite it, then one copy
    return from_ranks(gathered, 3)


def token_buffer(like: torch.Tensor, tail: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty [B, n, *tail] tensor of `dtype` with `like`'s batch, token count and device, for
    a value arriving from another rank."""
    return like.new_empty((like.shape[0], like.shape[1], *tail), dtype=dtype)


def heads_to_ranks(qkv: torch.Tensor, ranks: int) -> torch.Tensor:
    return qkv.unflatten(-3, (ranks, -1)).movedim(-4, 0).contiguous()


def ranks_to_tokens(received: torch.Tensor) -> torch.Tensor:
    return received.movedim(0, -3).flatten(-3, -2)


def tokens_to_ranks(out: torch.Tensor, ranks: int) -> torch.Tensor:
    return out.unflatten(-2, (ranks, -1)).movedim(-3, 0).contiguous()


def ranks_to_heads(received: torch.Tensor) -> torch.Tensor:
    return received.movedim(0, -4).flatten(-4, -3)


def attend(qkv: torch.Tensor, scale: float | None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the tokens present. [3,B,h,n,d] -> [B,h,n,d]."""
    q, k, v = qkv.unbind(0)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attend_block(q: torch.Tensor, kv: torch.Tensor, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q to one block of keys: (output [B,h,n,d], log-sum-exp of the scores [B,h,n])."""
    k, v = kv.unbind(0)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)[:2]
        return out, lse
    # CUDA (and the meta device the simulator stands GPU models on): the memory-efficient
    # kernel returns the log-sum-exp too, padded along the queries
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
    return out, lse[..., : q.shape[-2]]


def merge_blocks(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
    """Two blocks' partial attention as if computed over both key sets at once. The merged
    output is float32 whatever the blocks' dtype, so a ring of R blocks rounds once at the
    end (`merged_output`), not at every turn."""
    (out_a, lse_a), (out_b, lse_b) = a, b
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a.float() * (lse_a - lse).exp().unsqueeze(-1) + out_b.float() * (lse_b - lse).exp().unsqueeze(-1)
    return out, lse


def merged_output(partial: tuple[torch.Tensor, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """The attention output of merged blocks, in the dtype of `like` (the queries)."""
    return partial[0].to(like.dtype)


def shard(tensor: torch.Tensor, dim: int, parts: int, index: int) -> torch.Tensor:
    """This rank's contiguous piece of `tensor` along `dim` (pieces may differ in size by one)."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() <= dim:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"cannot split an input of shape {shape} along axis {dim}: cfg_parallel splits every input "
                         "of the model along its first (batch) axis, and sequence parallelism the tokens along "
                         "axis 1; pass batch-first tensors")
    return tensor.tensor_split(parts, dim)[index]


def _batch(whole: torch.Tensor | int) -> int:
    return whole.shape[0] if isinstance(whole, torch.Tensor) else whole


def pad_rows(tensor: torch.Tensor, whole: torch.Tensor | int, parts: int) -> torch.Tensor:
    """A shard of a batch (`whole`: the batch or its size) padded to the largest shard's rows,
    so every rank gathers one size."""
    rows = -(-_batch(whole) // parts)
    if tensor.shape[0] == rows:
        return tensor
    return torch.cat([tensor, tensor.new_zeros((rows - tensor.shape[0], *tensor.shape[1:]))])


def from_ranks(gathered: torch.Tensor, dim: int) -> torch.Tensor:
    """[G, ...] gathered pieces -> their concatenation along `dim`."""
    return gathered.movedim(0, dim).flatten(dim, dim + 1)


def unpad_rows(gathered: torch.Tensor, whole: torch.Tensor | int) -> torch.Tensor:
    """[G, rows, ...] padded shards of a batch (`whole`: the batch or its size) -> [batch, ...]."""
    sizes = [len(piece) for piece in torch.arange(_batch(whole)).tensor_split(gathered.shape[0])]
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)])
