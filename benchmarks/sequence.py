"""xDiT's exact parallelism measured: Ulysses, Ring, USP and CFG parallelism, alone and in
hybrids with expert parallelism, beside plain expert parallelism, with the simulator's
prediction for every row.

    python benchmarks/sequence.py [--link loopback|shaped] [--rounds 3] [--parts plans sweep gpu] [--save]

Three parts (expected run time: ~11 min on loopback, ~13 min over the shaped link, 2 CPUs;
the gpu part alone ~3 min):

* plans: the digits model, 20 images with CFG, 20 steps, at 2 and 4 ranks: step time and
  time blocked on exchanges per plan, median [min-max] over rounds in which the plans
  alternate, and the simulator's prediction (profile `cpu-local`, or `shaped-link` with
  --link shaped, from `moedit calibrate`).
* sweep: one image with CFG (the latency case sequence parallelism is for: the batch
  cannot be split) at 64, 256 and 1024 tokens (S/2 blocks with random weights, 4 blocks,
  5 steps), 1 rank against each 2-rank technique: at which sequence length each pays off.
* gpu (predicted only, nothing is run): the same question for XL/2-8E2A in bfloat16 on 8
  GPUs of the `h100-nvlink-8` and `l40-pcie-8` profiles, one image with CFG at 256, 1024
  and 4096 tokens, by the simulator (these profiles are datasheet figures, not measured).

Prints the tables; with --save writes benchmarks/results/sequence_<link>.json (the parts
run replace those parts of an earlier file).
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
from moedit.planner.costs import Hardware, HardwareError
from moedit.models import load_model
from moedit.planner.simulate import replay, simulate

PLANS = {  # world -> plan specs (examples/plans/<name>.yaml, @ sets fields; the EP degree is the world size)
    2: ["sync_ep", "ulysses", "ring", "cfg_parallel"],
    4: ["sync_ep", "ulysses", "ulysses@sequence_parallel.ulysses=4", "ring@sequence_parallel.ring=4", "usp",
        "cfg_parallel@sequence_parallel.ulysses=2", "cfg_parallel@sequence_parallel.ring=2",
        "cfg_ulysses_dice"],
}
SWEEP_PLANS = ["single", "ulysses", "ring", "cfg_parallel"]
SWEEP_SIZES = [16, 32, 64]  # latent side: 64, 256, 1024 tokens with patch 2
SWEEP_MODEL = dict(model="S/2-8E2A", depth=4)
GPU_PLANS = {1: ["single"], 8: ["ulysses@sequence_parallel.ulysses=8", "ring@sequence_parallel.ring=8",
                                "usp@sequence_parallel.ulysses=4", "cfg_parallel@sequence_parallel.ulysses=4"]}
GPU_SIZES = [32, 64, 128]  # 256, 1024, 4096 tokens
GPU_PROFILES = ["h100-nvlink-8", "l40-pcie-8"]
RUN_TIME = "about 11 min on loopback, 13 min over the shaped link, on a 2-core CPU (the gpu part alone about 3 min)"


def measure(specs: list[str], world_of, rounds: int, link, **run_args) -> dict:
    """{spec: [(step s, blocked s) per round]}, the plans alternating within each round."""
    measured = {spec: [] for spec in specs}
    for round_index in range(rounds):
        for spec in specs:
            world = world_of(spec)
            result = run_plan(plan_of(spec, world), world, link=link if world > 1 else None, name=spec, **run_args)
            step, blocked = (statistics.mean(result[k][1:]) for k in ("step_s", "blocked_s"))
            measured[spec].append((step, blocked))
            print(f"  {world} rank(s), round {round_index + 1}, {spec}: {1e3 * step:.1f} ms/step", flush=True)
    return measured


def predicted(spec: str, world: int, model, hardware: Hardware, samples: int, steps: int):
    compiled = moedit.compile(model, moedit.Plan(**plan_of(spec, world)))
    return simulate(replay(compiled, samples), hardware, steps=steps)


def row(spec: str, world: int, runs: list, prediction) -> dict:
    out = {"plan": spec, "world": world, "measured_ms": spread([1e3 * s for s, _ in runs]),
           "blocked_ms": spread([1e3 * b for _, b in runs]), "predicted_ms": 1e3 * prediction.mean_step_s,
           "predicted_blocked_ms": 1e3 * prediction.exposed_comm_s}
    out["error"] = out["predicted_ms"] / out["measured_ms"]["median"] - 1
    return out


def print_rows(rows: list[dict], first: str) -> None:
    print(f"{first:<44}{'ranks':>6}{'step ms':>26}{'blocked ms':>22}{'predicted':>11}{'error':>8}")
    for r in rows:
        label = r["plan"] if "tokens" not in r else f"{r['tokens']} tokens, {r['plan']}"
        print(f"{label:<44}{r['world']:>6}{show(r['measured_ms']):>26}{show(r['blocked_ms']):>22}"
              f"{r['predicted_ms']:>11.1f}{r['error']:>+8.0%}")


def plans_part(args, hardware, link) -> list[dict]:
    rows = []
    digits = load_model("digits")
    for world, specs in PLANS.items():
        runs = measure(specs, lambda spec: world, args.rounds, link, steps=20, images=20)
        for spec in specs:
            rows.append(row(spec, world, runs[spec], predicted(spec, world, digits, hardware, 40, 20)))
    return rows


def sweep_part(args, hardware, link) -> tuple[list[dict], dict]:
    rows, pays_off = [], {}
    for size in SWEEP_SIZES:
        overrides = {"depth": SWEEP_MODEL["depth"], "input_size": size}
        extra = tuple(x for key, value in overrides.items() for x in ("--set", f"{key}={value}"))
        runs = measure(SWEEP_PLANS, lambda spec: 1 if spec == "single" else 2, args.rounds, link, steps=5, images=1,
                       model=SWEEP_MODEL["model"], extra_args=extra)
        torch.manual_seed(0)
        model = load_model(SWEEP_MODEL["model"], **overrides)
        tokens = (size // 2) ** 2
        for spec in SWEEP_PLANS:
            world = 1 if spec == "single" else 2
            rows.append({"tokens": tokens, **row(spec, world, runs[spec],
                                                 predicted(spec, world, model, hardware, 2, 5))})
    single = {r["tokens"]: r["measured_ms"]["median"] for r in rows if r["plan"] == "single"}
    for spec in SWEEP_PLANS[1:]:
        faster = [r["tokens"] for r in rows if r["plan"] == spec and r["measured_ms"]["median"] < single[r["tokens"]]]
        pays_off[spec] = min(faster) if faster else None
    return rows, pays_off


def gpu_part() -> tuple[list[dict], dict]:
    """Predicted step times on GPU profiles; each plan is replayed once and simulated per profile."""
    rows = []
    for size in GPU_SIZES:
        model = load_model("XL/2-8E2A", device="meta", input_size=size).to(torch.bfloat16)
        for world, specs in GPU_PLANS.items():
            for spec in specs:
                replayed = replay(moedit.compile(model, moedit.Plan(**plan_of(spec, world))), 2)
                for profile in GPU_PROFILES:
                    p = simulate(replayed, Hardware.load(profile), steps=3)
                    rows.append({"profile": profile, "tokens": (size // 2) ** 2, "plan": spec, "world": world,
                                 "predicted_ms": 1e3 * p.mean_step_s, "exposed_ms": 1e3 * p.exposed_comm_s})
                print(f"  predicted {spec} at {(size // 2) ** 2} tokens", flush=True)
    single = {(r["profile"], r["tokens"]): r["predicted_ms"] for r in rows if r["plan"] == "single"}
    pays_off = {}
    for r in rows:
        r["speedup"] = single[r["profile"], r["tokens"]] / r["predicted_ms"]
        if r["plan"] != "single" and r["speedup"] > 1:
            key = f"{r['profile']} {r['plan']}"
            pays_off[key] = min(pays_off.get(key, r["tokens"]), r["tokens"])
    return rows, pays_off


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--link", choices=["loopback", "shaped"], default="loopback")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--parts", nargs="+", choices=["plans", "sweep", "gpu"], default=["plans", "sweep", "gpu"])
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/sequence_<link>.json")
    args = parser.parse_args()
    print(f"expected run time: {RUN_TIME}", flush=True)
    link = shaped_link(args.link, "sequence.py")
    profile = "shaped-link" if args.link == "shaped" else "cpu-local"
    try:
        hardware = Hardware.load(profile)
    except HardwareError as err:
        print(f"sequence.py: {err}\nrun `moedit calibrate{' --link shaped' if args.link == 'shaped' else ''}` first",
              file=sys.stderr)
        return 2
    results = {"machine": machine(), "profile": profile, "rounds": args.rounds}
    with made(link, "sequence.py"):
        results["link"] = link.describe() if link is not None else "loopback"
        if "plans" in args.parts:
            results["plans"] = plans_part(args, hardware, link)
        if "sweep" in args.parts:
            results["sweep"], results["pays_off_tokens"] = sweep_part(args, hardware, link)
        if "gpu" in args.parts:
            results["gpu"], results["gpu_pays_off_tokens"] = gpu_part()
    print(f"\n{results['link']}; {machine()}; {args.rounds} alternating rounds; predicted with {profile}")
    if "plans" in results:
        print("\ndigits model, 20 images with CFG, 20 steps")
        print_rows(results["plans"], "plan")
    if "sweep" in results:
        print(f"\none image with CFG, {SWEEP_MODEL['model']} blocks x {SWEEP_MODEL['depth']}, random weights, 5 steps")
        print_rows(results["sweep"], "tokens, plan")
        print("faster than 1 rank from: " + ", ".join(f"{spec} {tokens if tokens else 'never (up to 1024)'}"
                                                      for spec, tokens in results["pays_off_tokens"].items()))
    if "gpu" in results:
        print("\npredicted, XL/2-8E2A bf16, one image with CFG, 1 GPU against 8")
        print(f"{'profile':<16}{'tokens':>7}  {'plan':<42}{'ranks':>6}{'step ms':>10}{'exposed':>9}{'speed-up':>10}")
        for r in results["gpu"]:
            print(f"{r['profile']:<16}{r['tokens']:>7}  {r['plan']:<42}{r['world']:>6}{r['predicted_ms']:>10.1f}"
                  f"{r['exposed_ms']:>9.1f}{r['speedup']:>9.2f}x")
    rows = results.get("plans", []) + results.get("sweep", [])
    if rows:
        print(f"predictions within 20 %: {sum(abs(r['error']) <= 0.2 for r in rows)} of {len(rows)}")
    if args.save:  # the parts run now replace those parts of an earlier file
        out = f"benchmarks/results/sequence_{args.link}.json"
        if os.path.exists(out):
            with open(out) as f:
                results = {**json.load(f), **results}
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
