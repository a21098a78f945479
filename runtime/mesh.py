"""The device mesh: process groups for the plan's named axes, several per axis.

World size is the product of the axes the plan uses ("ep" so far; the xDiT axes "cfg",
"ulysses", "ring", "pipefusion" and "patch" join it). Each axis gets one communicator per
*channel* the programs use, all over the same ranks: "main" for exchanges consumed within
the step, "stale" for the stale layers' dispatches and combines, "counts" for their token
counts (see [Note: channels]). Each channel is a torch `DeviceMesh` whose groups
carry the plan's timeout, so every collective fails after it instead of hanging.

[Note: channels]
Collectives on one process group complete in the order they were issued. A stale
exchange stays in flight for most of a step, so a synchronous layer's exchange issued
behind it on the same group would wait for it, and the overlap would only move the
waiting elsewhere: stale exchanges run on a group of their own. Within stale traffic, a
stale layer waits for its token counts inside its own slot, and on the stale group they
would queue behind every dispatch and combine still in flight: the counts get a group too.
Dispatches and combines were also tried on separate groups, so that one could not hold
up the other; over the shaped 400 Mbit/s link (benchmarks/overlap.py) that was slower
(displaced 93 ms a step against 81-90): two transfers sharing the link both land late,
where one after the other the first lands early. The ranks agree on the order of the
exchanges within each group (`collective_order`).
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
    """This rank's communicators: `group(axis, channel)`."""

    def __init__(self, axes: dict[str, int], channels, backend: str, timeout_s: float, device_type: str):
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

        self._meshes: dict[str, DeviceMesh] = {channel: build() for channel in sorted(set(channels))}
        groups = [mesh.get_group(axis) for mesh in self._meshes.values() for axis in names]
        if len({id(g) for g in groups}) != len(groups) or dist.group.WORLD in groups:
            raise RuntimeError("the device mesh did not create a process group of its own for every axis and "
                               "channel; closing it would destroy groups that others use")

    @property
    def channels(self) -> list[str]:
        return list(self._meshes)

    def group(self, axis: str, channel: str) -> dist.ProcessGroup:
        if channel not in self._meshes or axis not in self.axes:
            raise RuntimeError(f"no communicator for mesh axis {axis!r}, channel {channel!r} (axes: "
                               f"{sorted(self.axes)}, channels: {self.channels})")
        return self._meshes[channel].get_group(axis)

    def close(self) -> None:
        """Destroy this mesh's groups (not the default group)."""
        if dist.is_initialized():
            for mesh in self._meshes.values():
                for axis in self.axes:
                    dist.destroy_process_group(mesh.get_group(axis))
        self._meshes = {}
