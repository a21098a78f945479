"""Time of one sampling step: the eager single-device model, then moedit's synchronous
expert-parallel plan at each world size, each run through `torchrun -m moedit.run`.

    python benchmarks/step_time.py [--model digits] [--worlds 1 2] [--steps 10] [--images 20] [--save]

Every rank gets cpu_count // world threads. The median step after the first is reported.
Prints a table; with --save writes benchmarks/results/step_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from moedit.runtime.sampling import initial_noise, rectified_flow_sample
from moedit.models import load_model

from _launch import machine, run_plan

RUN_TIME = "about 30 s on a 2-core CPU with the defaults"

def eager(args) -> dict:
    torch.set_num_threads(os.cpu_count())
    model = load_model(args.model)
    cfg = model.config
    labels = torch.arange(args.images) % cfg.num_classes
    times, last = [], time.perf_counter()

    def on_step(_i, _z):
        nonlocal last
        now = time.perf_counter()
        times.append(now - last)
        last = now

    rectified_flow_sample(model, initial_noise(args.images, cfg.in_channels, cfg.input_size, 0), labels,
                          steps=args.steps, cfg_scale=args.cfg_scale, null_class=cfg.num_classes, on_step=on_step)
    return {"run": "eager, 1 process", "world_size": 1, "threads_per_rank": os.cpu_count(), "step_s": times}


def moedit_run(args, world: int) -> dict:
    result = run_plan({"expert_parallel": {"degree": world}}, world, model=args.model, steps=args.steps,
                      images=args.images, cfg_scale=args.cfg_scale, verbose=args.verbose)
    return {"run": f"moedit sync_ep, {world} rank(s)", "world_size": world,
            "threads_per_rank": result["threads_per_rank"], "step_s": result["step_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits")
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--save", action="store_true", help="write the rows as JSON to --out")
    parser.add_argument("--out", default="benchmarks/results/step_time.json", help="where --save writes")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    print(f"expected run time: {RUN_TIME}", flush=True)
    rows = [eager(args)] + [moedit_run(args, world) for world in args.worlds]
    for row in rows:
        row["median_step_ms"] = 1e3 * statistics.median(row["step_s"][1:] or row["step_s"])
    print(f"model {args.model}, {args.images} images with CFG, {args.steps} steps; {machine()}")
    print(f"{'run':<28}{'threads/rank':>14}{'median step ms':>16}")
    for row in rows:
        print(f"{row['run']:<28}{row['threads_per_rank']:>14}{row['median_step_ms']:>16.1f}")
    if not args.save:
        return
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine(), "model": args.model, "images": args.images, "steps": args.steps,
                   "cfg_scale": args.cfg_scale, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
