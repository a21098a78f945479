"""The cost model: how long a node takes on some hardware, from its FLOPs and bytes.

A node's work is the list of torch ops it runs, each as (FLOPs, bytes read and written),
counted on fake tensors (`OpCounter`; FLOPs from torch's own flop counter registry, so
only matmul-like ops have them). On a hardware profile an op takes

    (max(FLOPs / matmul rate of its dtype, bytes / memory bandwidth) + per-op overhead) / efficiency

(a roofline per op, plus the time to launch it: a CUDA kernel launch, or on a CPU the
dispatcher and Python; on a CPU, `efficiency` is what a reference block's real ops reach of
that roofline, measured by `moedit calibrate`). An all-to-all takes its link's latency plus the bytes each rank
sends over each link divided by that link's bandwidth; which link a pair of ranks uses
depends on whether they share a node (`Hardware.ranks_per_node`, or `nodes`). A link may be
a token bucket (tc's `tbf`): bursts up to `bucket_bytes` pass at `burst_bytes_per_s`, the
rest at `bytes_per_s` — the simulator keeps the bucket's level over time.

Profiles are YAML files: the published ones ship in `moedit/planner/hardware/` with the source of
every figure; `cpu-local` (and `shaped-link`) are written by `moedit calibrate`, which
measures this machine, into the cache folder (`$MOEDIT_CACHE`, default ~/.cache/moedit).
"""

from __future__ import annotations

import math
import os
import pathlib
import re

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

from moedit.plan import read_mapping

BUILTIN = pathlib.Path(__file__).parent / "hardware"
CALIBRATED = ("cpu-local", "shaped-link")  # and "shaped-2xR", the two-node test bed (`calibrate --nodes 2`)


def calibrated(name: str) -> bool:
    """Whether `name` is a profile `moedit calibrate` writes (a CPU machine) rather than a published one."""
    return name in CALIBRATED or re.fullmatch(r"shaped-2x\d+", name) is not None


class HardwareError(ValueError):
    pass


class Link(BaseModel):
    model_config = ConfigDict(extra="forbid")

    latency_s: float = Field(description="time of an all-to-all of a few bytes, per peer it sends to")
    latency_by_world: dict[int, float] = Field(
        default_factory=dict, description="measured all-to-all latency (not per peer) at these world sizes; "
        "used instead of latency_s where given (CPU ranks that share cores wait for each other's turn)")
    bytes_per_s: float = Field(description="sustained bytes a rank (on a token bucket: a node) sends per second")
    issue_s: float = Field(0.0, description="time the issuing thread spends starting an all-to-all")
    bucket_bytes: float = Field(0.0, description="token bucket size (tc tbf burst); 0: no bucket")
    burst_bytes_per_s: float | None = Field(None, description="rate while the bucket has tokens (None: at once)")
    cpu_bytes_per_s: float | None = Field(
        None, description="if the CPU moves the bytes (TCP on a CPU machine): bytes sent plus received per "
        "second of a core's time, which the transfer takes from compute it overlaps; None: DMA, free")
    turn_taking_s: dict[int, float] = Field(
        default_factory=dict, description="world size -> extra latency of an exchange per square root of the "
        "seconds its ranks computed since they last synchronised (CPU ranks that outnumber the cores run in "
        "turn, so their arrivals spread; measured at two compute spans, the spread grows as the square root)")

    def turns(self, world: int, computed: float) -> float:
        """What turn-taking adds to an exchange of ranks that computed `computed` seconds since they last met."""
        return self.turn_taking_s.get(world, 0.0) * math.sqrt(computed)

    def latency(self, peers: int, world: int) -> float:
        if peers == 0:
            return 0.0
        return self.latency_by_world.get(world, self.latency_s * peers)


