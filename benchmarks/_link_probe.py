"""Run under torchrun (2 ranks): how fast a stream of all-to-alls of one size moves over
the link, back to back, as an overlapped step would keep it busy. Rank 0 prints
`{"bytes_per_s": ..., "latency_s": ...}` (bytes sent to the other rank per second)."""

import json
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    size = int(sys.argv[1])  # bytes per exchange to the other rank
    dist.init_process_group("gloo")
    rows = torch.ones(2 * size // 4)
    out = torch.empty_like(rows)
    tiny, tiny_out = torch.ones(2), torch.empty(2)
    for _ in range(3):
        dist.all_to_all_single(out, rows)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(20):
        dist.all_to_all_single(tiny_out, tiny)
    latency = (time.perf_counter() - start) / 20
    start = time.perf_counter()
    for _ in range(4):
        dist.all_to_all_single(out, rows)
    one = torch.tensor([(time.perf_counter() - start) / 4])
    dist.all_reduce(one, op=dist.ReduceOp.MAX)  # every rank must issue the same number of exchanges
    count = max(8, min(400, int(1.5 / one.item())))
    dist.barrier()
    start = time.perf_counter()
    works = [dist.all_to_all_single(out, rows, async_op=True) for _ in range(count)]
    for work in works:
        work.wait()
    elapsed = time.perf_counter() - start
    if dist.get_rank() == 0:
        print(json.dumps({"bytes_per_s": count * size / elapsed, "latency_s": latency}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
