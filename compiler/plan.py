"""The plan: which parallelism and staleness techniques to apply, validated up front.

Every section is validated here, with errors that say what to change; what only the model
can tell (an expert degree that does not divide the experts) is checked when compiling.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import json
import math
import os
import stat
import typing
import warnings
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class PlanError(ValueError):
    """A plan that cannot be compiled; the message names the field and the fix."""


# strict: a boolean is not a number and 1.5 is not an int; allow_inf_nan: every number is finite
_CONFIG = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class _Section(BaseModel):
    model_config = _CONFIG


MAX_CHUNKS = 64
WireDtype = Literal["auto", "bfloat16", "float16", "float8"]  # see [Note: wire dtypes] in moedit/runtime/wire.py


class ExpertParallel(_Section):
    degree: int = Field(1, ge=1, description="Consecutive ranks the routed experts are sharded over; expert e lives "
                        "on the (e % degree)-th rank of its group.")
    chunks: int | Literal["auto"] = Field(
        1, description="Split each synchronous layer's tokens into this many chunks, pipelined so that one chunk's "
                       "dispatch and combine overlap another's experts (exact). auto: chosen from the measured costs "
                       "in schedule.profile.")

    wire_dtype: WireDtype = Field(
        "auto", description="The dtype the dispatch (and, unless combine_wire_dtype says otherwise, the combine) sends "
                            "rows in: auto the activations' own; bfloat16 or float16 half the bytes of float32; float8 "
                            "(e4m3) with a float32 scale per wire_block elements. Lossy unless auto: the experts' "
                            "inputs and outputs are rounded to it.")
    combine_wire_dtype: WireDtype | None = Field(None, description="The combine's wire dtype (null: wire_dtype), "
                                                 "e.g. float8 dispatch and bfloat16 combine, as DeepEP.")
    wire_block: int = Field(128, ge=0, description="float8 wires: elements of a row that share one scale (0, or a "
                            "shorter row: one scale per row).")

    @model_validator(mode="after")
    def _chunks_and_wire_block(self):
        if self.chunks != "auto" and not 1 <= self.chunks <= MAX_CHUNKS:
            raise ValueError(f"chunks must be 'auto' or a number from 1 to {MAX_CHUNKS} (each chunk adds an "
                             f"exchange's latency per layer), got {self.chunks}")
        default_block = type(self).model_fields["wire_block"].default  # (to_dict writes it, so not fields_set)
        if self.wire_block != default_block and "float8" not in self.wire_dtypes.values():
            raise ValueError(f"wire_block: {self.wire_block} only applies to a float8 wire; set wire_dtype or "
                             "combine_wire_dtype to float8, or leave wire_block out")
        return self

    @property
    def wire_dtypes(self) -> dict[str, str]:
        """The wire dtype of the "dispatch" and of the "combine" ("auto": the activations')."""
        return {"dispatch": self.wire_dtype, "combine": self.combine_wire_dtype or self.wire_dtype}


class Staleness(_Section):
    # How many steps old a stale layer's routed output is, per mode (what displace.py and
    # interweave.py build; the verifier holds their programs to it, the planner ranks by it).
    STEPS: typing.ClassVar[dict[str, int]] = {"sync": 0, "interweaved": 1, "displaced": 2}

    mode: Literal["sync", "displaced", "interweaved"] = Field(
        "sync", description="sync: exact. displaced: routed outputs 2 steps stale. interweaved: 1 step stale.")
    warmup_steps: int = Field(1, ge=0, description="Leading diffusion steps run synchronously to fill the caches.")
    cooldown_steps: int = Field(0, ge=0, description="Trailing diffusion steps run synchronously.")
    sync_every: int | None = Field(None, ge=1, description="Run every k-th step synchronously (null: never).")
    cache_limit_mb: float | None = Field(None, gt=0, description="Fail if staleness caches would hold more than this.")

    @field_validator("mode", mode="before")
    @classmethod
    def _dice_is_a_plan(cls, mode):
        if mode == "dice":
            raise ValueError("'dice' is a whole plan, not a staleness mode: start from examples/plans/dice.yaml "
                             "(mode interweaved, the deeper half of the layers synchronous, conditional communication)")
        return mode


class SelectiveSync(_Section):
    strategy: Literal["none", "deep", "shallow", "staggered", "auto"] | list[int] = Field(
        "none", description="Which MoE layers stay synchronous under a stale mode, or an explicit list of layers; "
                            "auto: the most staleness-sensitive ones, measured on a calibration run at compile time.")
    fraction: float = Field(0.5, ge=0, le=1, description="auto: the share of MoE layers kept synchronous.")
    calibration_steps: int = Field(10, ge=2, le=1000, description="auto: diffusion steps of the calibration run "
                                   "(one run per MoE layer, at compile time).")
    calibration_images: int = Field(4, ge=1, le=256, description="auto: images in the calibration run.")
    calibration_sampler: Literal["rflow", "ddpm", "ddim"] = Field(
        "rflow", description="auto: the sampler of the calibration run; best the one the model samples with "
                             "(rflow: DiT-MoE XL and G; ddpm: S and B).")
    calibration_cfg_scale: float = Field(1.5, ge=0, description="auto: classifier-free guidance scale of the "
                                         "calibration run.")
    calibration_seed: int = Field(0, ge=0, description="auto: seed of the calibration noise, drawn on the CPU and "
                                  "moved to the model's device, so every rank measures the same run and keeps the "
                                  "same layers.")


class ConditionalComm(_Section):
    interval: int | None = Field(None, ge=2, description="Send every slot on every `interval`-th step (refresh), "
                                 "drop slots on the others; null disables.")
    drop: Literal["low", "high", "random", "threshold"] = Field(
        "low", description="low/high/random: drop `slots` slots per token by score rank or at random; "
                           "threshold: drop every slot whose router weight is below `threshold`.")
    slots: int = Field(1, ge=1, description="Slots dropped per token (low, high, random); below the top-k.")
    threshold: float = Field(0.1, ge=0, description="Router-weight threshold for drop: threshold.")


class Shortcut(_Section):
    enabled: bool = Field(False, description="ScMoE shortcut schedule: on ScMoE models (whose MoE reads the previous "
                          "block), dispatch as early and combine as late as the model allows, experts in between "
                          "(exact).")
    rewrite: bool = Field(False, description="On standard models: first feed each MoE from the shortcut `position` "
                          "of the previous block. Changes the model's outputs (lossy).")
    position: Literal[1, 2, 3] = Field(2, description="rewrite: Pos-1 (previous block's output), Pos-2 (its "
                                       "post-attention residual) or Pos-3 (its input).")

    @model_validator(mode="after")
    def _rewrite_needs_enabled(self):
        if self.rewrite and not self.enabled:
            raise ValueError("rewrite: only applies with enabled: true")
        if self.position != 2 and not self.rewrite:
            raise ValueError("position: only applies with rewrite: true (an ScMoE model's shortcut position is "
                             "part of the model)")
        return self


class SequenceParallel(_Section):
    ulysses: int = Field(1, ge=1, description="Ulysses degree: attention trades sequence shards for head shards "
                         "by all-to-all; must divide the attention head count.")
    ring: int = Field(1, ge=1, description="Ring degree: K/V blocks travel around the ring point to point while "
                      "each rank attends to the block it holds.")

    @property
    def degree(self) -> int:
        """Ranks one image's tokens are split over."""
        return self.ulysses * self.ring


class PatchParallel(_Section):
    degree: int = Field(1, ge=1, description="Ranks one image's tokens are split over as patches (DistriFusion): "
                        "each attention uses its own patch's fresh K/V and the other patches' K/V from the previous "
                        "step, gathered while the step runs (lossy). Must divide the tokens per image.")
    warmup_steps: int = Field(1, ge=1, description="Leading diffusion steps run synchronously (fresh K/V from every "
                              "patch); staleness.cooldown_steps and sync_every apply too.")


class PipeFusion(_Section):
    degree: int = Field(1, ge=1, description="Pipeline stages: the blocks are split into this many consecutive "
                        "groups, one per rank of the pipefusion axis; activations pass point to point (PipeFusion).")
    patches: int | None = Field(None, ge=1, description="Patches the latent is split into after warm-up; each "
                                "attention uses the K/V its stage last computed for the other patches, this step's "
                                "for the patches before and the previous step's for those after (lossy). "
                                "null: the degree.")
    warmup_steps: int = Field(1, ge=1, description="Leading diffusion steps run synchronously, the whole latent as "
                              "one patch (exact); staleness.cooldown_steps and sync_every apply too.")

    @property
    def num_patches(self) -> int:
        return self.patches or self.degree


class Offload(_Section):
    enabled: bool = Field(False, description="Keep routed experts in host memory; copy only those that receive "
                          "tokens to the device, as soon as the token counts are known (exact).")
    resident_experts: int | None = Field(None, ge=1, description="Routed experts on the device at most, over all "
                                         "layers of a rank (least recently used leave first).")
    budget_mb: float | None = Field(None, gt=0, description="Or: device memory for routed experts, in MiB.")

    @model_validator(mode="after")
    def _one_budget(self):
        if self.enabled and (self.resident_experts is None) == (self.budget_mb is None):
            raise ValueError("enabled: set exactly one of resident_experts and budget_mb")
        return self


class Schedule(_Section):
    policy: Literal["program", "overlap"] = Field(
        "program", description="program: keep the traced order. overlap: reorder each program so exchanges start "
                               "early and are waited on late (results stay bit-identical).")
    profile: str | None = Field(None, description="overlap: a timeline (timeline.json from `moedit.run --timeline`, "
                                "best of a synchronous plan) whose measured times cost the nodes; null: "
                                "default estimates by node kind.")
    memory_slack: float | None = Field(0.25, ge=0, description="overlap: the model's live activations may exceed "
                                       "their peak under the traced order by this fraction (needs their sizes: a "
                                       "model with `example_inputs(batch)`, or compiled with example_inputs); "
                                       "null: no memory bound.")


class Runtime(_Section):
    timeout_s: float = Field(120.0, gt=0, le=86400, description="Every collective fails after this many seconds "
                             "instead of hanging (at most a day).")
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="auto: the backend of the default process "
                                                     "group if one exists (gloo or nccl must match it), else NCCL "
                                                     "when CUDA is available, else gloo.")
    check_finite: bool = Field(True, description="Stop all ranks with an error if a step produces NaN or Inf.")
    ranks_per_node: int | None = Field(None, ge=1, le=4096, description="Ranks on one node (consecutive, as "
                                       "torchrun numbers them), for explain()'s count of the bytes that cross a "
                                       "node boundary; null: torchrun's LOCAL_WORLD_SIZE, else one node.")


