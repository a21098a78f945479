"""`RankProgram`: the one thing the compiler hands the runtime.

[Note: compiler and runtime]
The compiler (capture, tracer, passes, verifier) turns a model and a plan into one
`RankProgram` per rank; the runtime (moedit/runtime) runs it: it never imports a pass or the
capture, and never builds a program inside a diffusion step. A `RankProgram` holds the
rank's program for every step kind, the step plan that says which kind each step runs, the
collective order of every program (compared across the ranks before the first exchange),
the communicators it needs and the kernel choice.

One door leads back into the compiler, on purpose: a model captured for one input signature
(moedit/capture.py) meets a call of another signature through `specialise`, a function the
compiler puts here, which captures the model again and runs every pass for that signature.
The runtime calls it before the step, keyed by the whole call's signature, which every rank
sees alike, so every rank captures at the same call (`Runtime.prepare` does it ahead of
time); the new programs must issue the first capture's exchanges, which the ranks compared
at start, so they still agree without another collective. A traced (not captured) model's
`RankProgram` has no `specialise`, and holds all its runtime runs.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from .plan import Plan
from .signature import Signature
from .steps import StepKind, StepPlan
from .verify import collective_order


@dataclasses.dataclass(frozen=True)
class RankProgram:
    """One rank's compiled programs and what running them needs."""

    rank: int
    plan: Plan  # resolved: "auto" fields chosen, the mesh laid out
    steps: StepPlan  # which step kind every diffusion step runs
    programs: dict[StepKind, fx.GraphModule]  # one per step kind; they share the model's weights
    kernels: str  # "torch" or "triton": what the programs' MoE ops were built to call
    model: nn.Module  # the user's model: its forward's signature binds a call, its `config` serves `sample`
    signature: Signature | None = None  # a captured program's input signature (None: traced symbolically)
    batch_dims: dict[str, int | None] = dataclasses.field(default_factory=dict)  # see `moedit.compile`
    out_spec: pytree.TreeSpec | None = None  # a captured program's return structure (it returns tensors flat)
    specialise: Callable[[Signature, list[torch.Tensor]], "RankProgram"] | None = None  # see the Note

    @functools.cached_property
    def orders(self) -> dict[str, list]:
        """Every program's collective order (moedit.verify.collective_order), by step kind name."""
        return {kind.name: collective_order(gm) for kind, gm in self.programs.items()}

    @property
    def communicators(self) -> set[tuple[str, str]]:
        """Every (mesh axis, channel) this rank's programs exchange on."""
        return {comm for order in self.orders.values() for comm in order}

    def outputs(self, flat) -> object:
        """What the model's forward returns, from a captured program's flat output tensors."""
        return pytree.tree_unflatten(list(flat), self.out_spec)
