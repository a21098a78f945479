"""How much of the all-to-all time each plan hides, on loopback or over a real, slow link.

    python benchmarks/overlap.py [--link loopback|shaped] [--plans sync_ep displaced interweaved dice]
                                 [--rounds 3] [--steps 20] [--images 20] [--timeline DIR] [--profile DIR] [--save]

A plan is a file name in examples/plans/, optionally with settings:
"dice@expert_parallel.chunks=2,schedule.policy=overlap,schedule.profile=PROFILE" (PROFILE: the
timeline of a run of the first plan made first, with --profile).

`--link shaped` runs the two ranks in two network namespaces joined by a veth pair shaped
with tbf (400 Mbit/s by default; see moedit/runtime/netns.py): a real network between real
processes. It needs root; without it the benchmark says so and exits with status 2.

The plans run in `--rounds` rounds, alternating within each round, all with the same seed.
Per plan, over rounds (median [min-max]):

    step ms     mean wall time of a diffusion step, the first step left out
    blocked ms  of which rank 0 waited for an exchange
    sent MB     bytes rank 0's exchanges sent to the other rank, per step
    a2a share   blocked / step
    speed-up    the first plan's step time / this plan's, per round
    limit       for the first plan (synchronous): its step / max(compute, communication), with
                compute = step - blocked, and communication the larger of its blocked time and
                its bytes / the link's sustained rate (measured first, with back-to-back
                all-to-alls): a token-bucket link lets a synchronous plan's bursts through
                faster than a busy link moves them, so the blocked time alone understates what
                an overlapped plan must push through. "of limit" = speed-up / limit.

Prints a table; with --save writes benchmarks/results/overlap_<link>.json; with --timeline,
the Chrome trace and PNG of each plan's last round go under DIR/<plan>/.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys

from _launch import link_throughput, machine, made, plan_of, run_plan, shaped_link, show, spread

PLANS = ["sync_ep", "displaced", "interweaved", "dice"]
RUN_TIME = "about 2 min on a 2-core CPU with the defaults (about 10 s a plan a round)"


def measure(args, link, rate: float, profile: str | None) -> list[dict]:
    runs = {name: [] for name in args.plans}
    for round_index in range(args.rounds):
        for name in args.plans:
            plan = plan_of(name, args.world, profile)
            last = round_index == args.rounds - 1
            result = run_plan(plan, args.world, steps=args.steps, images=args.images, link=link, name=name,
                              timeline=os.path.join(args.timeline, re.sub(r"[^\w.=@,-]+", "_", name))
                              if args.timeline and last else None)
            step, blocked, sent = (statistics.mean(result[key][1:]) for key in ("step_s", "blocked_s", "sent_bytes"))
            runs[name].append({"step": step, "blocked": blocked, "sent": sent})
            print(f"  round {round_index + 1}, {name}: {1e3 * step:.1f} ms/step, {1e3 * blocked:.1f} ms blocked",
                  flush=True)
    base = runs[args.plans[0]]
    rows = []
    for name in args.plans:
        steps = [1e3 * r["step"] for r in runs[name]]
        blocked = [1e3 * r["blocked"] for r in runs[name]]
        row = {"plan": name, "step_ms": spread(steps), "blocked_ms": spread(blocked),
               "sent_mb": spread([r["sent"] / 1e6 for r in runs[name]]),
               "a2a_share": spread([b / s for b, s in zip(blocked, steps)]),
               "speedup": spread([b["step"] / r["step"] for b, r in zip(base, runs[name])])}
        rows.append(row)
    limits = [b["step"] / max(b["step"] - b["blocked"], b["blocked"], b["sent"] / rate) for b in base]
    rows[0]["limit"] = spread(limits)
    rows[0]["link_floor_ms"] = spread([1e3 * b["sent"] / rate for b in base])
    for row in rows:
        row["of_limit"] = row["speedup"]["median"] / rows[0]["limit"]["median"]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link", choices=["loopback", "shaped"], default="shaped")
    parser.add_argument("--rate", default="400mbit", help="shaped link: tbf rate")
    parser.add_argument("--plans", nargs="+", default=PLANS, help="names of examples/plans/*.yaml; the first is the "
                        "synchronous baseline")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--timeline", help="folder for each plan's timeline (Chrome trace + PNG)")
    parser.add_argument("--profile", metavar="DIR", help="first run the first plan once with a timeline, under "
                        "DIR/profile; plan settings may then say schedule.profile=PROFILE")
    parser.add_argument("--save", action="store_true", help="write the rows as JSON to --out")
    parser.add_argument("--out", help="where --save writes (default: benchmarks/results/overlap_<link>.json)")
    args = parser.parse_args()
    print(f"expected run time: {RUN_TIME}", flush=True)
    link = shaped_link(args.link, "overlap.py", args.rate)
    with made(link, "overlap.py"):
        probe = link_throughput(link, 256 * 1024)
        print(f"link: {probe['bytes_per_s'] / 1e6:.1f} MB/s sustained (256 KiB all-to-alls back to back), "
              f"{1e3 * probe['latency_s']:.2f} ms per small exchange", flush=True)
        profile = None
        if args.profile:  # the first plan, once, with a timeline: its measured costs for the scheduler
            folder = os.path.join(args.profile, "profile")
            run_plan(plan_of(args.plans[0], args.world), args.world, steps=args.steps, images=args.images, link=link,
                     timeline=folder)
            profile = os.path.join(folder, "timeline.json")
            print(f"profiled {args.plans[0]}: {profile}", flush=True)
        rows = measure(args, link, probe["bytes_per_s"], profile)
    where = link.describe() if link is not None else "loopback"
    print(f"\ndigits model, {args.world} ranks, {args.images} images with CFG, {args.steps} steps, "
          f"{args.rounds} alternating rounds (median [min-max]); {where}; {machine()}")
    print(f"{'plan':<22}{'step ms':>20}{'blocked ms':>20}{'sent MB':>9}{'a2a share':>11}{'speed-up':>20}"
          f"{'of limit':>10}")
    for row in rows:
        print(f"{row['plan']:<22}{show(row['step_ms']):>20}{show(row['blocked_ms']):>20}"
              f"{row['sent_mb']['median']:>9.2f}{row['a2a_share']['median']:>11.0%}"
              f"{show(row['speedup'], '{:.2f}'):>20}{row['of_limit']:>10.0%}")
    base = rows[0]
    print(f"limit of {base['plan']}: {show(base['limit'], '{:.2f}')}x (its step / max(compute, communication); "
          f"its bytes alone take {show(base['link_floor_ms'])} ms a step at the link's sustained "
          f"{probe['bytes_per_s'] / 1e6:.1f} MB/s)")
    if not args.save:
        return 0
    out = args.out or f"benchmarks/results/overlap_{args.link}.json"
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine(), "link": where, "link_probe": probe, "world": args.world, "images": args.images,
                   "steps": args.steps, "rounds": args.rounds, "rows": rows}, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
