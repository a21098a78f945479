"""Every pair of plan sections (and each section alone) either equals what it claims or is refused.

The matrix below is the specification; the tests read it. Row and column are the two
sections of a pair, the diagonal the section alone. A cell says which outcome the pair must
have and so which check it gets:

  E  exact: every rank's `runner.sample` equals the single-device model sampled eagerly
     (`rectified_flow_sample`), max |diff| <= 1e-5.
  S  stale, with a reference: the pair's stale core -- the pair without the sections that
     claim to change nothing (ep, chunks, shortcut on ScMoE, offload, ulysses, ring, cfg,
     overlap, triton), with the same companions -- computes the same thing, <= 1e-5. A core
     of DICE modes and/or the shortcut rewrite runs in this process on one rank (experts
     unsharded: per token a stale output does not depend on how tokens are split over
     ranks); a core with patch parallelism or PipeFusion runs at its own world size. And
     the pair differs from the eager model by more than 1e-3 (a stale plan is not silently
     exact). The per-layer staleness of each core is probed elsewhere: DICE modes in
     tests/test_staleness.py, patch/PipeFusion K/V in tests/test_patches.py.
  P  probed (the pair is its own stale core, and holds patch parallelism or PipeFusion, so
     no smaller plan is a reference): the same plan with every step a warm-up step equals
     its core without patches/PipeFusion on one rank (the eager model when nothing else is
     left), <= 1e-5, and the plan itself differs from the eager model by more than 1e-3.
  W  rounded to the wire: as S (the wire is part of the core, so the reference is the core on one
     rank, whose experts' inputs and outputs take the same trip through the wire), and the pair
     differs from the eager model by more than 1e-6 (the rows were rounded, not skipped).
     Every pair with the wire is held to 1e-4, not 1e-5: where two layouts' float sums differ in
     the last bit (a dropped slot's cached output merged in another order, say), a bfloat16
     rounding can flip by one unit; measured, cc+wire 1.9e-5 and rw+wire 4.9e-5, while a wire
     skipped on any path moves these images by ~1e-2.
  R  refused: `moedit.Plan(...)` or `moedit.compile(...)` raises PlanError with the fragment
     in REFUSED.
  -  not a pair: both sections set the same field (staleness.mode).
  .  not run: Triton's interpreter costs ~6 s a plan at 2 ranks, so the triton row runs it
     alone and with chunks, offload and conditional communication (every kernel: permute,
     unpermute, grouped experts, slot dropping); tests/test_kernels.py checks each kernel.

A pair whose result was silently wrong when measured keeps its claimed letter and is listed
in SILENT_WRONG with the measured max |diff|: its test is `xfail(strict=True)`. (Before
b93aaac keyed offload's fetches by the layer whose experts a slot runs, int+off and cc+off
failed their S check here by 0.54 and 0.50.)

Sections and the companions a plan made of them gets (`_plan`):

  ep       expert_parallel.degree 2
  chk      expert_parallel.chunks 2                     + experts sharded (see below)
  dis      staleness.mode displaced                     + experts sharded
  int      staleness.mode interweaved                   + experts sharded
  sel      selective_sync.strategy deep                 + experts sharded, + interweaved unless
                                                           the pair sets a staleness mode
  cc       conditional_comm {interval 2, drop low}      + as sel
  sc       shortcut.enabled, on the tiny ScMoE model    + experts sharded (any pair with sc
                                                           runs on the ScMoE model)
  rw       shortcut {enabled, rewrite} (Pos-2), standard model (lossy: another model)
                                                        + experts sharded
  off      offload, resident_experts = the smallest budget the pass accepts for that
           pair's program, found at run time (every fetch evicts)          + experts sharded
  uly      sequence_parallel.ulysses 2
  rng      sequence_parallel.ring 2
  cfg      cfg_parallel
  pat      patch_parallel.degree 2
  pf       pipefusion.degree 2 (2 patches)
  ovl      schedule.policy overlap (against the default, program order)
  tri      kernels triton (Triton's interpreter on the CPU)  + experts sharded
  dp       data_parallel 2 (replicas of the rest of the plan; alone: experts unsharded on each)
  wire     expert_parallel.wire_dtype bfloat16           + experts sharded

"Experts sharded" (and the ep section) sets expert_parallel.degree to the larger of 2 and
the dense axes' product (cfg x patch x ulysses x ring), so a product of two degree-2 axes
runs at 4 ranks with experts over all 4; without it the dense sections keep the experts
unsharded (degree 1). PipeFusion multiplies the world by its 2 stages. Every plan has
runtime.timeout_s 60. Model: depth 2 (tiny_model / tiny_scmoe), 2 labels, 4 rectified-flow
steps with guidance 1.5 (1 warm-up step), seed 0.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import warnings

import pytest
import torch

import moedit
from _dist import run_ranks
from _models import tiny_model, tiny_scmoe
from moedit.plan import PlanError
from moedit.runtime.sampling import initial_noise, rectified_flow_sample

MATRIX = """
     ep  chk dis int sel cc  sc  rw  off uly rng cfg pat pf  ovl tri dp  wire
