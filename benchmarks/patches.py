"""xDiT's stale parallelism measured: DistriFusion-style patch parallelism and PipeFusion,
beside plain expert parallelism and the exact token split (Ulysses).

    python benchmarks/patches.py [--link loopback|shaped] [--rounds 3] [--save]

The digits model, 20 images with CFG, 20 steps, at 2 and 4 CPU ranks (expected run time:
~8 min on loopback, ~10 min over the shaped link, 2 CPUs). Per plan: step time and time
blocked on exchanges per step (exposed communication), median [min-max] over rounds in which
the plans alternate; bytes sent per step by rank 0; the K/V buffers rank 0 held at their
peak (the step cache; for the other plans, DICE's caches if any: none here); and the
activation of one patch (or token piece) a block works on, per rank, computed from the shapes.

Prints the table; with --save writes benchmarks/results/patches_<link>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import moedit
from _launch import machine, made, plan_of, run_plan, shaped_link, show, spread
from moedit.models import load_model

PLANS = {  # world -> plan specs (examples/plans/<name>.yaml, @ sets fields; the EP degree is the world size)
    2: ["sync_ep", "ulysses", "patch_parallel", "pipefusion@expert_parallel.degree=1"],
    4: ["sync_ep", "ulysses@sequence_parallel.ulysses=4", "patch_parallel@patch_parallel.degree=4",
        "pipefusion@pipefusion.degree=4,expert_parallel.degree=1", "pipefusion@expert_parallel.degree=2"],
}
IMAGES, STEPS = 20, 20
RUN_TIME = "about 8 min on loopback, 10 min over the shaped link, on a 2-core CPU"


def activation_bytes(plan: moedit.Plan, config) -> int:
    """Bytes of the [B, n, H] activation one block works on at a time, per rank."""
    mesh, tokens = plan.mesh, (config.input_size // config.patch_size) ** 2
    samples = -(-2 * IMAGES // mesh.data)  # with CFG
    pieces = max(mesh.patch, mesh.ring * mesh.ulysses, plan.pipefusion.num_patches if mesh.pipefusion > 1 else 1)
    return samples * -(-tokens // pieces) * config.hidden_size * 4


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link", choices=["loopback", "shaped"], default="loopback")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/patches_<link>.json")
    args = parser.parse_args()
    print(f"expected run time: {RUN_TIME}", flush=True)
    link = shaped_link(args.link, "patches.py")
    config = load_model("digits").config
    runs = {(world, spec): [] for world, specs in PLANS.items() for spec in specs}
    with made(link, "patches.py"):
        description = link.describe() if link is not None else "loopback"
        for round_index in range(args.rounds):
            for world, spec in runs:
                result = run_plan(plan_of(spec, world), world, link=link, name=spec, steps=STEPS, images=IMAGES)
                steps = slice(1, None)  # the first step is synchronous for every plan here; it also warms up
                runs[world, spec].append({key: statistics.mean(result[key][steps])
                                          for key in ("step_s", "blocked_s", "sent_bytes")}
                                         | {"cache_peak_bytes": result["cache_peak_bytes"],
                                            "programs": result["programs"]})
                print(f"  {world} ranks, round {round_index + 1}, {spec}: "
                      f"{1e3 * runs[world, spec][-1]['step_s']:.1f} ms/step", flush=True)
    rows = []
    for (world, spec), measured in runs.items():
        plan = moedit.Plan(**plan_of(spec, world))
        rows.append({"plan": spec, "world": world, "mesh": plan.mesh.describe(),
                     "step_ms": spread([1e3 * m["step_s"] for m in measured]),
                     "blocked_ms": spread([1e3 * m["blocked_s"] for m in measured]),
                     "sent_mb": statistics.median(m["sent_bytes"] for m in measured) / 2**20,
                     "kv_buffer_mb": measured[0]["cache_peak_bytes"] / 2**20,
                     "activation_mb": activation_bytes(plan, config) / 2**20,
                     "programs": measured[0]["programs"]})
    for row in rows:
        base = next(r for r in rows if r["world"] == row["world"] and r["plan"] == "sync_ep")
        row["speedup"] = spread([b / s for b, s in zip(base["step_ms"]["all"], row["step_ms"]["all"])])
    print(f"\n{description}; {machine()}; {args.rounds} alternating rounds; digits model, {IMAGES} images with CFG, "
          f"{STEPS} steps; steps 2-{STEPS} (step 1 is synchronous everywhere)")
    print(f"{'plan':<54}{'ranks':>6}{'step ms':>22}{'blocked ms':>20}{'speed-up':>20}{'sent MB':>9}{'K/V MB':>8}"
          f"{'act. MB':>9}")
    for r in rows:
        print(f"{r['plan']:<54}{r['world']:>6}{show(r['step_ms']):>22}{show(r['blocked_ms']):>20}"
              f"{show(r['speedup'], '{:.2f}'):>20}{r['sent_mb']:>9.2f}{r['kv_buffer_mb']:>8.2f}"
              f"{r['activation_mb']:>9.3f}")
    if args.save:
        out = f"benchmarks/results/patches_{args.link}.json"
        with open(out, "w") as f:
            json.dump({"machine": machine(), "link": description, "rounds": args.rounds, "images": IMAGES,
                       "steps": STEPS, "rows": rows}, f, indent=1)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
