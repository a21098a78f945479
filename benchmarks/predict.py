"""Predicted against measured: the simulator's step time for every plan, beside the step
time the same plan measures, on loopback or over the shaped link, at 2 and 4 ranks.

    python benchmarks/predict.py [--link loopback|shaped] [--worlds 2 4] [--rounds 3]
                                 [--plans single sync_ep ...] [--timeline DIR] [--save]

The prediction uses the `cpu-local` profile (`--link shaped`: `shaped-link`) that
`moedit calibrate` measured on this machine (run first, and cached; `--recalibrate` measures
again). Measured: the plans alternate within each of `--rounds` rounds, digits model, 20
images with CFG, 20 steps; median [min-max] over rounds of the mean step, first step left
out. The `single` plan (no expert parallelism) runs on one rank. Prints a table; with --save
writes benchmarks/results/predict_<link>.json; with --timeline, for each world size the measured
(profiled, last round) and the predicted timeline of `sync_ep` and `dice` as PNGs under
DIR/<link>_w<ranks>_<plan>/ (timeline.png, predicted.png).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

import moedit
from _launch import machine, made, plan_of, run_plan, shaped_link, show, spread
from moedit.models import load_model
from moedit.planner.costs import Hardware, HardwareError
from moedit.planner.simulate import replay, simulate
from moedit.runtime.timeline import draw

PLANS = ["single", "sync_ep", "sync_ep_chunked", "displaced", "interweaved", "dice"]
PICTURED = ("sync_ep", "dice")
RUN_TIME = "about 6 min on a 2-core CPU with the defaults, plus `moedit calibrate` when no profile is cached"


def predict(name: str, world: int, hardware: Hardware, images: int, steps: int):
    compiled = moedit.compile(load_model("digits"), moedit.Plan(**plan_of(name, world)))
    return simulate(replay(compiled, 2 * images), hardware, steps=steps)


def world_of(name: str, world: int) -> int:
    return 1 if name == "single" else world


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link", choices=["loopback", "shaped"], default="loopback")
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--plans", nargs="+", default=PLANS)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--recalibrate", action="store_true")
    parser.add_argument("--timeline", help="folder for measured and predicted timeline PNGs")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/predict_<link>.json")
    args = parser.parse_args()
    print(f"expected run time: {RUN_TIME}", flush=True)
    profile = "shaped-link" if args.link == "shaped" else "cpu-local"
    link = shaped_link(args.link, "predict.py")
    try:
        hardware = None if args.recalibrate else Hardware.load(profile)
    except HardwareError:
        hardware = None
    if hardware is None:
        from moedit.planner.calibrate import calibrate

        hardware = calibrate(args.link)
    print(f"profile {profile}: {hardware.source}", flush=True)
    rows = []
    with made(link, "predict.py"):
        for world in args.worlds:
            names = [n for n in args.plans if n != "single" or world == args.worlds[0]]
            measured = {name: [] for name in names}
            for round_index in range(args.rounds):
                last = round_index == args.rounds - 1
                for name in names:
                    w = world_of(name, world)
                    folder = (os.path.join(args.timeline, f"{args.link}_w{w}_{name}")
                              if args.timeline and last and name in PICTURED else None)
                    result = run_plan(plan_of(name, w), w, steps=args.steps, images=args.images,
                                      link=link if w > 1 else None, name=name, timeline=folder)
                    if folder:  # keep the picture; the trace is megabytes
                        os.remove(os.path.join(folder, "timeline.json"))
                    step, blocked = (statistics.mean(result[k][1:]) for k in ("step_s", "blocked_s"))
                    measured[name].append((step, blocked))
                    print(f"  {w} rank(s), round {round_index + 1}, {name}: {1e3 * step:.1f} ms/step", flush=True)
            for name in names:
                w = world_of(name, world)
                prediction = predict(name, w, hardware, args.images, args.steps)
                steps_ms = [1e3 * s for s, _ in measured[name]]
                row = {"plan": name, "world": w, "measured_ms": spread(steps_ms),
                       "measured_blocked_ms": spread([1e3 * b for _, b in measured[name]]),
                       "predicted_ms": 1e3 * prediction.mean_step_s,
                       "predicted_blocked_ms": 1e3 * prediction.exposed_comm_s,
                       "predicted_peak_mb": prediction.peak_bytes / 1e6}
                row["error"] = row["predicted_ms"] / row["measured_ms"]["median"] - 1
                rows.append(row)
                if args.timeline and name in PICTURED:
                    draw(prediction.spans, os.path.join(args.timeline, f"{args.link}_w{w}_{name}", "predicted.png"),
                         steps=range(1, 3), title=f"{name}, {w} ranks, {args.link}: predicted ({profile})")
    where = link.describe() if link is not None else "loopback"
    print(f"\ndigits model, {args.images} images with CFG, {args.steps} steps, {args.rounds} alternating rounds; "
          f"{where}; {machine()}; predicted with {profile}")
    print(f"{'plan':<18}{'ranks':>6}{'measured ms':>22}{'predicted ms':>14}{'error':>8}{'blocked ms':>20}"
          f"{'predicted':>11}")
    for row in rows:
        print(f"{row['plan']:<18}{row['world']:>6}{show(row['measured_ms']):>22}{row['predicted_ms']:>14.1f}"
              f"{row['error']:>+8.0%}{show(row['measured_blocked_ms']):>20}{row['predicted_blocked_ms']:>11.1f}")
    worst = max(abs(r["error"]) for r in rows)
    print(f"largest error: {worst:.0%}")
    if not args.save:
        return 0
    out = f"benchmarks/results/predict_{args.link}.json"
    with open(out, "w") as f:
        json.dump({"machine": machine(), "link": where, "profile": hardware.model_dump(), "images": args.images,
                   "steps": args.steps, "rounds": args.rounds, "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