ep   E   E   S   S   S   S   E   S   E   E   E   E   S   S   E   .   E   W
chk  E   E   S   S   S   S   R   R   E   E   E   E   S   S   E   E   E   W
dis  S   S   S   -   S   S   S   S   S   S   S   S   P   R   S   .   S   S
int  S   S   -   S   S   S   S   S   S   S   S   S   P   R   S   .   S   S
sel  S   S   S   S   S   S   S   S   S   S   S   S   P   R   S   .   S   S
cc   S   S   S   S   S   S   R   S   S   S   S   S   P   R   S   S   S   S
sc   E   R   S   S   S   R   E   R   E   E   E   E   R   R   R   .   E   W
rw   S   R   S   S   S   S   R   S   S   S   S   S   R   R   R   .   S   S
off  E   E   S   S   S   S   E   S   E   E   E   E   R   R   E   E   E   W
uly  E   E   S   S   S   S   E   S   E   E   E   E   R   R   E   .   E   W
rng  E   E   S   S   S   S   E   S   E   E   E   E   R   R   E   .   E   W
cfg  E   E   S   S   S   S   E   S   E   E   E   E   S   S   E   .   E   W
pat  S   S   P   P   P   P   R   R   R   R   R   S   P   R   S   .   S   P
pf   S   S   R   R   R   R   R   R   R   R   R   S   R   P   R   .   S   P
ovl  E   E   S   S   S   S   R   R   E   E   E   E   S   R   E   .   E   W
tri  .   E   .   .   .   S   .   .   E   .   .   .   .   .   .   E   .   .
dp   E   E   S   S   S   S   E   S   E   E   E   E   S   S   E   .   E   W
wire W   W   S   S   S   S   W   S   W   W   W   W   P   P   W   .   W   W
"""

SHORT = {"ep": "expert_parallel", "chk": "chunks", "dis": "displaced", "int": "interweaved",
         "sel": "selective_sync", "cc": "conditional_comm", "sc": "shortcut", "rw": "rewrite", "off": "offload",
         "uly": "ulysses", "rng": "ring", "cfg": "cfg_parallel", "pat": "patch_parallel", "pf": "pipefusion",
         "ovl": "overlap", "tri": "triton",
         "dp": "data_parallel", "wire": "wire_dtype"}

# Refused pairs: a fragment of the PlanError's message.
REFUSED = {
    ("chk", "sc"): "shortcut: expert_parallel.chunks pipelines",
    ("chk", "rw"): "shortcut: expert_parallel.chunks pipelines",
    ("cc", "sc"): "must be below the top-k",
    ("sc", "rw"): "already read the previous block",
    ("sc", "ovl"): "would reorder the program again",
    ("rw", "ovl"): "would reorder the program again",
    ("sc", "pat"): "patch_parallel: does not combine with shortcut or offload",
    ("sc", "pf"): "pipefusion: does not combine with shortcut or offload",
    ("rw", "pat"): "patch_parallel: does not combine with shortcut or offload",
    ("rw", "pf"): "pipefusion: does not combine with shortcut or offload",
    ("off", "pat"): "patch_parallel: does not combine with shortcut or offload",
    ("off", "pf"): "pipefusion: does not combine with shortcut or offload",
    ("uly", "pat"): "sequence_parallel and patch_parallel: moedit splits an image's tokens one way at a time",
    ("rng", "pat"): "sequence_parallel and patch_parallel: moedit splits an image's tokens one way at a time",
    ("uly", "pf"): "sequence_parallel and pipefusion: moedit splits an image's tokens one way at a time",
    ("rng", "pf"): "sequence_parallel and pipefusion: moedit splits an image's tokens one way at a time",
    ("pat", "pf"): "patch_parallel and pipefusion: moedit splits an image's tokens one way at a time",
    ("dis", "pf"): "pipefusion: runs a stage's MoE layers once per patch",
    ("int", "pf"): "pipefusion: runs a stage's MoE layers once per patch",
    ("sel", "pf"): "pipefusion: runs a stage's MoE layers once per patch",
    ("cc", "pf"): "pipefusion: runs a stage's MoE layers once per patch",
    ("pf", "ovl"): "pipefusion: each patch updates the K/V buffers",
}

# Pairs measured silently wrong: pair -> what was measured (the test is xfail(strict=True)).
SILENT_WRONG: dict[tuple[str, str], str] = {}

DEPTH, LABELS, STEPS, CFG, SEED = 2, [1, 2], 4, 1.5, 0
EXACT_ATOL, STALE_MIN_DIFF, ROUNDED_ATOL, ROUNDED_MIN_DIFF = 1e-5, 1e-3, 1e-4, 1e-6
CHANGES_NOTHING = {"ep", "chk", "sc", "off", "uly", "rng", "cfg", "ovl", "tri", "dp"}
ATTENTION_STALE = {"pat", "pf"}
FRAGMENTS = {
    "ep": {"expert_parallel": {"degree": 2}},
    "chk": {"expert_parallel": {"chunks": 2}},
    "dis": {"staleness": {"mode": "displaced"}},
    "int": {"staleness": {"mode": "interweaved"}},
    "sel": {"selective_sync": {"strategy": "deep"}},
    "cc": {"conditional_comm": {"interval": 2, "drop": "low"}},
    "sc": {"shortcut": {"enabled": True}},
    "rw": {"shortcut": {"enabled": True, "rewrite": True}},
    "off": {"offload": {"enabled": True, "resident_experts": 1}},  # raised by _with_offload_budget
    "uly": {"sequence_parallel": {"ulysses": 2}},
    "rng": {"sequence_parallel": {"ring": 2}},
    "cfg": {"cfg_parallel": True},
    "pat": {"patch_parallel": {"degree": 2}},
    "pf": {"pipefusion": {"degree": 2}},
    "ovl": {"schedule": {"policy": "overlap"}},
    "tri": {"kernels": "triton"},
    "dp": {"data_parallel": 2},
    "wire": {"expert_parallel": {"wire_dtype": "bfloat16"}},
}
SHARDS_EXPERTS = {"ep", "chk", "dis", "int", "sel", "cc", "sc", "rw", "off", "ovl", "tri", "wire"}
NEEDS_MODE = {"sel", "cc"}


def _grid() -> dict[tuple[str, str], str]:
    lines = [line.split() for line in MATRIX.strip().splitlines()]
    names = lines[0]
    assert names == list(SHORT) and [row[0] for row in lines[1:]] == names, "MATRIX rows/columns out of order"
    return {(row[0], b): cell for row in lines[1:] for b, cell in zip(names, row[1:])}


GRID = _grid()
PAIRS = [(a, b) for i, a in enumerate(SHORT) for b in list(SHORT)[i:]]  # the diagonal is the section alone


def _pair_id(pair) -> str:
    a, b = pair
    return a if a == b else f"{a}+{b}"


# -- plans -------------------------------------------------------------------------------
def _merge(into: dict, fragment: dict) -> dict:
    for key, value in fragment.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)
    return into


def _plan(sections, one_rank: bool = False) -> dict:
    """The plan dict of `sections` with their companions (module docstring); `one_rank`: experts unsharded."""
    plan: dict = {}
    for name in sections:
        _merge(plan, FRAGMENTS[name])
    if set(sections) & NEEDS_MODE and "mode" not in plan.get("staleness", {}):
        _merge(plan, {"staleness": {"mode": "interweaved"}})
    dense = ((2 if plan.get("cfg_parallel") else 1) * plan.get("patch_parallel", {}).get("degree", 1)
             * plan.get("sequence_parallel", {}).get("ulysses", 1) * plan.get("sequence_parallel", {}).get("ring", 1))
    if one_rank:
        assert dense == 1 and "pipefusion" not in plan, sections
        _merge(plan, {"expert_parallel": {"degree": 1}})
    elif set(sections) & SHARDS_EXPERTS:
        _merge(plan, {"expert_parallel": {"degree": max(2, dense)}})
    return _merge(plan, {"runtime": {"timeout_s": 60}})


def _model_name(pair) -> str:
    return "scmoe" if "sc" in pair else "standard"


@functools.cache
def _model(name: str):
    return (tiny_scmoe if name == "scmoe" else tiny_model)(depth=DEPTH)


def _compile(model_name: str, plan: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stale mode on one rank warns that it gains nothing
        return moedit.compile(_model(model_name), moedit.Plan(**plan))


def _with_offload_budget(model_name: str, plan: dict) -> dict:
    """`plan` with the smallest `resident_experts` the offload pass accepts for it (every fetch evicts)."""
    if not plan.get("offload", {}).get("enabled"):
        return plan
    trial = copy.deepcopy(plan)
    try:
        _compile(model_name, trial)
    except PlanError as err:
        found = re.search(r"resident_experts to at least (\d+)", str(err))
        if found is None:
            raise
        return _merge(trial, {"offload": {"resident_experts": int(found.group(1))}})
    return trial


def _all_warmup(plan: dict) -> dict:
    """`plan` with every step a warm-up step (synchronous: exact for every stale technique)."""
    plan = copy.deepcopy(plan)
    for section in ("staleness", "patch_parallel", "pipefusion"):
        if section in plan and (section != "staleness" or "mode" in plan[section]):
            plan[section]["warmup_steps"] = STEPS
    return plan


def _core(pair) -> tuple[str, ...]:
    return tuple(s for s in dict.fromkeys(pair) if s not in CHANGES_NOTHING)


def _key(model_name: str, plan: dict) -> str:
    return f"{model_name} {json.dumps(plan, sort_keys=True)}"


# -- running ------------------------------------------------------------------------------
def _attempt(model_name: str, plan: dict):
    """The images `plan` samples (on this rank), or the error it raised as "TypeName: message"."""
    try:
        with _compile(model_name, _with_offload_budget(model_name, plan)).to_runtime() as runner:
            return runner.sample(LABELS, steps=STEPS, cfg_scale=CFG, seed=SEED)
    except Exception as err:  # noqa: BLE001 -- the test of the pair reads it (a refusal is a PlanError)
        return f"{type(err).__name__}: {err}"


def _worker(rank, world, cases):
    return {key: _attempt(model_name, plan) for key, model_name, plan in cases}


@torch.no_grad()
def _eager(model_name: str) -> torch.Tensor:
    return rectified_flow_sample(_model(model_name), initial_noise(len(LABELS), 4, 8, seed=SEED),
                                 torch.tensor(LABELS), steps=STEPS, cfg_scale=CFG, null_class=10)


def _world_size(plan: dict):
    """The plan's world size, or the PlanError its validation raised as "PlanError: message"."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return moedit.Plan(**plan).world_size
    except PlanError as err:
        return f"PlanError: {err}"


