"""Step kinds: what each diffusion step runs, computed once per plan.

A plan with staleness or conditional communication does not run the same program at every
step. Which one a step runs is decided here and nowhere else: the compiler builds one
program per `StepKind` in `StepPlan.kinds`, the passes read the kind they are building from
their context, the executor asks `StepPlan.kind_at(step, total)` before every step, and
`explain()` prints `StepPlan.describe(total)`. The tests read the same value.

    synchronous  every MoE layer exchanges and consumes its tokens within the step, and every
                 attention sees this step's K/V of every patch (exact); otherwise the layers the
                 plan makes stale consume earlier steps' exchanges or K/V
    drop         conditional communication leaves slots out of the dispatch this step
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from .plan import Plan


class StepKind(NamedTuple):
    synchronous: bool
    drop: bool = False

    @property
    def name(self) -> str:
        return ("sync" if self.synchronous else "async") + ("_drop" if self.drop else "")

    @classmethod
    def named(cls, name: str) -> "StepKind":
        base, _, drop = name.partition("_")
        if base not in ("sync", "async") or drop not in ("", "drop"):
            raise ValueError(f"step kind must be one of sync, async, sync_drop, async_drop; got {name!r}")
        return cls(base == "sync", drop == "drop")

    def __str__(self) -> str:
        return self.name



@dataclasses.dataclass(frozen=True)
class StepPlan:
    """Which `StepKind` every diffusion step of a sample runs, from a plan's staleness and
    conditional-communication settings. Steps count from 0."""

    stale: bool  # the plan has a stale mode (displaced, interweaved, patch parallel or PipeFusion)
    warmup_steps: int
    cooldown_steps: int
    sync_every: int | None
    refresh_every: int | None  # conditional communication sends every slot on these steps

    @classmethod
    def of(cls, plan: Plan) -> "StepPlan":
        s, pp, pf = plan.staleness, plan.patch_parallel, plan.pipefusion
        # every stale technique's warm-up (the plan makes them equal when several are on)
        warmups = [w for on, w in ((s.mode != "sync", s.warmup_steps), (pp.degree > 1, pp.warmup_steps),
                                   (pf.degree > 1, pf.warmup_steps)) if on]
        return cls(stale=bool(warmups), warmup_steps=max(warmups, default=s.warmup_steps),
                   cooldown_steps=s.cooldown_steps, sync_every=s.sync_every,
                   refresh_every=plan.conditional_comm.interval)

    @property
    def kinds(self) -> tuple[StepKind, ...]:
        """Every kind a step can be (sync, async, sync_drop, async_drop, as the plan needs them);
        one program is built for each. The first step of a sample never drops slots."""
        sync = (True, False) if self.stale else (True,)
        drop = (False, True) if self.refresh_every is not None else (False,)
        return tuple(StepKind(s, d) for d in drop for s in sync)

    @property
    def carries_state(self) -> bool:
        """Whether a step reads what earlier steps of its sample left (staleness caches, K/V buffers,
        cached slot outputs), so that a runtime must know where each sample begins."""
        return self.stale or self.refresh_every is not None

    @property
    def needs_total(self) -> bool:
        """Whether `kind_at` must know how many steps the sample has (for cool-down steps)."""
        return self.stale and self.cooldown_steps > 0

    def kind_at(self, step: int, total: int | None = None) -> StepKind:
        """The kind of diffusion step `step` of a `total`-step sample."""
        if step < 0:
            raise ValueError(f"diffusion steps count from 0, got {step}")
        if self.needs_total and total is None:
            raise ValueError(f"this plan has staleness.cooldown_steps = {self.cooldown_steps}, so the number of "
                             "steps must be known: call Runtime.reset(steps=N) before the first step of a sample")
        synchronous = (not self.stale or step < self.warmup_steps
                       or (total is not None and step >= total - self.cooldown_steps)
                       or (self.sync_every is not None and step % self.sync_every == 0))
        refresh = self.refresh_every is None or step % self.refresh_every == 0
        return StepKind(synchronous, drop=not refresh)

    def rules(self) -> str:
        """The plan's rules in words, for explain()."""
        rules = []
        if self.stale:
            strided = f", every step i with i % {self.sync_every} == 0" if self.sync_every else ""
            rules.append(f"{self.warmup_steps} warm-up and {self.cooldown_steps} cool-down step(s){strided} run "
                         "synchronously, the rest stale")
        else:
            rules.append("every step runs synchronously")
        if self.refresh_every is not None:
            rules.append(f"steps i with i % {self.refresh_every} == 0 send every slot, the others drop slots")
        return "; ".join(rules)

    def table(self, total: int) -> list[StepKind]:
        return [self.kind_at(step, total) for step in range(total)]

    def describe(self, total: int) -> list[str]:
        """One line per kind: the steps of a `total`-step sample that run it."""
        table = self.table(total)
        lines = []
        for kind in self.kinds:
            steps = [i for i, k in enumerate(table) if k == kind]
            if steps:
                lines.append(f"  {kind.name:<11}{len(steps):>3} step(s): {_compact(steps)}")
        return lines


def _compact(steps: list[int]) -> str:
    """[0] -> "0"; [3, 4, 5, 6] -> "3-6"; [1, 3, 5, 7, 9] -> "1, 3, ..., 9"; else a list."""
    if len(steps) <= 3:
        return ", ".join(map(str, steps))
    gaps = {b - a for a, b in zip(steps, steps[1:])}
    if gaps == {1}:
        return f"{steps[0]}-{steps[-1]}"
    if len(gaps) == 1:
        return f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"
    return ", ".join(map(str, steps[:12])) + (f", ... ({len(steps)} in all)" if len(steps) > 12 else "")
