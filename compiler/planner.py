"""The planner: which plan to run, from the simulator's predictions on a hardware profile.

    moedit plan --model XL/2-8E2A --hardware l40-pcie-8 --ranks 8 [--max-staleness 1] [--json]

It compiles each candidate plan for the model (on the meta device: shapes only), replays
rank 0's programs (the ranks are symmetric under uniform routing, so the others mirror
it), simulates a sample on the profile and ranks the candidates by predicted step time.
Candidates span the axes moedit has: synchronous EP with and without chunked overlap,
displaced and interweaved staleness, the share and position of the layers kept
synchronous, conditional communication, the schedule policy, and the xDiT layouts (CFG,
Ulysses, Ring and their products, with experts over every rank), which every rank's
programs are replayed for. A candidate the model or the batch cannot take (a Ulysses
degree that does not divide the heads, fewer images than data shards) is left out.
Synchronous EP is among the results whenever the batch can be split over the ranks. Staleness is how many steps old the oldest expert output a step uses
can be: 0 synchronous, 1 interweaved, 2 displaced, and conditional communication reuses a
dropped slot's output from up to `interval - 1` steps back.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from typing import NamedTuple

from .compiled import compile as compile_model
from .costs import Hardware
from .plan import Plan, PlanError, Staleness
from .simulate import SimulationError, replay, simulate

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Candidate:
    plan: dict  # what moedit.Plan(**plan) accepts
    predicted_step_s: float
    exposed_comm_s: float
    comm_share_sync: float | None  # the all-to-all share of synchronous EP's step on this hardware
    staleness: int
    peak_bytes: int

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def staleness_of(plan: dict) -> int:
    mode = Staleness.STEPS[plan.get("staleness", {}).get("mode", "sync")]
    interval = plan.get("conditional_comm", {}).get("interval")
    return max(mode, interval - 1 if interval else 0)


def candidate_plans(ranks: int, layers: int, max_staleness: int | None = None) -> list[dict]:
    """Plan dicts over the axes moedit has for a model of `layers` MoE layers, within
    `max_staleness`; synchronous EP first."""
    selective = [None, {"strategy": "deep"}, {"strategy": "staggered"}]
    if layers >= 4:  # the deepest quarter, and all but the shallowest quarter
        selective += [{"strategy": list(range(layers - layers // 4, layers))},
                      {"strategy": list(range(layers // 4, layers))}]
    ep = {"degree": ranks}
    plans = [{"expert_parallel": ep}]
    plans += [{"expert_parallel": {**ep, "chunks": n}, "schedule": {"policy": policy}}
              for n, policy in itertools.product((2, 4), ("program", "overlap"))]
    plans.append({"expert_parallel": ep, "schedule": {"policy": "overlap"}})
    plans += [{"expert_parallel": ep, "conditional_comm": {"interval": 2, "drop": "low"}}]
    # ScMoE models only (refused on others): the shortcut schedule, alone and beside DICE
    plans += [{"expert_parallel": ep, "shortcut": {"enabled": True}},
              {"expert_parallel": ep, "shortcut": {"enabled": True}, "selective_sync": {"strategy": "deep"},
               "staleness": {"mode": "interweaved", "warmup_steps": 1}}]
    for mode in ("interweaved", "displaced"):
        for sync_layers, interval in itertools.product(selective, (None, 2)):
            plan = {"expert_parallel": ep, "staleness": {"mode": mode, "warmup_steps": 1}}
            if sync_layers:
                plan["selective_sync"] = sync_layers
            if interval:
                plan["conditional_comm"] = {"interval": interval, "drop": "low"}
            plans.append(plan)
    for layout in _dense_layouts(ranks):
        plans.append({**layout, "expert_parallel": ep})
        plans.append({**layout, "expert_parallel": ep, "staleness": {"mode": "interweaved", "warmup_steps": 1},
                      "conditional_comm": {"interval": 2, "drop": "low"}})
    plans = [p for p in plans if max_staleness is None or staleness_of(p) <= max_staleness or p == plans[0]]
    return [p for p in plans if _valid(p)]


def _dense_layouts(ranks: int) -> list[dict]:
    """CFG 2, Ulysses and Ring over every rank, CFG 2 x Ulysses, Ulysses x Ring 2 (USP)."""
    layouts = [{"cfg_parallel": True}, {"sequence_parallel": {"ulysses": ranks}},
               {"sequence_parallel": {"ring": ranks}}]
    if ranks % 4 == 0:
        layouts += [{"cfg_parallel": True, "sequence_parallel": {"ulysses": ranks // 2}},
                    {"sequence_parallel": {"ulysses": ranks // 2, "ring": 2}}]
    return layouts if ranks > 1 else []


def _valid(plan: dict) -> bool:
    """Whether a generated layout is a valid plan (the generator may combine axes a plan refuses)."""
    try:
        Plan(**plan)
    except ValueError as err:
        log.info("planner: layout %s is not a valid plan, not searched: %s", plan, err)
        return False
    return True


class Dropped(NamedTuple):
    """A candidate the model or the batch cannot take, and the error that said so."""

    plan: dict
    reason: str


class Candidates(list):
    """`search`'s result: the candidates, fastest first, and in `dropped` those left out, with why."""

    def __init__(self, candidates: list[Candidate], dropped: list[Dropped]):
        super().__init__(candidates)
        self.dropped = dropped