class Matrix:
    """Every pair's plan and its reference runs, run in one spawned world per world size (the
    world-1 references in this process); `outputs[key]` holds each rank's images or error."""

    def __init__(self):
        self.pair_key: dict = {}    # pair -> key of its plan
        self.reference: dict = {}   # S and P pairs -> (key of the reference or None for eager, what it is)
        self.warmup_key: dict = {}  # P pairs -> key of the plan with every step warm-up
        self.outputs: dict = {}     # key -> [each rank's images or error text]
        self.runs: dict = {}        # key -> (model_name, plan)
        by_world: dict = {}
        for pair in PAIRS:
            if GRID[pair] not in "-.":
                self._add(pair)
        for key, (model_name, plan) in self.runs.items():
            world = _world_size(plan)
            if isinstance(world, str):
                self.outputs[key] = [world]
            else:
                by_world.setdefault(world, []).append((key, model_name, plan))
        for world, cases in sorted(by_world.items()):
            ranks = [_worker(0, 1, cases)] if world == 1 else run_ranks(world, _worker, cases, timeout_s=400)
            for rank_results in ranks:
                for key, value in rank_results.items():
                    self.outputs.setdefault(key, []).append(value)
        self.eager = {name: _eager(name) for name in ("standard", "scmoe")}

    def _run(self, model_name: str, plan: dict) -> str:
        key = _key(model_name, plan)
        self.runs.setdefault(key, (model_name, plan))
        return key

    def _add(self, pair):
        model_name = _model_name(pair)
        plan = _plan(dict.fromkeys(pair))
        self.pair_key[pair] = self._run(model_name, plan)
        core = _core(pair)
        if GRID[pair] not in "SPW":
            return
        if not set(core) & ATTENTION_STALE:
            self.reference[pair] = self._run(model_name, _plan(core, one_rank=True)), f"{'+'.join(core)} on 1 rank"
        elif set(core) != set(pair):
            self.reference[pair] = self._run(model_name, _plan(core)), f"{'+'.join(core)} alone"
        else:
            self.warmup_key[pair] = self._run(model_name, _all_warmup(plan))
            rest = tuple(s for s in core if s not in ATTENTION_STALE)
            self.reference[pair] = ((self._run(model_name, _all_warmup(_plan(rest, one_rank=True))),
                                     f"{'+'.join(rest)} on 1 rank, every step warm-up") if rest else (None, "eager"))

    def error(self, key) -> str | None:
        return next((o for o in self.outputs[key] if isinstance(o, str)), None)

    def output(self, key) -> torch.Tensor:
        """The images of the run `key`, the same on every rank."""
        outputs = self.outputs[key]
        assert self.error(key) is None, f"{key} failed: {self.error(key)}"
        for rank, out in enumerate(outputs[1:], 1):
            torch.testing.assert_close(out, outputs[0], rtol=0, atol=0, msg=lambda m: f"rank {rank} vs 0: {m}")
        return outputs[0]


