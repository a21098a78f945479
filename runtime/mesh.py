"""The device mesh: process groups for the plan's named axes.

World size is the product of the axes the plan uses ("ep" so far; the xDiT axes "cfg",
"ulysses", "ring", "pipefusion" and "patch" join it). Each axis gets two communicators over
the same ranks: one for exchanges consumed within the step, and one for stale exchanges
(see [Note: a communicator for stale exchanges]). Both are torch `DeviceMesh`es whose
groups carry the plan's timeout, so every collective fails after it instead of hanging.

[Note: a communicator for stale exchanges]
Collectives on one process group complete in the order they were issued. A stale
exchange stays in flight for most of a step, so a synchronous layer's exchange issued
behind it on the same group would wait for it, and the overlap would only move the
waiting elsewhere. Stale exchanges therefore run on a second group over the same ranks.
"""

from __future__ import annotations

import datetime
import math

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def _backend_config(backend: str, timeout_s: float):
    """(backend, options) with the timeout set; DeviceMesh would otherwise reuse the default
    group, whose timeout the caller chose, for an axis that spans the world."""
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
    else:
        options = dist.ProcessGroupGloo._Options()
    options._timeout = datetime.timedelta(seconds=timeout_s)
    return backend, options


class Mesh:
    """This rank's communicators: `group(axis)` and `group(axis, stale=True)`."""

    def __init__(self, axes: dict[str, int], backend: str, timeout_s: float, device_type: str, stale: bool):
        world = dist.get_world_size()
        if math.prod(axes.values()) != world:
            raise ValueError(f"mesh axes {axes} multiply to {math.prod(axes.values())}, not the world size {world}")
        self.axes = dict(axes)
        names, shape = tuple(axes), tuple(axes.values())

        def build() -> DeviceMesh:
            # Fresh options for every mesh: given an options object that had already made a
            # group, torch 2.13 handed back the default group instead of a new one.
            override = {name: _backend_config(backend, timeout_s) for name in names}
            return init_device_mesh(device_type, shape, mesh_dim_names=names, backend_override=override)

        self._meshes = {False: build(), True: build() if stale else None}
        groups = [self.group(axis, stale) for stale in (False, True) if self._meshes[stale] for axis in names]
        if len({id(g) for g in groups}) != len(groups) or dist.group.WORLD in groups:
            raise RuntimeError("the device mesh did not create a process group of its own for every axis and "
                               "communicator; closing it would destroy groups that others use")

    def group(self, axis: str, stale: bool = False) -> dist.ProcessGroup:
        mesh = self._meshes[stale]
        if mesh is None or axis not in self.axes:
            raise RuntimeError(f"no {'stale ' if stale else ''}communicator for mesh axis {axis!r} "
                               f"(axes: {sorted(self.axes)})")
        return mesh.get_group(axis)

    def close(self) -> None:
        """Destroy this mesh's groups (not the default group)."""
        if not dist.is_initialized():
            return
        for mesh in self._meshes.values():
            if mesh is not None:
                for axis in self.axes:
                    dist.destroy_process_group(mesh.get_group(axis))
        self._meshes = {False: None, True: None}
