"""ScMoE's shortcut schedule against the standard model's plans, on loopback or a slow link.

    python benchmarks/scmoe.py [--link loopback|shaped] [--rounds 3] [--steps 20] [--images 20] [--save]

Takes about 4 minutes on loopback and 6 over the shaped link (2 CPU cores, 3 rounds).
Rows (model: plan), all on 2 ranks, run in `--rounds` rounds that alternate the rows, one
seed:

    digits: sync_ep, dice                 the standard model (top-2, MoE reads its own block)
    digits-scmoe: sync_ep                 ScMoE, exchanges where the traced model has them
    digits-scmoe: scmoe                   ScMoE under the shortcut schedule (estimated costs)
    digits-scmoe: scmoe, measured costs   the same, costs from a timeline of the row above
                                          (made once before the rounds)

Per row, over rounds (median [min-max]): step ms (the first step left out), blocked ms (rank
0 waiting for exchanges), of which on the MoE branch's dispatch and combine and on the token
counts (which also absorb the ranks' skew: the counts are each layer's first meeting
point), speed-up over its model's sync_ep row (per round), and hidden: the share of the
dispatch and combine waiting of the model's sync_ep row that the plan no longer waits
for. "comm/compute" (sync_ep rows): dispatch and combine waiting / (step - blocked), the
communication against the compute; ScMoE's regime is at most 0.5.

`--link shaped` runs the ranks in two network namespaces joined by a 400 Mbit/s veth pair
(see moedit/runtime/netns.py; needs root, else exit status 2). Prints a table; with --save
writes benchmarks/results/scmoe_<link>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

from _launch import machine, made, plan_of, run_plan, shaped_link, show, spread

RUN_TIME = "about 4 min on loopback, 6 min over the shaped link, on a 2-core CPU with 3 rounds"
ROWS = [("digits", "sync_ep"), ("digits", "dice"), ("digits-scmoe", "sync_ep"), ("digits-scmoe", "scmoe"),
        ("digits-scmoe", "scmoe@schedule.profile=PROFILE")]


def label(model: str, spec: str) -> str:
    return f"{model}: {spec.replace('@schedule.profile=PROFILE', ', measured costs')}"


def measure(args, link, profile: str) -> list[dict]:
    runs = {row: [] for row in ROWS}
    for round_index in range(args.rounds):
        for model, spec in ROWS:
            result = run_plan(plan_of(spec, 2, profile), 2, model=model, steps=args.steps, images=args.images,
                              link=link, name=spec)
            step, blocked = (statistics.mean(result[key][1:]) for key in ("step_s", "blocked_s"))
            by_name = result["blocked_by_exchange_s"][1:]
            branch, counts = (statistics.mean(sum(step.get(n, 0.0) for n in names) for step in by_name)
                              for names in (("dispatch", "combine"), ("counts",)))
            runs[model, spec].append({"step": step, "blocked": blocked, "branch": branch, "counts": counts})
            print(f"  round {round_index + 1}, {label(model, spec)}: {1e3 * step:.1f} ms/step, "
                  f"{1e3 * blocked:.1f} ms blocked ({1e3 * branch:.1f} on dispatch and combine, {1e3 * counts:.1f} "
                  "on counts)", flush=True)
    rows = []
    for model, spec in ROWS:
        base, mine = runs[model, "sync_ep"], runs[model, spec]
        row = {"row": label(model, spec), "model": model, "plan": spec,
               "step_ms": spread([1e3 * r["step"] for r in mine]),
               "blocked_ms": spread([1e3 * r["blocked"] for r in mine]),
               "branch_ms": spread([1e3 * r["branch"] for r in mine]),
               "counts_ms": spread([1e3 * r["counts"] for r in mine]),
               "speedup": spread([b["step"] / r["step"] for b, r in zip(base, mine)]),
               "hidden": spread([1 - r["branch"] / b["branch"] for b, r in zip(base, mine)])}
        if spec == "sync_ep":
            row["comm_per_compute"] = spread([r["branch"] / (r["step"] - r["blocked"]) for r in mine])
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link", choices=["loopback", "shaped"], default="loopback")
    parser.add_argument("--rate", default="400mbit", help="shaped link: tbf rate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/scmoe_<link>.json")
    args = parser.parse_args()
    print(f"expected run time: {RUN_TIME}", flush=True)
    link = shaped_link(args.link, "scmoe.py", args.rate)
    folder = os.path.join("/tmp", f"moedit_scmoe_profile_{os.getpid()}")
    with made(link, "scmoe.py"):
        run_plan(plan_of("sync_ep", 2), 2, model="digits-scmoe", steps=args.steps, images=args.images, link=link,
                 timeline=folder)
        rows = measure(args, link, os.path.join(folder, "timeline.json"))
    where = link.describe() if link is not None else "loopback"
    print(f"\n2 ranks, {args.images} images with CFG, {args.steps} steps, {args.rounds} alternating rounds "
          f"(median [min-max]); {where}; {machine()}")
    print(f"{'row':<38}{'step ms':>22}{'blocked ms':>20}{'on disp.+comb.':>18}{'on counts':>17}{'speed-up':>20}"
          f"{'hidden':>8}{'comm/compute':>14}")
    for row in rows:
        ratio = f"{row['comm_per_compute']['median']:.2f}" if "comm_per_compute" in row else ""
        print(f"{row['row']:<38}{show(row['step_ms']):>22}{show(row['blocked_ms']):>20}{show(row['branch_ms']):>18}"
              f"{show(row['counts_ms']):>17}{show(row['speedup'], '{:.2f}'):>20}{row['hidden']['median']:>8.0%}"
              f"{ratio:>14}")
    if args.save:
        out = f"benchmarks/results/scmoe_{args.link}.json"
        with open(out, "w") as f:
            json.dump({"machine": machine(), "link": where, "images": args.images, "steps": args.steps,
                       "rounds": args.rounds, "rows": rows}, f, indent=1)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
