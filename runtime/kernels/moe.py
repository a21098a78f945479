"""The Triton kernels (see moedit/runtime/kernels/__init__.py). Import through `load()`.

Shape legend as in expert_ops.py: T tokens, K slots per token, H hidden, F expert width,
L local experts, R rows received. Every kernel accumulates in float32 and stores in its
output's dtype; blocks are masked, so no size needs to be a multiple of a block.

The kernels use Triton's builtins only (`tl.full`, not `tl.zeros`; the sigmoid spelled out):
the library functions written in Triton itself are defined once, when `triton.language` is
first imported, and if that happened before TRITON_INTERPRET was set (torch imports Triton
for its FLOP counter), they cannot run under the interpreter.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

ROWS, COLS, DEPTH = 16, 32, 32  # block sizes: rows of a group, output columns, the reduced dim


@triton.jit
def _gather_rows(src, index, out, num_rows, H, divisor, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[r] = src[index[r] // divisor]."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = (r < num_rows)[:, None] & (h < H)[None, :]
    source = tl.load(index + r, mask=r < num_rows, other=0) // divisor
    tl.store(out + r[:, None] * H + h[None, :], tl.load(src + source[:, None] * H + h[None, :], mask=mask), mask=mask)


def gather_rows(src: torch.Tensor, index: torch.Tensor, divisor: int) -> torch.Tensor:
    """[N,H], [M] -> [M,H]: row index[i] // divisor of src (permute: divisor K, index `order`)."""
    src = src.contiguous()
    out = src.new_empty((index.numel(), src.shape[-1]))
    if out.numel():
        grid = (triton.cdiv(out.shape[0], ROWS), triton.cdiv(out.shape[1], COLS))
        _gather_rows[grid](src, index.contiguous(), out, out.shape[0], out.shape[1], divisor, ROWS, COLS)
    return out