class Plan(BaseModel):
    """A validated plan. Build one with keyword arguments or `Plan.from_file(path)`."""

    model_config = _CONFIG

    expert_parallel: ExpertParallel = Field(default_factory=ExpertParallel, description="Expert parallelism.")
    staleness: Staleness = Field(default_factory=Staleness, description="DICE / DistriFusion staleness mode.")
    selective_sync: SelectiveSync = Field(default_factory=SelectiveSync, description="DICE selective synchronisation.")
    conditional_comm: ConditionalComm = Field(default_factory=ConditionalComm,
                                              description="DICE conditional communication.")
    shortcut: Shortcut = Field(default_factory=Shortcut, description="ScMoE shortcut connection.")
    sequence_parallel: SequenceParallel = Field(default_factory=SequenceParallel, description="xDiT USP.")
    data_parallel: int = Field(1, ge=1, le=1024, description="Replicas of the rest of the plan, each on its own "
                               "ranks with its share of the global batch and its own copy of the experts: the "
                               "outermost axis after pipefusion, so replicas of a node's size land on different "
                               "nodes and exchange nothing but the output batch, once a sample.")
    cfg_parallel: bool = Field(False, description="Run the cond and uncond halves of CFG on the two halves of the "
                               "mesh; one all-gather per step joins them.")
    patch_parallel: PatchParallel = Field(default_factory=PatchParallel, description="DistriFusion displaced patch "
                                          "parallelism.")
    pipefusion: PipeFusion = Field(default_factory=PipeFusion, description="xDiT PipeFusion.")
    offload: Offload = Field(default_factory=Offload, description="ScMoE expert offloading.")
    schedule: Schedule = Field(default_factory=Schedule, description="Graph-level scheduling policy.")
    kernels: Literal["auto", "torch", "triton"] = Field(
        "auto", description="Permute, unpermute, the grouped SwiGLU experts and slot dropping: torch, or Triton "
                            "kernels (moedit/runtime/kernels); auto: Triton when the plan runs on CUDA under "
                            "NCCL and Triton is installed, else torch (with a warning when CUDA is available). "
                            "triton needs NCCL; on a CPU (runtime.backend auto) it runs Triton's interpreter "
                            "(exact, slow: for tests).")
    runtime: Runtime = Field(default_factory=Runtime, description="Process-group settings.")

    @model_validator(mode="after")
    def _check_combinations(self):
        if self.staleness.mode != "sync" and self.staleness.warmup_steps < 1:
            raise ValueError("staleness.warmup_steps: a stale mode needs at least 1 synchronous warm-up step "
                             "to fill its caches; set warmup_steps >= 1")
        if self.staleness.mode == "sync" and self.selective_sync.strategy != "none":
            raise ValueError("selective_sync: has no effect when staleness.mode is 'sync' (every layer is "
                             "synchronous); remove it or choose a stale mode")
        if (self.schedule.profile is not None and self.schedule.policy != "overlap"
                and self.expert_parallel.chunks != "auto" and not self.shortcut.enabled):
            raise ValueError("schedule.profile: only schedule.policy 'overlap', expert_parallel.chunks 'auto' and the "
                             "shortcut schedule read it; set one of them, or remove the profile")
        if self.schedule.profile is not None and not os.path.isfile(self.schedule.profile):
            raise ValueError(f"schedule.profile: no file {self.schedule.profile!r}; write one with "
                             "`torchrun ... -m moedit.run --timeline --out DIR` (DIR/timeline.json) or remove it")
        MeshLayout.of(self)  # raises if the axes do not fit together
        if self.shortcut.enabled and self.schedule.policy == "overlap":
            raise ValueError("shortcut: schedule.policy 'overlap' would reorder the program again after the shortcut "
                             "schedule; keep schedule.policy at 'program' (the shortcut pass takes schedule.profile "
                             "for its costs)")
        if self.shortcut.enabled and self.expert_parallel.chunks != 1:
            raise ValueError("shortcut: expert_parallel.chunks pipelines a layer's exchanges within the layer, the "
                             "shortcut schedule overlaps them with the backbone instead; set chunks to 1")
        _check_patches(self)
        _check_unused(self)
        if self.staleness.mode != "sync" and self.expert_parallel.degree == 1:
            # A warning, not an error: the outputs are still what the mode promises, and a stale
            # plan at one rank is how its programs are checked against the model (tests).
            warnings.warn(f"staleness.mode {self.staleness.mode!r} with expert_parallel.degree 1: every rank holds "
                          "every expert, so there is no exchange to hide and the MoE outputs are stale for no gain; "
                          "set staleness.mode: sync, or shard the experts (expert_parallel.degree > 1)")
        return self

    def __init__(self, **data):
        try:
            super().__init__(**data)
        except ValidationError as err:
            raise PlanError(_report(err)) from None

    @property
    def mesh(self) -> "MeshLayout":
        """How the ranks are laid out over the plan's axes (see `MeshLayout`)."""
        return MeshLayout.of(self)

    @property
    def world_size(self) -> int:
        """Ranks the plan runs on."""
        return self.mesh.world

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Plan":
        """Load a plan from YAML (.yaml/.yml) or JSON (.json)."""
        path = os.fspath(path)
        data = read_mapping(path, "plan")
        if not data:
            raise PlanError(f"{path} is empty; write at least one section (the single-device plan is "
                            "`expert_parallel: {degree: 1}`)")
        try:
            return cls(**data)
        except PlanError as err:
            raise PlanError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")


