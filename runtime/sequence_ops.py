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


class KVAttention(nn.Module):
    """Graph node for the attention of one patch's queries to a K/V buffer over every token whose
    other patches may be from an earlier step: q [B,h,n,d] (this patch's rows), kv [2,B,h,N,d],
    an optional [B, N] key mask -> [B,h,n,d]. A module, so a test can watch which K/V each
    attention read."""

    def __init__(self, scale: float | None):
        super().__init__()
        self.scale = scale

    def forward(self, q, kv, mask=None):
        return attend_joint(q, kv, self.scale, mask)


def piece_bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    """Where piece `index` of `total` items split into `parts` starts and stops, as `tensor_split` cuts."""
    sizes = [total // parts + (i < total % parts) for i in range(parts)]
    start = sum(sizes[:index])
    return start, start + sizes[index]


def write_patch(buffer: torch.Tensor, rows: torch.Tensor, index: int, parts: int, dim: int) -> torch.Tensor:
    """Overwrite patch `index` of `parts` along `dim` of `buffer` (K/V [2,B,h,N,d], router scores
    [B,N,E]) with this step's `rows`, in place; returns the buffer."""
    start, stop = piece_bounds(buffer.shape[dim], parts, index)
    buffer.narrow(dim, start, stop - start).copy_(rows)
    return buffer


def with_piece(gathered: torch.Tensor, kv: torch.Tensor, index: int) -> torch.Tensor:
    """Every rank's image k and v from an all-gather, [G,2,B,h,n,d] -> [2,B,h,G*n,d] (a copy), with
    this rank's piece (`index`) replaced by this step's k and v [2,B,h,n,d]."""
    gathered[index] = kv  # the gathered buffer is done with: overwrite it, then one copy
    return from_ranks(gathered, 3)


def with_text(kv: torch.Tensor, image: torch.Tensor, before: int, piece: int) -> torch.Tensor:
    """kv [2,B,h,L,d] of this rank's rows with its `piece` image rows (after `before` text rows)
    replaced by `image`, the image rows of every rank (the text rows around them are kept)."""
    after = kv.shape[-2] - before - piece
    if before == after == 0:
        return image
    return torch.cat([kv.narrow(-2, 0, before), image, kv.narrow(-2, before + piece, after)], -2)


def patch_buffer(like: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor of `shape` (its batch taken from `like`) and `dtype` on `like`'s device, for a
    value arriving from another rank."""
    return like.new_empty((like.shape[0], *shape[1:]), dtype=dtype)


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


def attend_block(q: torch.Tensor, kv: torch.Tensor, scale: float | None,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q to one block of keys: (output [B,h,n,d], log-sum-exp of the scores [B,h,n]).
    `mask`: an additive [B,1,1,keys] mask for the block (`key_block_mask`), or None."""
    k, v = kv.unbind(0)
    if mask is not None:
        mask = mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask,
                                                                              scale=scale)[:2]
    else:
        # CUDA (and the meta device the simulator stands GPU models on): the memory-efficient
        # kernel returns the log-sum-exp too, padded along the queries
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, True, scale=scale)[:2]
        lse = lse[..., : q.shape[-2]]
    if mask is not None:  # a block whose keys are all masked carries no weight (the kernels differ on its lse)
        dead = mask.isneginf().all(-1)
        out, lse = out.masked_fill(dead.unsqueeze(-1), 0), lse.masked_fill(dead, float("-inf"))
    return out, lse


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


# -- joint attention: image rows split over the ranks, text rows on every rank --------------
# (see [Note: joint layouts] in moedit/passes/sequence_parallel.py). A layout (before, tokens,
# after, dim) says a value's token dim holds `before` text rows, the image's rows (`tokens` of
# them over all ranks, a contiguous piece here) and `after` text rows.

def _rows(value: torch.Tensor, dim: int, start: int, length: int) -> torch.Tensor:
    return value.narrow(dim, start, length)


def take_rows(value: torch.Tensor, layout, parts: int, index: int, element: int | None = None):
    """This rank's rows of a value holding every row of `layout` (its text rows and piece
    `index` of `parts` of the image's rows). `element`: cut that element of a tuple instead."""
    if element is not None:
        return (*value[:element], take_rows(value[element], layout, parts, index), *value[element + 1:])
    before, tokens, after, dim = layout
    start, stop = piece_bounds(tokens, parts, index)
    piece = _rows(value, dim, before + start, stop - start)
    if before == after == 0:
        return piece
    return torch.cat([_rows(value, dim, 0, before), piece, _rows(value, dim, before + tokens, after)], dim)


def join_rows(gathered: torch.Tensor, layout) -> torch.Tensor:
    """Every rank's rows of a value, [G, ...] from an all-gather, as one value in the global
    order of `layout`: the image's pieces in rank order, the text rows once (rank 0's copy)."""
    before, tokens, after, dim = layout
    piece = tokens // gathered.shape[0]
    image = from_ranks(_rows(gathered, dim + 1, before, piece), dim)
    if before == after == 0:
        return image
    first = gathered[0]
    return torch.cat([_rows(first, dim, 0, before), image, _rows(first, dim, before + piece, after)], dim)