@triton.jit
def _weighted_sum(returned, position, weights, out, T, H, K: tl.constexpr, BLOCK_T: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    """out[t] = sum_k weights[t,k] * returned[position[t*K+k]] (slots at position -1: not sent, 0)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    acc = tl.full((BLOCK_T, BLOCK_H), 0.0, tl.float32)
    for k in range(K):
        pos = tl.load(position + t * K + k, mask=t < T, other=-1)
        w = tl.load(weights + t * K + k, mask=t < T, other=0.0).to(tl.float32)
        mask = (pos >= 0)[:, None] & (h < H)[None, :]
        rows = tl.load(returned + pos[:, None] * H + h[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += w[:, None] * rows
    tl.store(out + t[:, None] * H + h[None, :], acc.to(out.dtype.element_ty), mask=(t < T)[:, None] & (h < H)[None, :])


def weighted_sum(returned: torch.Tensor, order: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """unpermute without a slot cache: [len(order),H], [len(order)], [T,K] -> [T,H]."""
    num_tokens, top_k = weights.shape
    position = torch.full((num_tokens * top_k,), -1, dtype=torch.int64, device=returned.device)
    position[order] = torch.arange(order.numel(), device=returned.device)
    out = returned.new_empty((num_tokens, returned.shape[-1]))
    if out.numel():
        grid = (triton.cdiv(num_tokens, ROWS), triton.cdiv(out.shape[1], COLS))
        _weighted_sum[grid](returned.contiguous(), position, weights.to(returned.dtype).contiguous(), out,
                            num_tokens, out.shape[1], top_k, ROWS, COLS)
    return out


@triton.jit
def _grouped_matmul(x, w, v, out, tile_group, tile_row, group_end, N, D, SWIGLU: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """One tile of rows of one group g: out = x @ w[g]^T, or with SWIGLU
    silu(x @ w[g]^T) * (x @ v[g]^T). x [R,D], w and v [G,N,D], out [R,N]. PRECISION: `tl.dot`'s
    input_precision (see `dot_precision`)."""
    tile = tl.program_id(0)
    g = tl.load(tile_group + tile)
    rows = tl.load(tile_row + tile) + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    live = rows < tl.load(group_end + g)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    gate = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        a = tl.load(x + rows[:, None] * D + d[None, :], mask=live[:, None] & (d < D)[None, :], other=0.0)
        w_mask = (d < D)[:, None] & (cols < N)[None, :]
        b = tl.load(w + g * N * D + cols[None, :] * D + d[:, None], mask=w_mask, other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
        if SWIGLU:
            c = tl.load(v + g * N * D + cols[None, :] * D + d[:, None], mask=w_mask, other=0.0)
            gate += tl.dot(a, c, input_precision=PRECISION)
    if SWIGLU:
        acc = acc / (1.0 + tl.exp(-acc)) * gate  # silu(x w^T) * (x v^T)
    tl.store(out + rows[:, None] * N + cols[None, :], acc.to(out.dtype.element_ty),
             mask=live[:, None] & (cols < N)[None, :])


def dot_precision(*dtypes: torch.dtype) -> str:
    """`tl.dot`'s input_precision for inputs of `dtypes`: "ieee" when any is float32, else "tf32".

    Triton's default for float32 inputs is TF32 on the tensor cores (10-bit mantissas, drift
    ~1e-3), where the torch reference (`kernels: torch`) computes in full float32 unless the
    user opted into TF32; "ieee" keeps the two equal. bfloat16 and float16 inputs go to the
    tensor cores as they are, and the precision setting does not apply to them, so they keep
    the default ("tf32") and its speed. Triton's interpreter ignores the setting (numpy
    matmul), so no CPU test can tell the two apart; tests/test_kernels.py checks the argument.
    """
    return "ieee" if torch.float32 in dtypes else "tf32"


def grouped_matmul(x: torch.Tensor, sizes: list[int], w: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    """Rows of x [R,D] in consecutive groups of `sizes`; group g times w[g] [N,D] transposed,
    or with `v` silu(x w[g]^T) * (x v[g]^T): one launch for every group."""
    ends = list(itertools.accumulate(sizes))
    tiles = [(g, start) for g, size in enumerate(sizes) for start in range(ends[g] - size, ends[g], ROWS)]
    out = x.new_empty((x.shape[0], w.shape[1]))
    if not tiles:
        return out
    # the tile table and the group ends in one host->device copy, pinned on CUDA so it does not stall the host
    table = torch.tensor([g for g, _ in tiles] + [row for _, row in tiles] + ends, dtype=torch.int32)
    table = (table.pin_memory() if x.is_cuda else table).to(x.device, non_blocking=True)
    tile_group, tile_row, group_ends = table.split([len(tiles), len(tiles), len(ends)])
    grid = (len(tiles), triton.cdiv(w.shape[1], COLS))
    _grouped_matmul[grid](x.contiguous(), w, w if v is None else v, out, tile_group, tile_row, group_ends,
                          w.shape[1], w.shape[2], v is not None, ROWS, COLS, DEPTH, dot_precision(x.dtype, w.dtype))
    return out


def grouped_swiglu(x: torch.Tensor, sizes: list[int], gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """Every group's SwiGLU expert down(silu(gate x) * up x): [R,H] -> [R,H]; weights stacked
    over the groups, gate and up [L,F,H], down [L,H,F]."""
    return grouped_matmul(grouped_matmul(x, sizes, gate, up), sizes, down)


@triton.jit
def _drop_slots(weights, keep, T, threshold, count, POLICY: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr):
    """keep[t,k] for slots in score order: 0 low (drop the last `count`), 1 high (the first
    `count`), 2 threshold (weight below it; never slot 0)."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, K)
    mask = (t < T)[:, None] & (k < K)[None, :]
    if POLICY == 0:
        result = k[None, :] < K - count
    elif POLICY == 1:
        result = k[None, :] >= count
    else:
        w = tl.load(weights + t[:, None] * K + k[None, :], mask=mask, other=0.0)
        result = (w >= threshold) | (k[None, :] == 0)
    result = result & (t < T)[:, None]
    tl.store(keep + t[:, None] * K + k[None, :], result.to(tl.int8), mask=mask)


POLICIES = {"low": 0, "high": 1, "threshold": 2}


def drop_slots(weights: torch.Tensor, policy: str, count: int, threshold: float) -> torch.Tensor:
    """[T,K] router weights -> [T,K] bool keep mask (K a power of two, as top-k routers have)."""
    num_tokens, top_k = weights.shape
    keep = torch.empty((num_tokens, top_k), dtype=torch.int8, device=weights.device)
    if keep.numel():
        _drop_slots[(triton.cdiv(num_tokens, ROWS),)](weights.contiguous(), keep, num_tokens, threshold, count,
                                                      POLICIES[policy], top_k, ROWS)
    return keep.bool()
