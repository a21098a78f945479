"""Run a function on N spawned CPU ranks joined by a gloo process group on 127.0.0.1.

Every rank's return value comes back to the test through torch.save. A rank that raises
brings the others down (torch.multiprocessing kills them) and the test sees its
traceback; ranks that hang are killed after `timeout_s` and the test fails.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, out_dir, timeout_s, init_group, fn, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    if init_group:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    try:
        torch.save(fn(rank, world, *args), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world: int, fn, *args, timeout_s: float = 120.0, collective_timeout_s: float = 60.0,
              init_group: bool = True) -> list:
    """Call `fn(rank, world, *args)` on `world` spawned ranks; return their results in rank order.
    With `init_group=False` the ranks get torchrun's environment but no process group, so the
    code under test creates it, as under torchrun."""
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world, free_port(), out_dir, collective_timeout_s, init_group, fn,
                                               args),
                                 nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for process in ctx.processes:
                    process.kill()
                raise TimeoutError(f"{world} ranks running {fn.__name__} did not finish in {timeout_s:.0f} s")
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world)]
