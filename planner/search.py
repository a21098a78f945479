"""The planner: which plan to run, from the simulator's predictions on a hardware profile.

    moedit plan --model XL/2-8E2A --hardware l40-pcie-8 --ranks 8 [--max-staleness 1] [--json]

It compiles each candidate plan for the model (on the meta device: shapes only), replays
rank 0's programs (the ranks are symmetric under uniform routing, so the others mirror
it), simulates a sample on the profile and ranks the candidates by predicted step time.
Candidates span the axes moedit has: synchronous EP with and without chunked overlap,
displaced and interweaved staleness, the share and position of the layers kept
synchronous, conditional communication, the schedule policy, and the xDiT layouts (CFG,
Ulysses, Ring and their products, with experts over every rank), which every rank's
programs are replayed for, and replicas: the experts over fewer ranks (down to every expert
on every rank) with data-parallel replicas of that group. A candidate the model or the batch
cannot take (a Ulysses degree that does not divide the heads, fewer images than data shards)
is left out, and so is one whose predicted peak memory is above what a rank has.
Synchronous EP is among the results whenever the batch can be split over the ranks. Staleness is how many steps old the oldest expert output a step uses
can be: 0 synchronous, 1 interweaved, 2 displaced, and conditional communication reuses a
dropped slot's output from up to `interval - 1` steps back.

Wire dtypes (`--wire-dtypes auto bfloat16 float8`) are one more axis: every candidate is
tried with each (see [Note: wire dtypes] in moedit/runtime/wire.py). What a lossy candidate
costs in quality is measured, not predicted, where the model has trained weights
(`QualityProbe`): a short sample under the candidate's lossy settings, on one process, its
relative L2 distance to the exact plan's images. The layout axes (ranks, CFG, Ulysses,
Ring, chunks, the schedule) are exact and left out of that run, and the lossy settings give
the same images at any world size, so one process measures what the ranks would compute.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import warnings
from typing import NamedTuple

from tqdm import tqdm

from moedit.compiled import compile as compile_model
from moedit.plan import Plan, PlanError, Staleness

from .costs import Hardware
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
    quality_rel_l2: float | None = None  # measured by a QualityProbe (0 for exact plans); None: not measured

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def staleness_of(plan: dict) -> int:
    mode = Staleness.STEPS[plan.get("staleness", {}).get("mode", "sync")]
    interval = plan.get("conditional_comm", {}).get("interval")
    return max(mode, interval - 1 if interval else 0, int(_patches(plan)))  # other patches' K/V: a step old


def candidate_plans(ranks: int, layers: int, max_staleness: int | None = None,
                    wire_dtypes: tuple[str, ...] = ("auto",), per_node: int | None = None) -> list[dict]:
    """Plan dicts over the axes moedit has for a model of `layers` MoE layers, within
    `max_staleness`, each with every one of `wire_dtypes`; synchronous EP first. With nodes of
    `per_node` ranks, also the layouts that keep the chatty axes inside a node (`_node_layouts`)."""
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
        plans.append({**layout, "expert_parallel": ep, **DICE})
    for layout in _replica_layouts(ranks) + _node_layouts(ranks, per_node):
        plans += _variants(layout)
    plans = [p for i, p in enumerate(plans) if p not in plans[:i]]
    plans = [p for p in plans if max_staleness is None or staleness_of(p) <= max_staleness or p == plans[0]]
    plans = [_with_wire(p, wire) for p in plans for wire in wire_dtypes  # nothing travels when EP is 1 rank
             if wire == "auto" or p["expert_parallel"]["degree"] > 1]
    return [p for p in plans if _valid(p)]


DICE = {"staleness": {"mode": "interweaved", "warmup_steps": 1}, "conditional_comm": {"interval": 2, "drop": "low"}}


def _variants(layout: dict) -> list[dict]:
    """`layout` in program order and, where its experts exchange rows over more than one rank and
    no PipeFusion stage runs, as experts across every rank are also tried: under the overlap
    schedule, in 2 chunks under it, and DICE-like."""
    inside = layout["expert_parallel"]
    if inside["degree"] == 1 or "pipefusion" in layout:
        return [layout]
    return [layout, {**layout, "schedule": {"policy": "overlap"}},
            {**layout, "expert_parallel": {**inside, "chunks": 2}, "schedule": {"policy": "overlap"}},
            {**layout, **DICE}]


def _with_wire(plan: dict, wire: str) -> dict:
    if wire == "auto":
        return plan
    return {**plan, "expert_parallel": {**plan["expert_parallel"], "wire_dtype": wire}}


def _dense_layouts(ranks: int) -> list[dict]:
    """CFG 2, Ulysses and Ring over every rank, CFG 2 x Ulysses, Ulysses x Ring 2 (USP)."""
    layouts = [{"cfg_parallel": True}, {"sequence_parallel": {"ulysses": ranks}},
               {"sequence_parallel": {"ring": ranks}}]
    if ranks % 4 == 0:
        layouts += [{"cfg_parallel": True, "sequence_parallel": {"ulysses": ranks // 2}},
                    {"sequence_parallel": {"ulysses": ranks // 2, "ring": 2}}]
    return layouts if ranks > 1 else []


def _replica_layouts(ranks: int) -> list[dict]:
    """The experts over fewer ranks than all, in data-parallel replicas of the plan: every divisor
    of `ranks` as the expert-parallel degree, down to 1 (every rank holds every expert and nothing
    is exchanged). More weights a rank, fewer exchanges: the planner checks the memory
    (`Hardware.memory_per_rank`). With the ranks over nodes, a node's ranks are one replica."""
    return [{"expert_parallel": {"degree": degree}, "data_parallel": ranks // degree}
            for degree in range(1, ranks) if ranks % degree == 0]


def _node_layouts(ranks: int, per_node: int | None) -> list[dict]:
    """With `ranks` over nodes of `per_node`: experts with Ulysses, or with CFG, inside a node and
    data parallel replicas across nodes, which then exchange nothing per step; PipeFusion's stages
    across nodes, passing only patch activations. (Experts alone inside a node are one of the
    `_replica_layouts`.)"""
    if not per_node or per_node >= ranks or ranks % per_node:
        return []
    nodes, inside = ranks // per_node, {"expert_parallel": {"degree": per_node}}
    layouts = [{**inside, "data_parallel": nodes, "sequence_parallel": {"ulysses": per_node}}] if per_node > 1 else []
    if per_node % 2 == 0:
        layouts.append({**inside, "data_parallel": nodes, "cfg_parallel": True})
    layouts.append({**inside, "pipefusion": {"degree": nodes}})
    return layouts


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
           max_staleness: int | None = None, wire_dtypes: tuple[str, ...] = ("auto",),
           quality: QualityProbe | None = None, max_rel_l2: float | None = None, memory_bytes: float | None = None,
           progress: bool = False) -> Candidates:
    """Every candidate plan's prediction, fastest first; those the model or the batch cannot
    take are left out, each logged and listed in the result's `dropped` with the reason, and so
    are those whose predicted peak memory is above what a rank has (`memory_bytes`, else the
    profile's). `comm_share_sync` is synchronous EP's exposed share, None when the batch cannot be
    split over the ranks. With `quality`, each candidate's measured quality cost comes with it, and
    those that cost more than `max_rel_l2` are left out. `progress`: a bar with an estimate on stderr."""
    results, dropped = [], []
    sync_share = None
    memory = memory_bytes or hardware.memory_per_rank(ranks)
    plans = candidate_plans(ranks, len(_layers(model)), max_staleness, wire_dtypes, hardware.per_node(ranks))
    bar = tqdm(plans, desc="candidates", unit="plan", disable=not progress, leave=False)
    for index, plan in enumerate(bar):
        try:
            prediction = predict(model, plan, hardware, batch, steps)
        except (PlanError, SimulationError) as err:
            dropped.append(Dropped(plan, str(err)))
            log.info("planner: left out candidate %s (%s): %s", describe(plan), plan, err)
            continue
        if index == 0:  # the first candidate is synchronous EP
            sync_share = prediction.exposed_comm_s / prediction.mean_step_s
        if memory is not None and prediction.peak_bytes > memory:
            dropped.append(Dropped(plan, f"needs {prediction.peak_bytes / 1e9:.3g} GB a rank, above the "
                                         f"{memory / 1e9:.3g} GB a rank has"))
            continue
        if quality is not None:
            bar.set_postfix_str("measuring quality" if quality.will_sample(plan) else "")
        rel_l2 = None if quality is None else quality(plan)
        if rel_l2 is not None and max_rel_l2 is not None and rel_l2 > max_rel_l2:
            dropped.append(Dropped(plan, f"its images are {rel_l2:.4f} rel. L2 from the exact plan's, above "
                                         f"--max-rel-l2 {max_rel_l2:g}"))
            continue
        results.append(Candidate(plan, prediction.mean_step_s, prediction.exposed_comm_s, sync_share,
                                 staleness_of(plan), prediction.peak_bytes, rel_l2))
    return Candidates(sorted(results, key=lambda c: c.predicted_step_s), dropped)