MAX_FILE_BYTES = 1 << 20  # a plan or hardware profile is a few hundred bytes


def read_mapping(path: str, what: str, names_only: bool = True) -> dict:
    """The mapping a YAML or JSON `what` file (a plan, a hardware profile) holds, each key once
    (and, with `names_only`, every key a string); a PlanError naming the file (and the line,
    where the parser says) if not."""
    try:
        info = os.stat(path)
        if stat.S_ISREG(info.st_mode) and info.st_size > MAX_FILE_BYTES:
            raise PlanError(f"{path} holds {info.st_size / 2**20:.1f} MiB; a {what} file is a few hundred bytes of "
                            f"YAML or JSON (at most {MAX_FILE_BYTES // 2**20} MiB): is it the right file?")
        if not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode):
            raise PlanError(f"{path} is not a regular file (a pipe or a device); give the path of a {what} file")
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise PlanError(f"cannot read {what} file {path!r}: {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise PlanError(f"{path} is not a text file ({err.reason} at byte {err.start}); a {what} is YAML or JSON "
                        "text") from None
    is_json = path.endswith(".json")
    try:
        data = json.loads(text, object_pairs_hook=_unique_pairs) if is_json else yaml.load(text, _UniqueKeyLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        context = f" ({err.context})" if err.context else ""
        raise PlanError(f"{path}{where}: not valid YAML: {err.problem}{context}") from None
    except (json.JSONDecodeError, yaml.YAMLError, ValueError) as err:
        raise PlanError(f"{path} is not valid {'JSON' if is_json else 'YAML'}: {err}") from None
    except RecursionError:
        raise PlanError(f"{path}: values nested too deeply to read; a {what} is a mapping of sections, each a "
                        "mapping of settings") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise PlanError(f"{path} must hold a mapping of {what} sections, got {type(data).__name__}")
    if names_only:
        _check_keys(data, path, ())
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last one silently)
    and aliases (`*name`, merge keys): a plan has no use for them, and nested aliases can make a
    few lines stand for billions of values."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor}: a plan has no aliases or merge "
                                              "keys (<<); write the values out", event.start_mark)
        return super().compose_node(parent, index)


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, collections.abc.Hashable):
            raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is not a name; keys are words such as "
                                                    "'degree'", key_node.start_mark)
        if key in first:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} given twice (first on line {first[key] + 1}); keep one", key_node.start_mark)
        first[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _unique_pairs(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ValueError(f"key(s) {', '.join(map(repr, twice))} given twice in one object; keep one")
    return dict(pairs)


def _check_keys(data: dict, path: str, where: tuple) -> None:
    for key, value in data.items():
        if not isinstance(key, str):
            at = ".".join(where) or "the top level"
            raise PlanError(f"{path}: key {key!r} at {at} is not a name; keys are words such as 'degree'")
        if isinstance(value, dict):
            _check_keys(value, path, (*where, key))


def _check_unused(plan: "Plan") -> None:
    """Refuse a setting changed from its default where nothing reads it: a plan that says it and is
    silently run without it would mislead (to_dict writes the defaults, so they stay allowed)."""
    patches = plan.patch_parallel.degree > 1 or plan.pipefusion.degree > 1
    cc, sel, st = plan.conditional_comm, plan.selective_sync, plan.staleness
    unused = {  # section -> (the fields nothing reads, why, what to do)
        "conditional_comm": (("drop", "slots", "threshold") if cc.interval is None else ("slots",)
                             if cc.drop == "threshold" else ("threshold",),
                             "conditional communication is off (no interval)" if cc.interval is None else
                             f"drop is {cc.drop!r}", "set interval (e.g. 2) and the drop rule that reads it"),
        "selective_sync": (() if sel.strategy == "auto" else tuple(f for f in type(sel).model_fields
                                                                  if f != "strategy"),
                           f"strategy is {sel.strategy!r}, and only strategy 'auto' calibrates",
                           "set strategy: auto"),
        "staleness": (() if st.mode != "sync" else ("cache_limit_mb",) if patches else
                      ("warmup_steps", "cooldown_steps", "sync_every", "cache_limit_mb"),
                      "staleness.mode is 'sync'", "choose a stale mode"),
        "offload": (() if plan.offload.enabled else ("resident_experts", "budget_mb"), "offload is not enabled",
                    "set enabled: true"),
        "pipefusion": (() if plan.pipefusion.degree > 1 else ("patches", "warmup_steps"), "pipefusion.degree is 1",
                       "set degree > 1"),
        "patch_parallel": (() if plan.patch_parallel.degree > 1 else ("warmup_steps",),
                           "patch_parallel.degree is 1", "set degree > 1"),
        "schedule": (() if plan.schedule.policy == "overlap" or plan.shortcut.enabled else ("memory_slack",),
                     "schedule.policy is 'program'", "set policy: overlap"),
    }
    for name, (fields, why, fix) in unused.items():
        section = getattr(plan, name)
        for field in fields:
            if getattr(section, field) != type(section).model_fields[field].default:
                raise ValueError(f"{name}.{field}: has no effect because {why}; {fix}, or remove {field}")


def _check_patches(plan: "Plan") -> None:
    """What patch parallelism and PipeFusion combine with (moedit/passes/patch_parallel.py, pipefusion.py)."""
    pp, pf, sp = plan.patch_parallel, plan.pipefusion, plan.sequence_parallel
    splits = [name for name, degree in (("sequence_parallel", sp.degree), ("patch_parallel", pp.degree),
                                        ("pipefusion", pf.degree)) if degree > 1]
    if len(splits) > 1:
        raise ValueError(f"{' and '.join(splits)}: moedit splits an image's tokens one way at a time; keep one of "
                         "them and give the other ranks to cfg_parallel or expert_parallel")
    if pf.degree > 1 and (plan.staleness.mode != "sync" or plan.conditional_comm.interval is not None):
        raise ValueError("pipefusion: runs a stage's MoE layers once per patch, and the DICE staleness modes and "
                         "conditional_comm cache one value per layer across steps; set staleness.mode: sync and "
                         "remove conditional_comm, or split the tokens with patch_parallel instead")
    for name, section in (("patch_parallel", pp), ("pipefusion", pf)):
        if section.degree == 1:
            continue
        if plan.shortcut.enabled or plan.offload.enabled:
            raise ValueError(f"{name}: does not combine with shortcut or offload in this version of moedit; "
                             "disable those sections")
        if plan.staleness.mode != "sync" and section.warmup_steps != plan.staleness.warmup_steps:
            raise ValueError(f"{name}.warmup_steps ({section.warmup_steps}) must equal staleness.warmup_steps "
                             f"({plan.staleness.warmup_steps}): a step is synchronous for every stale technique "
                             "or for none; set them equal")
    if pf.degree > 1 and plan.schedule.policy == "overlap":
        raise ValueError("pipefusion: each patch updates the K/V buffers the next patch reads, in the order the "
                         "pass emits; keep schedule.policy at 'program'")


@dataclasses.dataclass(frozen=True)
class MeshLayout:
    """The ranks on a grid of named axes, outermost first: `pipefusion` (pipeline stages),
    `data` (the global batch split), `cfg` (the cond and uncond halves), `patch`, `ring` and
    `ulysses` (one image's tokens split); a rank's number is its coordinates read as a
    mixed-radix number, `ulysses` the fastest-moving digit. Groups along an axis are the
    ranks that differ only in it; `sp` is ring x ulysses together, `world` every rank.

    Expert parallelism does not add an axis: routed experts are sharded over `ep`
    consecutive ranks of one pipeline stage. Per replica, the ranks are the larger of `ep`
    and cfg x patch x ring x ulysses, and the smaller must divide it; when `ep` is the
    larger, the remaining factor splits the batch (data parallel), which is how a plain
    expert-parallel plan runs. `data_parallel` replicas multiply the data axis: EP 2 x data
    parallel 2 is a data axis of 4 whose expert groups are ranks {0, 1} and {2, 3}."""

    pipefusion: int
    data: int
    cfg: int
    patch: int
    ring: int
    ulysses: int
    ep: int

    AXES = ("pipefusion", "data", "cfg", "patch", "ring", "ulysses")

    @classmethod
    def of(cls, plan: "Plan") -> "MeshLayout":
        sp, ep = plan.sequence_parallel, plan.expert_parallel.degree
        cfg = 2 if plan.cfg_parallel else 1
        dense = cfg * plan.patch_parallel.degree * sp.degree
        axes = dict(pipefusion=plan.pipefusion.degree, cfg=cfg, patch=plan.patch_parallel.degree, ring=sp.ring,
                    ulysses=sp.ulysses, ep=ep)
        if ep % dense == 0:
            return cls(data=plan.data_parallel * ep // dense, **axes)
        if dense % ep == 0:
            return cls(data=plan.data_parallel, **axes)
        raise ValueError(
            f"expert_parallel.degree ({ep}) and the dense axes of a stage, cfg ({cfg}) x patch "
            f"({plan.patch_parallel.degree}) x ulysses ({sp.ulysses}) x ring ({sp.ring}) = {dense}, must divide one "
            f"another (a stage has the larger of the two); set expert_parallel.degree to {dense} (every rank holds a "
            f"shard of the experts), to a divisor of it, or to a multiple of it (the extra factor splits the batch "
            "over more ranks)")

    @property
    def world(self) -> int:
        return math.prod(self.axes.values())

    @property
    def axes(self) -> dict[str, int]:
        return {axis: getattr(self, axis) for axis in self.AXES}

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of ranks along `axis` (one of AXES, "sp", "ep", "world"), each in axis order."""
        if axis == "world":
            return [list(range(self.world))]
        if axis == "ep":
            return [list(range(start, start + self.ep)) for start in range(0, self.world, self.ep)]
        if axis == "sp":
            size, stride = self.ring * self.ulysses, 1
        elif axis in self.AXES:
            size, stride = getattr(self, axis), math.prod(list(self.axes.values())[self.AXES.index(axis) + 1:])
        else:
            raise ValueError(f"no mesh axis {axis!r}; axes: {[*self.AXES, 'sp', 'ep', 'world']}")
        starts = [r for r in range(self.world) if (r // stride) % size == 0]
        return [[start + i * stride for i in range(size)] for start in starts]

    def group_of(self, axis: str, rank: int) -> list[int]:
        """The group along `axis` that `rank` belongs to."""
        return next(group for group in self.groups(axis) if rank in group)

    def index(self, axis: str, rank: int) -> int:
        """`rank`'s position in its group along `axis`."""
        return self.group_of(axis, rank).index(rank)

    def size(self, axis: str) -> int:
        return len(self.groups(axis)[0])

    def describe(self) -> str:
        used = [f"{axis} {size}" for axis, size in self.axes.items() if size > 1]
        return " x ".join(used or ["1 rank"]) + f"; experts over {self.ep} rank(s)"


def reference_table() -> str:
    """Every plan field as a Markdown table (field, type, default, description), read from
    the pydantic models above: `moedit plan-schema` prints it, docs/plans.md holds a copy."""
    rows = ["| field | type | default | description |", "|---|---|---|---|"]

    def add(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            section = field.annotation if isinstance(field.annotation, type) and issubclass(
                field.annotation, BaseModel) else None
            kind = "section" if section else "; ".join(filter(None, [_type_name(field.annotation), _bounds(field)]))
            default = "" if section else f"`{_yaml(field.default)}`"
            text = (field.description or "").replace("|", "\\|")
            rows.append(f"| `{prefix}{name}` | {kind} | {default} | {text} |")
            if section:
                add(section, f"{prefix}{name}.")

    add(Plan, "")
    return "\n".join(rows)


def _type_name(annotation) -> str:
    """int, float or null, one of "sync", "displaced"..., list of int: a type as a plan file spells it."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is Literal:
        return ("one of " if len(args) > 1 else "") + ", ".join(f"`{_yaml(a)}`" for a in args)
    if typing.get_origin(annotation) is list:
        return f"list of {_type_name(args[0])}"
    if args:  # a union
        return " or ".join(_type_name(a) for a in args)
    return "null" if annotation is type(None) else annotation.__name__


def _yaml(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("...\n").strip()


def _bounds(field) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    return " and ".join(f"{sign} {getattr(m, key)}" for m in field.metadata for key, sign in signs.items()
                        if getattr(m, key, None) is not None)


def _report(err: ValidationError) -> str:
    """One problem on one line (after "invalid plan: "), several each on a line of their own.
    A field that takes one of several types (chunks: a number or "auto") is one problem, whose
    line says what each type wanted, not pydantic's name for each type."""
    by_field: dict[str, list[str]] = {}
    for error in err.errors():
        loc, tag = _union_split(error)
        field = ".".join(map(str, loc))
        rest = ".".join(map(str, error["loc"][len(loc) + 1:])) if tag else ""
        by_field.setdefault(field, []).append((f"at {rest}: " if rest else "") + _message(error))
    problems = [(f"{field}: " if field else "") + _either(messages) for field, messages in by_field.items()]
    if len(problems) == 1:
        return f"invalid plan: {problems[0]}"
    return f"invalid plan, {len(problems)} problems:\n" + "\n".join(f"  {p}" for p in problems)


def _message(error: dict) -> str:
    if error["type"] == "extra_forbidden":
        section = _section_at(error["loc"][:-1])
        accepted = ", ".join(section.model_fields) if section is not None else "(none)"
        return f"unknown key; accepted keys here: {accepted}"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] != "value_error" and not isinstance(error.get("input"), dict):
        message += f" (got {_short(error.get('input'))})"
    return message


def _union_split(error: dict) -> tuple[tuple, bool]:
    """(the error's location up to a union's type tag, whether there was one): pydantic puts the
    member type ("int", "literal['auto']", "list[int]") into the location of a union's errors,
    and a plan's fields hold no mappings, so a name right below a field is such a tag."""
    loc = error["loc"]
    for i in range(1, len(loc)):
        if _section_at(loc[:i]) is None:  # loc[:i] is a field, not a section
            return (loc[:i], True) if isinstance(loc[i], str) else (loc, False)
    return loc, False


def _either(messages: list[str]) -> str:
    """The messages of one field, one sentence: "A, or b (got X)" (X said once if the same)."""
    got = {m[m.rfind(" (got "):] if " (got " in m else "" for m in messages}
    suffix = got.pop() if len(got) == 1 and len(messages) > 1 else ""
    head, *others = [m.removesuffix(suffix) for m in messages]
    return ", or ".join([head, *(m.removeprefix("Input should be ") for m in others)]) + suffix


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _section_at(loc) -> type[BaseModel] | None:
    """The plan section (a pydantic model class) at `loc`, e.g. ("staleness",) -> Staleness."""
    model: type[BaseModel] = Plan
    for key in loc:
        field = model.model_fields.get(key)
        annotation = field.annotation if field is not None else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model
