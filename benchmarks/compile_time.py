"""How long `moedit.compile` takes for the reference configs, built on the meta device.

`compile s` is what `moedit.compile` costs (trace, then rank 0's programs; a torchrun
process then builds its own rank's on first use); `all ranks s` adds every other rank's
programs, as `CompiledModel.dump` does.

    python benchmarks/compile_time.py [--models XL/2-8E2A G/2-16E2A] [--worlds 1 2 4 8] [--plans sync_ep dice] [--save]

Prints a table; with --save writes benchmarks/results/compile_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import yaml

import moedit
from moedit.models import dit_moe
from moedit.tracer import trace

from _launch import machine

RUN_TIME = "about 4 min on a 2-core CPU with the defaults"

def measure(name: str, world: int, plan_name: str, repeats: int) -> dict:
    with torch.device("meta"):
        model = dit_moe(name)
    with open(f"examples/plans/{plan_name}.yaml") as f:
        data = yaml.safe_load(f)
    plan = moedit.Plan(**{**data, "expert_parallel": {"degree": world}})
    trace_s, compile_s, all_s = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        trace(model)
        trace_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        compiled = moedit.compile(model, plan)  # traces, and builds rank 0's programs
        compile_s.append(time.perf_counter() - start)
        for rank in range(1, world):
            compiled.graph(rank)
        all_s.append(time.perf_counter() - start)
    nodes = sum(len(compiled.graph(r, p).graph.nodes) for r in range(world) for p in compiled.programs)
    return {"model": name, "plan": plan_name, "programs": len(compiled.programs), "world_size": world,
            "moe_layers": len(compiled.layers), "graph_nodes": nodes, "trace_s": min(trace_s),
            "compile_s": min(compile_s), "all_ranks_s": min(all_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["S/2-8E2A", "XL/2-8E2A", "G/2-16E2A"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--plans", nargs="+", default=["sync_ep", "dice"], help="names in examples/plans/")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs is reported")
    parser.add_argument("--save", action="store_true", help="write the rows as JSON to --out")
    parser.add_argument("--out", default="benchmarks/results/compile_time.json", help="where --save writes")
    args = parser.parse_args()
    print(f"expected run time: {RUN_TIME}", flush=True)
    rows = [measure(name, world, plan, args.repeats)
            for name in args.models for plan in args.plans for world in args.worlds]
    print(f"{'model':<12}{'plan':<9}{'ranks':>6}{'programs':>10}{'MoE layers':>12}{'nodes (all)':>13}"
          f"{'trace s':>10}{'compile s':>11}{'all ranks s':>13}")
    for r in rows:
        print(f"{r['model']:<12}{r['plan']:<9}{r['world_size']:>6}{r['programs']:>10}{r['moe_layers']:>12}"
              f"{r['graph_nodes']:>13}{r['trace_s']:>10.3f}{r['compile_s']:>11.3f}{r['all_ranks_s']:>13.3f}")
    if not args.save:
        return
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": machine(), "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
