"""Expert offloading against all experts resident, on one rank: step time, device memory, copies.

    python benchmarks/offload.py [--model S/2-8E2A] [--resident 16 32 64] [--batch 8] [--steps 10] [--save]

An ScMoE of a reference size (random weights: routing, not quality, matters here) runs
`--steps` model evaluations on one rank, under the shortcut schedule, with all routed
experts resident and with `offload.resident_experts` set to each `--resident`. Per row:
mean ms per evaluation (the first left out), the device's peak allocated memory (CUDA
only: on the CPU host and device memory are one, so nothing is saved and the column says
n/a), the routed experts' resident bytes at peak, and the expert copies and cache hits
per evaluation. A GPU run takes about a minute for S/2; on the 2-core CPU, S/2 takes about
two minutes. With --save, writes benchmarks/results/offload_<device>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time

import torch

import moedit
from moedit.models.scmoe import scmoe

from _launch import machine

RUN_TIME = "about 2 min on a 2-core CPU for S/2 with the defaults (about 1 min on a GPU)"

def measure(model, plan: dict, batch: int, steps: int, device: torch.device) -> dict:
    model = copy.deepcopy(model)  # the runtime moves what it holds to the device: start each row on the host
    compiled = moedit.compile(model, moedit.Plan(**plan))
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size, generator=gen)
    t, y = torch.rand(batch, generator=gen), torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    with compiled.to_runtime(device=device) as runtime, torch.no_grad():
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            runtime.denoise(x, t, y)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        store = runtime.state.experts
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        row = {"ms": 1e3 * statistics.mean(times[1:]), "peak_mb": None if peak is None else peak / 2**20}
        if store is not None:
            row.update(resident_mb=store.peak_resident * store.bytes_per_expert / 2**20,
                       copies_per_step=store.copies / steps, hits_per_step=store.hits / steps)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="S/2-8E2A")
    parser.add_argument("--resident", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/offload_<device>.json")
    args = parser.parse_args()
    print(f"expected run time: {RUN_TIME}", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = scmoe(args.model)
    for param in model.parameters():  # adaLN-Zero's zeros would make every block the identity
        torch.nn.init.normal_(param, std=param.shape[-1] ** -0.5 if param.dim() > 1 else 0.02)
    experts = sum(p.numel() * p.element_size() for b in model.blocks for p in b.moe.experts.parameters())
    base = {"shortcut": {"enabled": True}}
    rows = {"all resident": measure(model, base, args.batch, args.steps, device)}
    rows["all resident"]["resident_mb"] = experts / 2**20
    for resident in args.resident:
        plan = {**base, "offload": {"enabled": True, "resident_experts": resident}}
        rows[f"offload, {resident} resident"] = measure(model, plan, args.batch, args.steps, device)
    print(f"\nScMoE {args.model} (random weights), 1 rank, batch {args.batch}, {args.steps} evaluations; "
          f"{device}; {machine()}")
    print(f"{'plan':<24}{'ms/eval':>10}{'peak MiB':>10}{'experts MiB':>13}{'copies':>8}{'hits':>8}")
    for name, row in rows.items():
        peak = "n/a" if row["peak_mb"] is None else f"{row['peak_mb']:.0f}"
        print(f"{name:<24}{row['ms']:>10.1f}{peak:>10}{row['resident_mb']:>13.1f}"
              f"{row.get('copies_per_step', 0):>8.1f}{row.get('hits_per_step', 0):>8.1f}")
    if args.save:
        out = f"benchmarks/results/offload_{device.type}.json"
        with open(out, "w") as f:
            json.dump({"machine": machine(), "device": str(device), "model": args.model, "batch": args.batch,
                       "steps": args.steps, "rows": rows}, f, indent=1)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
