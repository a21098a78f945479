"""Two nodes over a slow link: every exact layout (or the plans given) measured beside its prediction.

    python benchmarks/two_nodes.py [--ranks-per-node 2] [--rate 400mbit] [--plans exact | stale | SPEC ...]
                                   [--rounds 3] [--steps 10] [--images 20] [--hardware shaped-2x2] [--save]

The test bed (as root): two network namespaces, `--ranks-per-node` ranks in each, loopback
inside a namespace and a veth shaped with tbf (`--rate`) between them; each plan runs as
`torchrun --nnodes=2` from each namespace, the rendezvous over the veth (GLOO_SOCKET_IFNAME),
which is the multi-node path a cluster takes (see moedit/runtime/netns.py). Without root it
says so and exits with status 2.

`--plans exact` (the default) runs the layouts the planner searches with `--max-staleness 0`
on this test bed, one plan each (its base: no chunks, program order): experts over both nodes,
CFG, Ulysses, Ring and USP over every rank, replicas of the experts over fewer ranks (every
expert on every rank; experts inside a node, a replica per node), and experts with Ulysses or
CFG inside a node, a replica per node. `--plans stale` runs experts over every
rank, `dice` over every rank and inside a node, and the planner's pick with staleness allowed.
Any other value is a plan file name in examples/plans/ (with @settings, as overlap.py takes) or
a plan as JSON. The first plan is the baseline.

The plans alternate within each of `--rounds` rounds; per plan: the mean step (first step left
out) as median [min-max] over rounds, the simulator's prediction on `--hardware` (written by
`moedit calibrate --link shaped --nodes 2`), its error, the speed-up over the baseline per round,
and the largest difference of its images from the baseline's (exact plans: <= 1e-4; stale ones: also
their relative L2 distance). The row the
planner picks (`moedit plan --hardware ... --max-staleness 0`, or with staleness for `stale`)
is marked. --save writes benchmarks/results/two_nodes_<exact|stale|plans>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import moedit
from _launch import machine, made, plan_of, run_plan, shaped_link, show, spread
from moedit.models import load_model
from moedit.planner.costs import Hardware, HardwareError
from moedit.planner.search import candidate_plans, describe, predict, search, staleness_of

RUN_TIME = "about 10.5 min on a 2-core CPU for the exact layouts and the pick, 5 for --plans stale (15-20 s a plan a round)"


def _layouts(world: int, per_node: int, layers: int) -> list[dict]:
    """The base plan of every exact layout the planner searches on this test bed, experts over every rank first."""
    plans, seen = [], set()
    for plan in candidate_plans(world, layers, max_staleness=0, per_node=per_node):
        if len(plan["expert_parallel"]) > 1 or "schedule" in plan or "shortcut" in plan:
            continue  # chunks, the overlap schedule, the shortcut schedule: the same layout
        key = json.dumps(plan, sort_keys=True)
        if key not in seen:
            seen.add(key)
            plans.append(plan)
    return plans


def _plans(args, world: int, per_node: int, model, hardware: Hardware) -> tuple[list[dict], dict | None]:
    """The plans to run and the planner's pick among them."""
    meta = load_model("digits", device="meta")
    batch = 2 * args.images
    if args.plans == ["exact"]:
        pick = search(meta, hardware, world, batch=batch, steps=args.steps, max_staleness=0)[0].plan
        plans = _layouts(world, per_node, len(model.blocks))
        return plans + ([pick] if pick not in plans else []), pick
    if args.plans == ["stale"]:
        pick = search(meta, hardware, world, batch=batch, steps=args.steps)[0].plan
        dice = plan_of("dice", world)
        inside = {**dice, "expert_parallel": {**dice["expert_parallel"], "degree": per_node},
                  "data_parallel": world // per_node}
        plans = [{"expert_parallel": {"degree": world}}, dice, inside]
        return plans + ([pick] if pick not in plans else []), pick
    plans = [json.loads(spec) if spec.startswith("{") else plan_of(spec) for spec in args.plans]
    return plans, None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--rate", default="400mbit", help="tbf rate of the link between the nodes")
    parser.add_argument("--plans", nargs="+", default=["exact"], help="exact, stale, or plan specs (see above)")
    parser.add_argument("--hardware", help="profile for the predictions (default shaped-2x<ranks per node>)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--save", action="store_true")
    args = parser.parse_args()
    print(f"expected run time: {RUN_TIME}", flush=True)
    per_node, world = args.ranks_per_node, 2 * args.ranks_per_node
    try:
        hardware = Hardware.load(args.hardware or f"shaped-2x{per_node}")
    except HardwareError as err:
        parser.error(str(err))
    model = load_model("digits")
    plans, pick = _plans(args, world, per_node, model, hardware)
    predicted = {json.dumps(p, sort_keys=True): predict(load_model("digits", device="meta"), p, hardware,
                                                        2 * args.images, args.steps).mean_step_s for p in plans}
    link = shaped_link("shaped", "two_nodes.py", args.rate)
    runs = [[] for _ in plans]
    with made(link, "two_nodes.py"):
        for round_index in range(args.rounds):
            for plan, found in zip(plans, runs):
                result = run_plan(plan, moedit.Plan(**plan).world_size, steps=args.steps, images=args.images,
                                  link=link, name=describe(plan))
                found.append({"step_s": statistics.mean(result["step_s"][1:]), "images": result["images"]})
                print(f"  round {round_index + 1}, {describe(plan)}: {1e3 * found[-1]['step_s']:.1f} ms/step",
                      flush=True)
    rows = []
    for plan, found in zip(plans, runs):
        key = json.dumps(plan, sort_keys=True)
        measured = spread([1e3 * r["step_s"] for r in found])
        rows.append({"plan": plan, "describe": describe(plan), "staleness": staleness_of(plan),
                     "planner_pick": plan == pick, "step_ms": measured, "predicted_ms": 1e3 * predicted[key],
                     "error": 1e3 * predicted[key] / measured["median"] - 1,
                     "speedup": spread([b["step_s"] / r["step_s"] for b, r in zip(runs[0], found)]),
                     "max_diff_vs_baseline": float((found[-1]["images"] - runs[0][-1]["images"]).abs().max()),
                     "rel_l2_vs_baseline": float((found[-1]["images"] - runs[0][-1]["images"]).norm()
                                                 / runs[0][-1]["images"].norm())})
    print(f"\ndigits model, {world} ranks: 2 nodes (network namespaces) x {per_node}, {link.describe()}; "
          f"{args.images} images with CFG, {args.steps} steps, {args.rounds} alternating rounds (median [min-max]); "
          f"predicted on {hardware.name}; {machine()}")
    print(f"{'plan':<58}{'stale':>6}{'step ms':>22}{'predicted':>10}{'error':>8}{'speed-up':>20}{'max diff':>10}"
          f"{'rel L2':>8}")
    for row in rows:
        mark = " <- planner's pick" if row["planner_pick"] else ""
        print(f"{row['describe']:<58}{row['staleness']:>6}{show(row['step_ms']):>22}{row['predicted_ms']:>10.1f}"
              f"{row['error']:>+8.0%}{show(row['speedup'], '{:.2f}'):>20}{row['max_diff_vs_baseline']:>10.1e}"
              f"{row['rel_l2_vs_baseline']:>8.4f}{mark}")
    if args.save:
        kind = args.plans[0] if args.plans[0] in ("exact", "stale") else "plans"
        out = f"benchmarks/results/two_nodes_{kind}.json"
        with open(out, "w") as f:
            json.dump({"machine": machine(), "link": link.describe(), "hardware": hardware.name,
                       "ranks_per_node": per_node, "images": args.images, "steps": args.steps,
                       "rounds": args.rounds, "rows": rows}, f, indent=1)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
