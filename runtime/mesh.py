"""The device mesh: process groups for the plan's mesh axes, several per axis.

The plan's `MeshLayout` (moedit/plan.py) says which ranks share a group along each axis:
"data", "cfg", "ring", "ulysses", "sp" (ring x ulysses), "ep" and "world". An axis gets
one communicator per *channel* the programs use on it, all over the same ranks: "main"
for exchanges consumed within the step, "stale" for the stale layers' dispatches and
combines, "counts" for their token counts (see [Note: channels]). Only the communicators
some program (or the runtime itself) uses are created. Every group carries the plan's
timeout, so every collective fails after it instead of hanging.

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

import torch.distributed as dist


class Mesh:
    """This rank's communicators: `group(axis, channel)`."""

    def __init__(self, layout, communicators, backend: str, timeout_s: float):
        """`layout`: the plan's MeshLayout; `communicators`: the (axis, channel) pairs to create."""
        world = dist.get_world_size()
        if layout.world != world:
            raise ValueError(f"the mesh {layout.describe()} needs {layout.world} ranks, not the world size {world}")
        self.layout = layout
        self._groups: dict[tuple[str, str], dist.ProcessGroup] = {}
        timeout = datetime.timedelta(seconds=timeout_s)
        for axis, channel in sorted(set(communicators)):  # every rank creates every group, in one order
            mine, _ = dist.new_subgroups_by_enumeration(layout.groups(axis), timeout=timeout, backend=backend)
            self._groups[axis, channel] = mine
        groups = list(self._groups.values())
        if len({id(g) for g in groups}) != len(groups) or dist.group.WORLD in groups:
            raise RuntimeError("the device mesh did not create a process group of its own for every axis and "
                               "channel; closing it would destroy groups that others use")

    @property
    def name(self) -> str:
        """A name every rank gives this mesh alike (torch names groups in the order ranks create them)."""
        return "-".join(dist.distributed_c10d._get_process_group_name(g) for g in self._groups.values())

    @property
    def channels(self) -> list[str]:
        return sorted({channel for _, channel in self._groups})

    def group(self, axis: str, channel: str) -> dist.ProcessGroup:
        if (axis, channel) not in self._groups:
            raise RuntimeError(f"no communicator for mesh axis {axis!r}, channel {channel!r} (this mesh has: "
                               f"{sorted(self._groups)})")
        return self._groups[axis, channel]

    def close(self) -> None:
        """Destroy this mesh's groups (not the default group)."""
        if dist.is_initialized():
            for group in self._groups.values():
                dist.destroy_process_group(group)
        self._groups = {}
