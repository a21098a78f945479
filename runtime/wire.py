"""Compressed exchanges: rows cast to a narrower dtype before an all-to-all, back after it.

[Note: wire dtypes]
On a link whose bandwidth bounds the step, the only lever left after overlap is fewer
bytes. A plan's `expert_parallel.wire_dtype` (and `combine_wire_dtype`) makes the dispatch
(and the combine) send each row in

    bfloat16, float16   the row cast, 2 bytes an element
    float8              e4m3 (largest 448), 1 byte an element, and beside it one float32
                        scale per `block` consecutive elements (0, or a row shorter than
                        `block`: one per row), each block divided by its absmax / 448
                        before the cast (as DeepEP's dispatch, which scales per 128)

packed into one uint8 row (the elements' bytes, then the scales'), so one all-to-all
carries both and gloo, which has no float8 type, moves it as bytes. The receiver expands
the rows to the sender's dtype when it waits for them (`RunState.wait`): the experts and
unpermute see the model's dtype. Every row is encoded, the rows a rank sends itself too,
so the numbers do not depend on the layout: with wire dtypes a plan computes, at any world
size, what one device computes when each expert's input and output are rounded the same
way (tests/test_wire.py holds it to that).

What the staleness caches hold: an exchange still in flight keeps its packed receive
buffer (half or a quarter of the model-dtype bytes); once waited it is expanded. The
records a synchronous step fills hold expanded rows, so a cache's peak is unchanged.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float8": torch.float8_e4m3fn}
FLOAT8_MAX = 448.0  # the largest finite e4m3fn value


@dataclasses.dataclass(frozen=True)
class Wire:
    """How an exchange's rows travel: `dtype` a key of DTYPES, `block` float8's elements per scale."""

    dtype: str
    block: int = 128

    def row_bytes(self, width: int) -> int:
        """Bytes one row of `width` elements takes on the wire."""
        if self.dtype != "float8":
            return 2 * width
        return width + 4 * self._groups(width)

    def _block(self, width: int) -> int:
        """Elements per scale in a row of `width`: `block`, or the whole row if shorter (or block 0)."""
        return min(self.block, width) if self.block else width

    def _groups(self, width: int) -> int:
        return -(-width // max(self._block(width), 1))

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        """rows [N, ...] -> packed uint8 [N, row_bytes(width)], width the elements per row."""
        flat = rows.reshape(len(rows), math.prod(rows.shape[1:]))
        if self.dtype != "float8":
            return flat.to(DTYPES[self.dtype]).contiguous().view(torch.uint8)
        count, width = flat.shape
        blocks = self._blocks(flat)
        scale = blocks.abs().amax(-1, keepdim=True).float().div_(FLOAT8_MAX).clamp_min_(torch.finfo(torch.float32).tiny)
        packed = torch.empty((count, self.row_bytes(width)), dtype=torch.uint8, device=rows.device)
        packed[:, :width].view(torch.float8_e4m3fn).copy_((blocks / scale).flatten(1)[:, :width])  # the cast
        packed[:, width:].copy_(scale.reshape(count, -1).view(torch.uint8))
        return packed

    def decode(self, packed: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """packed uint8 [N, row_bytes] -> rows [N, *shape] in `dtype`."""
        width = math.prod(shape)
        if self.dtype != "float8":
            rows = packed.view(DTYPES[self.dtype]).to(dtype)
        else:
            scale = packed[:, width:].contiguous().view(torch.float32).mul_(256.0)  # [N, groups]
            values = _float8_as_float16(packed[:, :width].contiguous())
            if scale.shape[1] == 1:  # one scale a row: float16 * float32 multiplies in float32, one pass
                rows = torch.mul(values, scale).to(dtype)
            else:
                rows = torch.mul(self._blocks(values), scale.unsqueeze(-1)).flatten(1)[:, :width].to(dtype)
        return rows.reshape(len(packed), *shape)

    def round_trip(self, rows: torch.Tensor) -> torch.Tensor:
        """What `rows` are after a trip over the wire."""
        return self.decode(self.encode(rows), rows.dtype, tuple(rows.shape[1:]))

    def _blocks(self, flat: torch.Tensor) -> torch.Tensor:
        """[N, width] -> [N, groups, block], zero-padded at the end of each row."""
        groups, block = self._groups(flat.shape[1]), self._block(flat.shape[1])
        if groups * block != flat.shape[1]:
            flat = F.pad(flat, (0, groups * block - flat.shape[1]))
        return flat.view(len(flat), groups, block)

    def kwargs(self) -> dict:
        """How `ops.exchange_start` is told to send over this wire."""
        return {"wire": self.dtype, **({"wire_block": self.block} if self.dtype == "float8" else {})}

    def describe(self) -> str:
        if self.dtype != "float8":
            return self.dtype
        return f"float8 e4m3, a float32 scale per {f'{self.block} elements' if self.block else 'row'}"


def _float8_as_float16(packed: torch.Tensor) -> torch.Tensor:
    """e4m3fn bytes -> float16 values / 256, by moving the bits (torch's own float8 cast runs
    one element at a time on the CPU, ~8x slower): s eeee mmm becomes the float16
    s 0eeee mmm0000000, whose exponent bias is 8 more (15 against 7); subnormals map to
    subnormals. The NaN byte (0x7f, never encoded from a finite row) reads as 480."""
    bits = packed.view(torch.int8).to(torch.int16)  # sign-extended: s becomes bits 7-15
    # times 128 is the shift by 7 (it cannot overflow: |byte| <= 128), and torch's CPU multiply is
    # vectorised where its shift is not (0.02 ms against 0.045 for 160k elements)
    return bits.mul_(128).bitwise_and_(~0x4000).view(torch.float16)  # clear s's copy at bit 14


def round_trip(rows: torch.Tensor, *, wire: str, wire_block: int = 128) -> torch.Tensor:
    """Graph op: `rows` as a trip over `wire` leaves them, where the exchange itself is not sent
    (an expert-parallel group of one rank)."""
    return Wire(wire, wire_block).round_trip(rows)


def wire_of(dtype: str | None, block: int = 128) -> Wire | None:
    """The Wire for a plan's wire dtype ("auto" or None: the model's dtype, no Wire)."""
    return None if dtype in (None, "auto") else Wire(dtype, block)
