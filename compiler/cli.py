"""The `moedit` command: look at what a plan does to a model without starting processes.

    moedit inspect --model S/2-8E2A --plan examples/plans/sync_ep.yaml --world-size 4
"""

from __future__ import annotations

import argparse
import sys

import moedit
from moedit.models import load_model


def _inspect(args) -> None:
    plan = moedit.Plan.from_file(args.plan)
    if args.world_size is not None:
        plan = moedit.Plan(**{**plan.to_dict(), "expert_parallel": {"degree": args.world_size}})
    model = load_model(args.model, device="meta")  # shapes only: no memory, no checkpoint read
    compiled = moedit.compile(model, plan)
    print(compiled.explain(batch_size=args.batch_size, steps=args.steps))
    if args.dump:
        compiled.dump(args.dump)
        print(f"\nper-rank graphs and pass log written to {args.dump}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moedit", description="moedit: parallel inference for MoE-DiT models")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print the per-layer plan table (CompiledModel.explain())")
    inspect.add_argument("--model", default="digits", help="shipped model name or reference config, e.g. S/2-8E2A")
    inspect.add_argument("--plan", required=True, help="plan file (YAML or JSON)")
    inspect.add_argument("--world-size", type=int, help="override expert_parallel.degree")
    inspect.add_argument("--batch-size", type=int, default=8, help="global batch for the bytes-per-step column")
    inspect.add_argument("--steps", type=int, default=25, help="diffusion steps for the step-kind table")
    inspect.add_argument("--dump", help="also write per-rank graph code and the pass log to this folder")
    args = parser.parse_args(argv)
    try:
        _inspect(args)
    except (moedit.PlanError, moedit.TraceError, ValueError, TypeError) as err:
        print(f"moedit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