def join_patches(pieces: list[torch.Tensor], layout) -> torch.Tensor:
    """A value's patches joined in the global order of `layout`: every patch's image rows, and the
    text rows around them from the last patch (the one that saw this step's K/V of every patch)."""
    before, _, after, dim = layout
    last = pieces[-1]
    image = [_rows(piece, dim, before, piece.shape[dim] - before - after) for piece in pieces]
    return torch.cat([_rows(last, dim, 0, before), *image, _rows(last, dim, last.shape[dim] - after, after)], dim)


class JointProjections(nn.Module):
    """Graph node for a joint attention's q [B,h,Lq,d] and k, v [2,B,h,Lk,d] over this rank's
    rows of its streams, through its adapter (plain self-attention: `qkv` of its first argument)."""

    def __init__(self, adapter, attn: nn.Module, first: str):
        super().__init__()
        self.adapter, self.first = adapter, first
        self.joint = adapter.streams(attn) is not None  # asked once, not at every call
        object.__setattr__(self, "_attn", attn)  # a view, see [Note: layer views] in expert_ops.py

    def forward(self, **args):
        if not self.joint:
            q, k, v = self.adapter.qkv(self._attn, args[self.first])
        else:
            q, k, v = self.adapter.joint_qkv(self._attn, args)
        return q, torch.stack([k, v])


class JointOutput(nn.Module):
    """Graph node for what a joint attention returns, from o [B,h,Lq,d] over this rank's rows."""

    def __init__(self, adapter, attn: nn.Module):
        super().__init__()
        self.adapter = adapter
        self.joint = adapter.streams(attn) is not None
        object.__setattr__(self, "_attn", attn)  # a view

    def forward(self, o, **args):
        if not self.joint:
            return self.adapter.out(self._attn, o)
        return self.adapter.joint_out(self._attn, o, args)


def image_heads_to_ranks(q: torch.Tensor, kv: torch.Tensor, q_before: int, k_before: int, piece: int,
                         ranks: int) -> torch.Tensor:
    """The image rows of q [B,h,Lq,d] and kv [2,B,h,Lk,d], [U,3,B,h/U,n,d]: row j goes to rank j."""
    image = torch.cat([_rows(q, 2, q_before, piece).unsqueeze(0), _rows(kv, 3, k_before, piece)])
    return heads_to_ranks(image, ranks)


def joint_rows(image: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, q_layout, k_layout, piece: int, ranks: int,
               index: int):
    """q [B,h/U,Lq',d] and kv [2,B,h/U,Lk',d] for this rank's heads: the text rows of q and kv
    (every rank holds them: this rank's heads are cut out) around the image rows `image`
    [3,B,h/U,m,d] (after the Ulysses exchange, or this rank's own rows if there is none)."""
    heads = q.shape[1] // ranks
    q, kv = _rows(q, 1, index * heads, heads), _rows(kv, 2, index * heads, heads)

    return with_text(q, image[0], q_layout[0], piece), with_text(kv, image[1:], k_layout[0], piece)


def image_out_to_ranks(o: torch.Tensor, before: int, rows: int, ranks: int) -> torch.Tensor:
    """The image rows of o [B,h/U,Lq',d] back to the ranks they came from, [U,B,h/U,n,d]."""
    return tokens_to_ranks(_rows(o, 2, before, rows), ranks)


def text_rows(value: torch.Tensor, before: int, rows: int) -> torch.Tensor:
    """The text rows of o [B,h',L,d] or kv [2,B,h',L,d]: those around the `rows` image rows after `before`."""
    after = value.shape[-2] - before - rows
    return torch.cat([_rows(value, -2, 0, before), _rows(value, -2, before + rows, after)], -2)


def image_rows(kv: torch.Tensor, before: int, rows: int) -> torch.Tensor:
    """The `rows` image rows of kv [2,B,h',L,d] after its `before` text rows."""
    return _rows(kv, -2, before, rows)


def text_key_mask(mask: torch.Tensor, keys) -> torch.Tensor:
    """The text columns of a [B, Lk] key mask over the keys of layout `keys`, additive, [B,1,1,T]."""
    before, tokens, after, _ = keys
    columns = torch.cat([mask.narrow(1, 0, before), mask.narrow(1, before + tokens, after)], 1)
    return key_block_mask(columns, 0, columns.shape[1])


def joint_output(image: torch.Tensor, text: torch.Tensor | None, before: int) -> torch.Tensor:
    """o [B,h,Lq,d] over this rank's rows: its image rows [B,h,n,d] and the text rows [B,h,T,d]
    (gathered from every rank's heads, or None if there are none), `before` of them first."""
    if text is None:
        return image
    return torch.cat([_rows(text, 2, 0, before), image, _rows(text, 2, before, text.shape[2] - before)], 2)


def key_block_mask(mask: torch.Tensor | None, start: int, length: int) -> torch.Tensor | None:
    """Columns [start, start+length) of a [B, Lk] key mask (True: attend), as an additive
    [B,1,1,length] mask for one block of keys; None without a mask."""
    if mask is None:
        return None
    block = mask.narrow(1, start, length)
    additive = torch.zeros(block.shape, dtype=torch.float32, device=block.device).masked_fill_(~block.bool(),
                                                                                              float("-inf"))
    return additive[:, None, None, :]


def attend_joint(q: torch.Tensor, kv: torch.Tensor, scale: float | None, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale) v over the keys present, a [B, Lk] key mask applied. -> [B,h,Lq,d]."""
    if mask is not None:
        mask = mask.bool()[:, None, None, :]
    return F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=mask, scale=scale)