class Hardware(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    source: str = Field(description="where the figures come from")
    flops_per_s: dict[str, float] = Field(description="achievable dense matmul rate per dtype, e.g. bfloat16")
    memory_bytes_per_s: float
    op_overhead_s: float = Field(description="fixed cost of one op: kernel launch, or CPU dispatch")
    efficiency: float = Field(1.0, description="share of the roofline real ops reach (calibrated on CPUs; "
                              "published profiles state achievable rates and keep 1)")
    ranks_per_node: int = 8
    nodes: int | None = Field(None, description="if set, the ranks split evenly over this many nodes")
    intra: Link = Field(description="between ranks of one node")
    inter: Link | None = Field(None, description="between nodes")
    per_element_s: dict[str, float] = Field(
        default_factory=dict, description="for op families that neither FLOPs nor bytes describe (softmax over "
        "a few experts, top-k and sorting, gathers and scatters): seconds per element of the op's largest "
        "tensor, where measured")
    compute_slowdown: dict[int, float] = Field(
        default_factory=dict, description="ranks on one machine -> how much slower each computes (shared CPU cores)")
    memory_bytes: float | None = Field(None, gt=0, description="memory of one device (a GPU's), or with "
                                       "memory_shared of one node; None: plans are not checked against it")
    memory_shared: bool = Field(False, description="memory_bytes is a node's, shared by its ranks (a CPU machine)")

    # -- loading ------------------------------------------------------------------

    @classmethod
    def load(cls, name: str | os.PathLike) -> "Hardware":
        """A profile by name (`moedit plan --hardware` lists them) or a YAML file."""
        path = pathlib.Path(name)
        if not path.suffix:
            path = (cache_dir() if calibrated(str(name)) else BUILTIN) / f"{name}.yaml"
        if not path.exists():
            if calibrated(str(name)):
                link = "" if str(name) == "cpu-local" else " --link shaped"
                if str(name).startswith("shaped-2x"):
                    link += f" --nodes 2 --ranks-per-node {str(name)[9:]}"
                link += " (as root)" if link else ""
                raise HardwareError(f"no calibrated {name!r} profile at {path}: run `moedit calibrate{link}` first")
            raise HardwareError(f"unknown hardware profile {str(name)!r}; known: {', '.join(known_profiles())}, "
                                "or a path to a YAML profile")
        try:
            return cls(**read_mapping(str(path), "hardware profile", names_only=False))  # rank counts are keys
        except (ValueError, TypeError) as err:  # PlanError is a ValueError
            again = " (written by an older moedit: run `moedit calibrate` again)" if calibrated(str(name)) else ""
            raise HardwareError(f"hardware profile {path} is not valid{again}: {err}") from None

    def save(self, path: str | os.PathLike) -> None:
        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            yaml.safe_dump(self.model_dump(exclude_none=True), f, sort_keys=False)

    # -- costs --------------------------------------------------------------------

    def seconds(self, ops: np.ndarray, dtype: str, ranks_here: int = 1) -> float:
        """Time of a node's ops (`OpCounter.take()`) with `ranks_here` ranks sharing this machine."""
        if len(ops) == 0:
            return 0.0
        rate = self.flops_per_s.get(dtype) or self.flops_per_s["float32"]
        per_op = np.maximum(ops[:, FLOPS] / rate, ops[:, BYTES] / self.memory_bytes_per_s)
        for index, family in enumerate(FAMILIES, start=1):
            if family in self.per_element_s:
                mine = ops[:, FAMILY] == index
                per_op[mine] = np.maximum(per_op[mine], ops[mine, ELEMENTS] * self.per_element_s[family])
        per_op += self.op_overhead_s
        return float(per_op.sum()) / self.efficiency * self.slowdown(ranks_here)

    def slowdown(self, ranks_here: int) -> float:
        """Compute time factor with `ranks_here` ranks on one machine (measured for CPUs:
        shared cores; beyond the largest count measured, in proportion)."""
        if not self.compute_slowdown:
            return 1.0
        if ranks_here in self.compute_slowdown:
            return self.compute_slowdown[ranks_here]
        most = max(self.compute_slowdown)
        return self.compute_slowdown[most] * ranks_here / most

    def node_of(self, rank: int, world: int) -> int:
        return rank // self.per_node(world)

    def per_node(self, world: int) -> int:
        """How many of `world` ranks share a node."""
        return max(1, -(-world // self.nodes) if self.nodes else self.ranks_per_node)

    def memory_per_rank(self, world: int) -> float | None:
        """The memory one of `world` ranks may use (None: the profile does not say)."""
        if self.memory_bytes is None or not self.memory_shared:
            return self.memory_bytes
        return self.memory_bytes / min(world, self.per_node(world))


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MOEDIT_CACHE", pathlib.Path.home() / ".cache" / "moedit")) / "hardware"


def known_profiles() -> list[str]:
    return sorted(p.stem for p in BUILTIN.glob("*.yaml")) + list(CALIBRATED)


# -- counting a node's ops ------------------------------------------------------------

FLOPS, BYTES, ELEMENTS, FAMILY = range(4)  # columns of an op record
FAMILIES = ("softmax", "sort", "index")  # FAMILY column: 1 + index here, 0 for other ops
_FAMILY_OF = {"_softmax": 1, "_log_softmax": 1, "topk": 2, "sort": 2, "nonzero": 2, "repeat_interleave": 2,
              "cumsum": 2, "bincount": 2, "index": 3, "index_select": 3, "gather": 3, "index_put": 3,
              "index_put_": 3, "_index_put_impl_": 3, "index_add_": 3, "index_add": 3, "scatter": 3,
              "scatter_": 3, "scatter_add_": 3, "scatter_add": 3, "embedding": 3}


class OpCounter(TorchDispatchMode):
    """Records every torch op run under it as (FLOPs, bytes read and written, elements of
    its largest tensor, family); use it under FakeTensorMode so nothing is computed. Views
    and metadata ops move no bytes and are not counted."""

    FREE = {"view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "unsqueeze", "squeeze",
            "slice", "select", "split", "split_with_sizes", "unbind", "alias", "detach", "lift_fresh", "chunk",
            "as_strided", "sym_size", "sym_stride", "sym_numel", "empty", "empty_like", "new_empty",
            "empty_strided", "new_empty_strided"}

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[float, float, float, int]] = []
        self.dtype = torch.float32

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        name = packet.__name__
        if name in self.FREE:
            return out
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
        else:
            flops = _flops(name, args, out)
        tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
        if flops:  # the rate is the inputs' dtype (a CPU decomposition may compute in float32)
            self.dtype = next(t.dtype for t in tensors if t.is_floating_point())
        self.ops.append((float(flops), float(sum(map(_nbytes, tensors))),
                         float(max((t.numel() for t in tensors), default=0)), _FAMILY_OF.get(name, 0)))
        return out

    def __enter__(self):
        self._fused = _FusedAttention(self)
        self._fused.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._fused.__exit__(*exc)

    def add(self, moved: float, elements: float = 0, family: str | None = None, count: int = 1) -> None:
        """Ops the node runs that cannot run on fake tensors (data-dependent shapes)."""
        code = FAMILIES.index(family) + 1 if family else 0
        self.ops += [(0.0, moved / count, elements, code)] * count

    def take(self) -> np.ndarray:
        ops, self.ops = np.array(self.ops, dtype=np.float64).reshape(-1, 4), []
        return ops


class _FusedAttention(TorchFunctionMode):
    """Counts `scaled_dot_product_attention` as the one fused kernel it is on a GPU (and on
    a CPU): FLOPs of QK^T and AV, bytes of q, k, v and the output, never the [L, S]
    scores that a fake tensor's math fallback would write."""

    def __init__(self, counter: OpCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not torch.nn.functional.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = (*args, *(kwargs.get(name) for name in ("query", "key", "value")[len(args):]))[:3]
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        flops = 4.0 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
        if isinstance(q, torch.Tensor) and q.is_floating_point():
            self.counter.dtype = q.dtype
        self.counter.ops.append((flops, float(sum(map(_nbytes, (q, k, v, out)))), float(q.numel()), 0))
        return out


def _flops(name: str, args, out) -> float:
    """FLOPs of the CPU kernels torch's registry does not know."""
    if name.startswith("_scaled_dot_product"):  # q [..., L, D], k [..., S, D]
        q, k = args[0], args[1]
        return 4.0 * q.shape[:-1].numel() * k.shape[-2] * q.shape[-1]
    if name == "mkldnn_convolution":
        out = out[0] if isinstance(out, (tuple, list)) else out
        return 2.0 * out.numel() * args[1].shape[1:].numel()
    return 0.0


def _nbytes(value) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0