@pytest.fixture(scope="module")
def matrix() -> Matrix:
    return Matrix()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _marks(pair):
    reason = SILENT_WRONG.get(pair)
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


@pytest.mark.parametrize("pair", [pytest.param(p, id=_pair_id(p), marks=_marks(p)) for p in PAIRS])
def test_pair_has_the_outcome_the_matrix_states(matrix, pair):
    outcome = GRID[pair]
    if outcome == "-":
        pytest.skip("not a pair: both sections set staleness.mode")
    if outcome == ".":
        pytest.skip("not run: Triton's interpreter costs ~6 s a plan at 2 ranks; the triton row runs the kernels "
                    "with chunks, offload and conditional communication, tests/test_kernels.py each kernel")
    error = matrix.error(matrix.pair_key[pair])
    if outcome == "R":
        assert error is not None, f"{_pair_id(pair)} was expected to be refused ({REFUSED[pair]!r}) but ran"
        assert error.startswith("PlanError: ") and REFUSED[pair] in error, error
        return
    out = matrix.output(matrix.pair_key[pair])
    eager = matrix.eager[_model_name(pair)]
    if outcome == "E":
        diff = _max_diff(out, eager)
        assert diff <= EXACT_ATOL, f"{_pair_id(pair)} claims exact: max |diff| vs the eager model {diff:.3g}"
        return
    key, what = matrix.reference[pair]
    atol = ROUNDED_ATOL if "wire" in pair else EXACT_ATOL
    if outcome in "SW":
        diff = _max_diff(out, matrix.output(key))
        assert diff <= atol, f"{_pair_id(pair)} vs its stale core ({what}): max |diff| {diff:.3g}"
    else:
        assert outcome == "P", outcome
        warm = matrix.output(matrix.warmup_key[pair])
        diff = _max_diff(warm, eager if key is None else matrix.output(key))
        assert diff <= atol, f"{_pair_id(pair)} with every step warm-up vs {what}: max |diff| {diff:.3g}"
    stale, least = _max_diff(out, eager), ROUNDED_MIN_DIFF if outcome == "W" else STALE_MIN_DIFF
    claim = "a rounded wire" if outcome == "W" else "stale"
    assert stale > least, f"{_pair_id(pair)} claims {claim} but is within {stale:.3g} of the eager model"


def test_the_matrix_is_symmetric_and_every_refusal_has_a_message():
    for (a, b), cell in GRID.items():
        assert GRID[b, a] == cell, f"MATRIX[{a}][{b}] = {cell} but MATRIX[{b}][{a}] = {GRID[b, a]}"
    refused = {p for p in PAIRS if GRID[p] == "R"}
    assert refused == set(REFUSED), refused ^ set(REFUSED)
    assert set(SILENT_WRONG) <= {p for p in PAIRS if GRID[p] in "ES"}
