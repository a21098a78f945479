"""Communication: joining the process group, exchanges in flight, and the errors they raise.

[Note: async handles]
An exchange is started by a `*_start` op that returns a `Pending` (the output buffer, the
work handle and what the exchange is); exactly one `wait` turns it into a tensor. The
graph verifier checks that pairing, so no buffer is read before its exchange finished.
Collectives on one process group complete in the order they were issued, so every rank
issues them in the same order per group; the compiler checks that across ranks.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import logging
import os
import re
import time
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist

from moedit.plan import PlanError

log = logging.getLogger(__name__)

MAIN = "main"  # the channel of exchanges consumed within the step that issues them
P2P = "p2p"  # point-to-point sends and receives (PipeFusion); pairs, not collectives


class Exchange(NamedTuple):
    """What an exchange is, for error messages and the timeline."""

    name: str  # "dispatch", "combine", "counts", or one of the runtime's own gathers
    layer: int | None  # the MoE layer it belongs to, if any
    axis: str  # the mesh axis whose group carries it
    channel: str = MAIN  # which of the axis's communicators carries it (see moedit/runtime/mesh.py)

    def __str__(self) -> str:
        where = f" of MoE layer {self.layer}" if self.layer is not None else ""
        channel = "" if self.channel == MAIN else f" ({self.channel} communicator)"
        return f"{self.name}{where} on mesh axis {self.axis!r}{channel}"


@dataclasses.dataclass
class Pending:
    """An exchange in flight: read `output` only after `wait`. `expand`, if set, turns the
    packed rows of a compressed exchange back into the model's (see [Note: wire dtypes])."""

    output: torch.Tensor
    work: dist.Work | None
    exchange: Exchange | None = None
    expand: Callable[[torch.Tensor], torch.Tensor] | None = None


class WorkGroup:
    """Several work handles that finish together (a ring step's send and receive), as one."""

    def __init__(self, works: list):
        self.works = works

    def wait(self) -> bool:
        for work in self.works:
            work.wait()
        return True

    def is_completed(self) -> bool:
        return all(work.is_completed() for work in self.works)


class CollectiveError(RuntimeError):
    """An exchange did not complete: a peer rank stalled past the timeout, or died."""


# [Note: naming the stalled rank]
# gloo and NCCL say only that a collective timed out, not which rank never joined. A rank
# that stalls (or died) does not time out itself; every rank that waited for it does, at
# about the same moment. So a rank whose exchange fails posts that in the default group's
# key-value store, waits a few seconds for the other ranks' posts, and names the ranks
# that posted nothing: those were not waiting on an exchange when the others gave up.
STALL_REPORT_S = 5.0


def silent_ranks(me: int, mesh, wait_s: float = STALL_REPORT_S) -> list[int]:
    """The ranks of the world that did not post a failed exchange on `mesh` within `wait_s`
    seconds of this rank's post (see [Note: naming the stalled rank]); [] if the store is gone."""
    try:
        tag = mesh.name  # (only here: it reads torch's private group names, so a failure path pays for it)
        store = dist.distributed_c10d._get_default_store()
        store.set(f"moedit/{tag}/failed/{me}", "1")
        others = [r for r in range(dist.get_world_size()) if r != me]
        deadline = time.monotonic() + wait_s
        while True:
            silent = [r for r in others if not store.check([f"moedit/{tag}/failed/{r}"])]
            if not silent or time.monotonic() > deadline:
                return silent
            time.sleep(0.1)
    except (RuntimeError, ValueError, AttributeError):  # no store (a closed group, a dead launcher)
        return []


def pick_backend(requested: str) -> str:
    """The backend a runtime of a plan with `runtime.backend: requested` runs on.

    A default process group that already exists decides it (moedit joins that group rather
    than creating one, see `init_process_group`): "auto" takes its backend, and an explicit
    request that contradicts it is refused, since tensors placed for the other backend would
    fail in the first collective. Without a group, "auto" is NCCL when CUDA is available.
    """
    existing = default_group_backend()
    if existing is not None:
        if requested not in ("auto", existing):
            raise ValueError(f"runtime.backend is {requested!r} but the default process group already exists with "
                             f"{existing}; set runtime.backend to {existing!r} or 'auto', or create the group with "
                             f"{requested}")
        return existing
    if requested == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if requested == "nccl" and not torch.cuda.is_available():
        raise ValueError("runtime.backend is 'nccl' but CUDA is not available; use 'gloo' or 'auto'")
    return requested


def expected_backend(requested: str) -> str:
    """The backend `pick_backend` will choose when the runtime starts, as far as it can be told
    now, without its errors (a plan may be compiled where it will not run)."""
    try:
        return pick_backend(requested)
    except ValueError:
        return requested


def default_group_backend() -> str | None:
    """"nccl" or "gloo": the backend of the existing default process group (None if there is none).
    A group with a backend per device type ("cpu:gloo,cuda:nccl") runs moedit's CUDA tensors on
    NCCL, so it counts as NCCL."""
    if not dist.is_initialized():
        return None
    name = str(dist.get_backend()).lower()
    for backend in ("nccl", "gloo"):
        if backend in name:
            return backend
    raise ValueError(f"runtime.backend: the default process group uses {name!r}; moedit runs on gloo or nccl, so "
                     "create the group with one of them")


def init_process_group(backend: str, timeout_s: float, world_size: int) -> None:
    """Join the default process group: the existing one, torchrun's, or a one-rank group.

    A default group moedit creates lives until the process exits (it is destroyed then):
    runtimes come and go inside it, and torch cannot re-create it reliably once destroyed
    (ranks then disagree about the store's keys and hang in their next collective).
    """
    if dist.is_initialized():
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        try:
            dist.init_process_group(backend=backend, timeout=timeout)
        except RuntimeError as err:  # DistStoreError: a rank never came to the rendezvous
            missing = re.search(r"keys: \S*/(\d+)\s*$", str(err).splitlines()[0])
            who = f"rank {missing.group(1)} did not join" if missing else "not every rank joined"
            raise CollectiveError(
                f"rank {os.environ['RANK']}: the process group of {os.environ['WORLD_SIZE']} ranks did not form "
                f"within runtime.timeout_s = {timeout_s:g} s: {who} (it stalled or failed before joining; look for "
                f"its error first). Backend said: {str(err).splitlines()[0]}") from None
    elif world_size == 1:
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    else:
        raise PlanError(
            f"this plan needs {world_size} ranks but no process group exists; launch with "
            f"`torchrun --nproc_per_node={world_size} ...` or call torch.distributed.init_process_group first"
        )
    atexit.register(_destroy_default_group)
    log.info("rank %d/%d joined the %s process group", dist.get_rank(), dist.get_world_size(), backend)


def _destroy_default_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def device_for(backend: str) -> torch.device:
    """This rank's device: `cuda:LOCAL_RANK` under NCCL, else the CPU."""
    if backend == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
    return torch.device("cpu")