def predict(model, plan: dict, hardware: Hardware, batch: int, steps: int):
    """The simulator's `Prediction` for `plan` on `hardware`: the model compiled (on the meta device it
    costs nothing), rank 0's programs replayed for a global batch of `batch` sequences (the others
    mirror them), a sample of `steps` simulated."""
    return simulate(replay(compile_model(model, Plan(**plan)), batch, ranks=[0]), hardware, steps=steps)


class QualityProbe:
    """What a plan's lossy settings cost: the relative L2 distance between a short sample under
    them and the exact plan's sample (same labels, noise and sampler), run in this process on
    one rank with `model`'s trained weights. Plans that share their lossy settings share one run."""

    def __init__(self, model, *, images: int = 8, steps: int = 10, cfg_scale: float = 1.5, seed: int = 0,
                 sampler: str = "rflow"):
        self.model = model
        self.sample_args = {"class_labels": [i % model.config.num_classes for i in range(images)], "steps": steps,
                            "cfg_scale": cfg_scale, "seed": seed, "sampler": sampler, "progress": False}
        self.measured: dict[str, float] = {}
        self.exact = self._sample({})

    def will_sample(self, plan: dict) -> bool:
        """Whether measuring `plan` runs a sample (its lossy settings are new), or is known."""
        lossy = lossy_part(plan)
        return bool(lossy) and not _patches(plan) and json.dumps(lossy, sort_keys=True) not in self.measured

    def __call__(self, plan: dict) -> float | None:
        if _patches(plan):
            return None  # stale patches need their ranks: one process does not compute what they do
        lossy = lossy_part(plan)
        if not lossy:
            return 0.0
        key = json.dumps(lossy, sort_keys=True)
        if key not in self.measured:
            images = self._sample(lossy)
            self.measured[key] = float((images - self.exact).norm() / self.exact.norm())
        return self.measured[key]

    def _sample(self, lossy: dict):
        with warnings.catch_warnings():  # stale modes on one rank warn that they gain nothing there
            warnings.simplefilter("ignore")
            compiled = compile_model(self.model, Plan(**{**lossy, "expert_parallel": {
                **lossy.get("expert_parallel", {}), "degree": 1}}))
        with compiled.to_runtime() as runtime:
            return runtime.sample(**self.sample_args)