def search(model, hardware: Hardware, ranks: int, *, batch: int, steps: int = 25,
           max_staleness: int | None = None, progress=None) -> Candidates:
    """Every candidate plan's prediction, fastest first; those the model or the batch cannot
    take are left out, each logged and listed in the result's `dropped` with the reason.
    `comm_share_sync` is synchronous EP's exposed share, None when the batch cannot be split
    over the ranks."""
    results, dropped = [], []
    sync_share = None
    for index, plan in enumerate(candidate_plans(ranks, len(_layers(model)), max_staleness)):
        try:
            compiled = compile_model(model, Plan(**plan))
            prediction = simulate(replay(compiled, batch, ranks=[0]), hardware, steps=steps)
        except (PlanError, SimulationError) as err:
            dropped.append(Dropped(plan, str(err)))
            log.info("planner: left out candidate %s (%s): %s", describe(plan), plan, err)
            continue
        if index == 0:  # the first candidate is synchronous EP
            sync_share = prediction.exposed_comm_s / prediction.mean_step_s
        results.append(Candidate(plan, prediction.mean_step_s, prediction.exposed_comm_s, sync_share,
                                 staleness_of(plan), prediction.peak_bytes))
        if progress:
            progress(results[-1])
    return Candidates(sorted(results, key=lambda c: c.predicted_step_s), dropped)


def _layers(model) -> list:
    from .tracer import moe_nodes, trace

    return moe_nodes(trace(model))


def describe(plan: dict) -> str:
    """A plan dict in one line, e.g. 'interweaved, deep half sync, drop low every 2nd step'."""
    sp = plan.get("sequence_parallel", {})
    axes = [f"{axis} {n}" for axis, n in (("cfg", 2 if plan.get("cfg_parallel") else 1),
                                          ("ulysses", sp.get("ulysses", 1)), ("ring", sp.get("ring", 1))) if n > 1]
    parts = ([" x ".join(axes)] if axes else []) + [plan.get("staleness", {}).get("mode", "sync")]
    strategy = plan.get("selective_sync", {}).get("strategy")
    if isinstance(strategy, list):
        parts.append(f"layer {strategy[0]} sync" if len(strategy) == 1 else f"layers {strategy[0]}-{strategy[-1]} sync")
    elif strategy:
        parts.append(f"{strategy} half sync")
    if plan.get("conditional_comm"):
        parts.append(f"drop {plan['conditional_comm']['drop']} every {plan['conditional_comm']['interval']}nd step")
    chunks = plan["expert_parallel"].get("chunks", 1)
    if chunks != 1:
        parts.append(f"chunks {chunks}")
    if plan.get("schedule", {}).get("policy") == "overlap":
        parts.append("overlap schedule")
    if plan.get("shortcut", {}).get("enabled"):
        parts.append("shortcut schedule")
    return ", ".join(parts)
