"""Triton kernels for the MoE hot path, with the torch code in moedit/runtime/expert_ops.py as
their reference (plan `kernels: auto|torch|triton`).

    gather_rows       permute: each (token, slot) copy's row, in (rank, local expert) order
    weighted_sum      unpermute: each token's K returned rows, weighted by the router, summed
    grouped_swiglu    every local expert's SwiGLU on its rows, one launch per projection
    drop_slots        conditional communication's keep mask (low, high, threshold)

The sort that orders the rows stays in torch (`argsort`, `bincount`): a stable sort is not
a kernel worth writing by hand, and the counts it yields are what the exchanges need.

[Note: the interpreter]
Triton compiles for GPUs. On a CPU, `TRITON_INTERPRET=1` runs the same kernels through its
interpreter (slowly, exactly), which is how the tests check them; Triton reads that variable
when a kernel is defined, so `load()` sets it before it first imports them on a machine
without CUDA (and the kernels keep to Triton's builtins, see moe.py, so an earlier import
of Triton by torch does not matter). A process that has imported them for CUDA cannot also
run them on the CPU.
"""

from __future__ import annotations

import importlib.util
import os

def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(requested: str, cuda: bool, backend: str = "auto") -> tuple[str, str | None]:
    """The plan's `kernels` for this machine: "torch" or "triton", and, when `auto` chose torch
    although CUDA is available, why (None otherwise).

    The kernels run on the tensors the ranks exchange, which are CUDA tensors only under NCCL
    (`backend`: the plan's runtime.backend, resolved as the runtime will, see
    `moedit.runtime.comm.pick_backend`). So `auto` is "triton" on CUDA with Triton installed
    and an NCCL backend; `triton` needs Triton, and is refused under gloo unless the run is a
    CPU-only one under Triton's interpreter (backend auto, no CUDA: the tests).
    """
    from moedit.runtime.comm import expected_backend

    resolved = expected_backend(backend)
    if requested == "auto":
        if not cuda:
            return "torch", None
        if resolved != "nccl":
            return "torch", (f"runtime.backend {backend!r} runs on {resolved}, whose ranks exchange CPU tensors, "
                             "which the Triton kernels (compiled for CUDA) cannot run on")
        if not triton_installed():
            return "torch", "Triton is not installed (pip install -e \".[kernels]\", Linux x86_64)"
        return "triton", None
    if requested == "triton" and not triton_installed():
        raise ValueError("kernels: triton needs Triton; install it with `pip install -e \".[kernels]\"` (Linux "
                         "x86_64), or use kernels: torch")
    if requested == "triton" and resolved == "gloo" and (cuda or backend == "gloo"):
        raise ValueError(f"kernels: triton runs on CUDA tensors, but runtime.backend {backend!r} runs on gloo, whose "
                         "ranks exchange CPU tensors; use runtime.backend: nccl, or kernels: torch")
    return requested, None


def load():
    """The kernel module (moedit/runtime/kernels/moe.py), imported on first use; without a GPU,
    under Triton's interpreter (see [Note: the interpreter])."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import moe

    return moe