_EXACT_EP = ("degree", "chunks")  # expert_parallel fields that do not change the outputs
_LOSSY = ("staleness", "selective_sync", "conditional_comm", "shortcut")  # sections that may


def _patches(plan: dict) -> bool:
    """Whether `plan` splits images into patches that read each other's K/V a step old."""
    return max(plan.get(section, {}).get("degree", 1) for section in ("patch_parallel", "pipefusion")) > 1


def lossy_part(plan: dict) -> dict:
    """The settings of `plan` that may change its outputs: staleness and what comes with it,
    conditional communication, the shortcut rewrite and the wire dtypes ({} for an exact plan)."""
    lossy = {key: plan[key] for key in _LOSSY if key in plan}
    if lossy.get("staleness", {}).get("mode", "sync") == "sync":  # which layers stay synchronous: moot
        lossy.pop("staleness", None)
        lossy.pop("selective_sync", None)
    if not lossy.get("shortcut", {}).get("rewrite"):
        lossy.pop("shortcut", None)  # the shortcut schedule alone is exact
    wire = {k: v for k, v in plan.get("expert_parallel", {}).items() if k not in _EXACT_EP and v not in (None, "auto")}
    if wire:
        lossy["expert_parallel"] = wire
    return lossy


def _layers(model) -> list:
    from moedit.tracer import moe_nodes, trace

    return moe_nodes(trace(model))


def describe(plan: dict) -> str:
    """A plan dict in one line, e.g. 'interweaved, deep half sync, drop low every 2nd step'."""
    sp = plan.get("sequence_parallel", {})
    stages, replicas = plan.get("pipefusion", {}).get("degree", 1), plan.get("data_parallel", 1)
    axes = [f"{axis} {n}" for axis, n in (("pipefusion", stages), ("data", replicas),
                                          ("cfg", 2 if plan.get("cfg_parallel") else 1),
                                          ("ulysses", sp.get("ulysses", 1)), ("ring", sp.get("ring", 1))) if n > 1]
    if stages > 1 or replicas > 1:  # experts over part of the ranks: say how many
        degree = plan["expert_parallel"]["degree"]
        axes.append("every expert on every rank" if degree == 1 else f"experts on {degree}")
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
    wire = plan["expert_parallel"].get("wire_dtype", "auto")
    if wire != "auto":
        parts.append(f"{wire} wire")
    return ", ".join(parts)
