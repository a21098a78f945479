"""Measure a link with gloo all-to-alls; run under torchrun (any number of ranks):

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m moedit.runtime.probe 262144

Rank 0 prints one JSON line, with `size` the bytes each rank sends to each other rank:

    latency_s        an all-to-all of a few bytes
    loaded_latency_s what one adds to ranks that compute `computed_between_s` between
                     exchanges (more ranks than cores: the OS runs them in turn, and
                     each exchange waits for the one it ran last)
    long_loaded_latency_s, computed_long_s
                     the same with ten times the compute between exchanges (the wait
                     grows about as the square root of the compute)
    issue_s          what starting one (async) costs the calling thread
    bytes_per_s      bytes a rank sends per second in a stream of all-to-alls of `size`,
                     back to back (what a busy, overlapped step gets)
    isolated_s       one all-to-all of `burst` bytes per peer after 30 ms of quiet (a token
                     bucket of a few hundred KB at tens of MB/s has refilled; a longer
                     quiet spell would also restart TCP's slow start), its latency included
    burst            that size

`moedit calibrate` reads these; `benchmarks/` reports them beside their tables.
"""

import datetime
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist


def _timed(out, rows, count: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    works = [dist.all_to_all_single(out, rows, async_op=True) for _ in range(count)]
    for work in works:
        work.wait()
    elapsed = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


def _loaded_latency(out, rows, count: int = 30, matmuls: int = 8) -> tuple[float, float]:
    """What a small all-to-all adds to a loop that computes `matmuls` small matmuls (8: 2-7 ms)
    between exchanges: with more ranks than cores, each exchange also waits for the rank the
    OS ran last."""
    a = torch.randn(192, 192)

    def work():
        for _ in range(matmuls):
            a @ a

    dist.barrier()
    start = time.perf_counter()
    for _ in range(count):
        work()
    alone = time.perf_counter() - start
    dist.barrier()
    start = time.perf_counter()
    for _ in range(count):
        work()
        dist.all_to_all_single(out, rows)
    synced = torch.tensor([time.perf_counter() - start - alone, alone])
    dist.all_reduce(synced, op=dist.ReduceOp.MAX)
    return max(0.0, synced[0].item() / count), synced[1].item() / count


def measure(size: int, burst: int) -> dict:
    world = dist.get_world_size()
    tiny, tiny_out = torch.ones(world), torch.empty(world)
    for _ in range(5):
        dist.all_to_all_single(tiny_out, tiny)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(50):  # one at a time: each waits for the last
        dist.all_to_all_single(tiny_out, tiny)
    latency = (time.perf_counter() - start) / 50
    loaded, between = _loaded_latency(tiny_out, tiny)
    long_loaded, long_between = _loaded_latency(tiny_out, tiny, count=10, matmuls=80)
    dist.barrier()
    issue = time.perf_counter()
    works = [dist.all_to_all_single(tiny_out, tiny, async_op=True) for _ in range(50)]
    issue = (time.perf_counter() - issue) / 50  # what starting one costs the caller
    for work in works:
        work.wait()
    rows = torch.ones(world * size // 4)
    out = torch.empty_like(rows)
    one = _timed(out, rows, 3) / 3
    count = max(8, min(400, int(1.5 / max(one, 1e-6))))  # about 1.5 s of streaming
    stream = _timed(out, rows, count)
    burst_rows = torch.ones(world * burst // 4)
    burst_out = torch.empty_like(burst_rows)
    isolated = []
    for _ in range(5):
        time.sleep(0.03)
        isolated.append(_timed(burst_out, burst_rows, 1))
    return {"world": world, "size": size, "latency_s": latency, "loaded_latency_s": loaded,
            "computed_between_s": between, "long_loaded_latency_s": long_loaded, "computed_long_s": long_between,
            "issue_s": issue, "bytes_per_s": count * size * (world - 1) / stream,
            "burst": burst, "isolated_s": statistics.median(isolated)}


def main() -> None:
    size = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 20
    burst = int(sys.argv[2]) if len(sys.argv) > 2 else size
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    result = measure(size, burst)
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
