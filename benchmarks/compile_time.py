"""How long `moedit.compile` takes for the reference configs, built on the meta device.

    python benchmarks/compile_time.py [--models XL/2-8E2A G/2-16E2A] [--worlds 1 2 4 8]

Prints a table and writes benchmarks/results/compile_time.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import moedit
from moedit.models import dit_moe
from moedit.tracer import trace


def measure(name: str, world: int, repeats: int) -> dict:
    with torch.device("meta"):
        model = dit_moe(name)
    plan = moedit.Plan(expert_parallel={"degree": world})
    trace_s, compile_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        trace(model)
        trace_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        compiled = moedit.compile(model, plan)
        compile_s.append(time.perf_counter() - start)
    nodes = sum(len(compiled.graph(r).graph.nodes) for r in range(world))
    return {"model": name, "world_size": world, "moe_layers": len(compiled.layers), "graph_nodes": nodes,
            "trace_s": min(trace_s), "compile_s": min(compile_s)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["S/2-8E2A", "XL/2-8E2A", "G/2-16E2A"])
    parser.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs is reported")
    parser.add_argument("--out", default="benchmarks/results/compile_time.json")
    args = parser.parse_args()
    rows = [measure(name, world, args.repeats) for name in args.models for world in args.worlds]
    print(f"{'model':<12}{'ranks':>6}{'MoE layers':>12}{'nodes (all ranks)':>19}{'trace s':>10}{'compile s':>11}")
    for r in rows:
        print(f"{r['model']:<12}{r['world_size']:>6}{r['moe_layers']:>12}{r['graph_nodes']:>19}"
              f"{r['trace_s']:>10.3f}{r['compile_s']:>11.3f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"machine": f"{platform.node()} ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()})",
                   "torch": torch.__version__, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
