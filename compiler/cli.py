"""The `moedit` command: look at what a plan does to a model without starting processes.

    moedit inspect --model S/2-8E2A --plan examples/plans/sync_ep.yaml --world-size 4
    moedit calibrate [--link shaped [--nodes 2 [--ranks-per-node R]]]
    moedit plan --model XL/2-8E2A --hardware l40-pcie-8 --ranks 8 [--max-staleness 1] [--json]
    moedit models [NAME ...]
    moedit plan-schema
"""

from __future__ import annotations

import argparse
import sys

import moedit
from moedit.models import load_model
from moedit.models.pretrained import NAMES_HELP

MODEL_HELP = f"{NAMES_HELP}; `moedit models` lists each with its size"


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


def _plan(args) -> None:
    import json

    import torch
    import yaml

    from moedit.planner.costs import Hardware, calibrated
    from moedit.models.pretrained import PRETRAINED, SAMPLING
    from moedit.planner.search import QualityProbe, describe, search

    hardware = Hardware.load(args.hardware)
    if args.memory_gb is not None and not 0 < args.memory_gb < float("inf"):
        raise SystemExit(f"moedit plan: --memory-gb {args.memory_gb}: give the GB one rank may use, a number above 0")
    dtype = getattr(torch, args.dtype or ("float32" if calibrated(args.hardware) else "bfloat16"))  # CPUs: float32
    model = load_model(args.model, device="meta").to(dtype)  # shapes only
    batch = args.images * (2 if args.cfg else 1)
    if not args.json:
        print(f"moedit plan: {args.model} ({dtype}), {args.ranks} ranks on {hardware.name}, {args.images} images"
              f"{' with CFG' if args.cfg else ''}, {args.steps} steps", flush=True)
    quality = None
    if args.model in PRETRAINED and args.quality_images > 0:  # trained weights: measure what lossy plans cost
        if not args.json:
            print(f"sampling the exact plan's {args.quality_images} images, which each lossy candidate's are measured "
                  "against...", flush=True)
        quality = QualityProbe(load_model(args.model), images=args.quality_images, steps=args.steps,
                               cfg_scale=SAMPLING.get(args.model, {}).get("cfg_scale", 1.5) if args.cfg else 1.0)
    if args.max_rel_l2 is not None and quality is None:
        raise SystemExit(f"moedit plan: --max-rel-l2 needs each plan's quality measured, on a model with trained "
                         f"weights ({', '.join(PRETRAINED)}) and --quality-images above 0; {args.model} has none")
    found = search(model, hardware, args.ranks, batch=batch, steps=args.steps, max_staleness=args.max_staleness,
                   wire_dtypes=tuple(args.wire_dtypes), quality=quality, max_rel_l2=args.max_rel_l2,
                   memory_bytes=args.memory_gb and args.memory_gb * 1e9, progress=True)
    if not found:
        _print_dropped(found.dropped, sys.stderr)
        raise SystemExit(f"moedit plan: no candidate plan fits {args.model} on {args.ranks} ranks with {args.images} "
                         "images (every one was left out, see above); change --ranks or --images")
    best = found[0]
    with open(args.out, "w") as f:
        f.write(f"# moedit plan --model {args.model} --hardware {args.hardware} --ranks {args.ranks}: predicted "
                f"{best.predicted_step_s * 1e3:.2f} ms a step, staleness {best.staleness}\n")
        yaml.safe_dump(best.plan, f, sort_keys=False)
    if args.json:
        print(json.dumps([c.to_json() for c in found], indent=1))
        _print_dropped(found.dropped, sys.stderr)  # stdout stays one JSON document
        return
    sync = next((c for c in found if c.plan == {"expert_parallel": {"degree": args.ranks}}), None)
    if sync is not None:
        print(f"synchronous EP: {sync.predicted_step_s * 1e3:.2f} ms a step, all-to-all {sync.comm_share_sync:.0%} "
              f"of it (the profile's figures and their sources: {hardware.name}.yaml)\n")
    else:  # fewer images than ranks: compare with the fastest exact plan
        sync = next(c for c in found if c.staleness == 0)
        print(f"synchronous EP cannot split {batch} sequences over {args.ranks} ranks; 'vs sync' compares with the "
              f"fastest exact plan ({describe(sync.plan)})\n")
    print(f"{'plan':<66}{'step ms':>9}{'vs sync':>9}{'exposed ms':>12}{'stale':>7}{'peak GB':>9}{'rel L2':>9}")
    shown = found[: args.top] + ([sync] if sync not in found[: args.top] else [])
    for c in shown:
        speedup = sync.predicted_step_s / c.predicted_step_s
        rel_l2 = "-" if c.quality_rel_l2 is None else f"{c.quality_rel_l2:.4f}"
        print(f"{describe(c.plan):<66}{c.predicted_step_s * 1e3:>9.2f}{speedup:>8.2f}x"
              f"{c.exposed_comm_s * 1e3:>12.2f}{c.staleness:>7}{c.peak_bytes / 1e9:>9.2f}{rel_l2:>9}")
    if quality is not None:
        print(f"rel L2: measured, a {args.quality_images}-image {args.steps}-step sample under the plan's lossy "
              "settings against the exact plan's, on one process with the trained weights")
    else:
        print("rel L2 '-': not measured (a model without trained weights, or --quality-images 0)")
    _print_dropped(found.dropped, sys.stdout)
    print(f"\nbest plan written to {args.out}")


def _print_dropped(dropped, stream) -> None:
    from moedit.planner.search import describe

    if dropped:
        print(f"\n{len(dropped)} candidate plan(s) left out:", file=stream)
    for plan, reason in dropped:
        print(f"  {describe(plan)}: {reason}", file=stream)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.0f} k"


def _models(args) -> None:
    """One row per model name, from the model built on the meta device (no memory, no file read)."""
    import os

    from moedit.adapters import adapter_for
    from moedit.models.dit_moe import ALIASES
    from moedit.models.pretrained import PRETRAINED, checkpoint_path, model_names

    names = args.names or [name for name in model_names() if name not in ALIASES]
    models = {name: load_model(name, device="meta") for name in names}  # an unknown name fails before any row
    print(f"{'model':<14}{'params':>10}{'active':>10}{'depth':>7}{'hidden':>8}{'experts':>9}{'top-k':>7}"
          f"  checkpoint")
    for name, model in models.items():
        total = sum(p.numel() for p in model.parameters())
        idle = sum((len(experts) - adapter.top_k(m)) * sum(p.numel() for p in experts[0].parameters())
                   for m in model.modules() if (adapter := adapter_for(m)) and (experts := adapter.experts(m)))
        cfg = model.config
        shipped = name in PRETRAINED and os.path.isfile(checkpoint_path(name))
        print(f"{name:<14}{_count(total):>10}{_count(total - idle):>10}{cfg.depth:>7}{cfg.hidden_size:>8}"
              f"{cfg.num_experts:>9}{cfg.num_experts_per_tok:>7}  {'shipped' if shipped else 'none'}")
    print("\nactive: parameters one token runs through (its top-k routed experts, the shared expert and the rest).\n"
          f"aliases: {', '.join(f'{alias} = {name}' for alias, name in ALIASES.items())}.\n"
          "Reference configs have random weights unless --checkpoint FILE loads a state dict (the public DiT-MoE "
          "checkpoints: see the links in the DiT-MoE repository's README).")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="moedit", description="moedit: parallel inference for MoE-DiT models")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect = commands.add_parser("inspect", help="print the per-layer plan table (CompiledModel.explain())")
    inspect.add_argument("--model", default="digits", help=MODEL_HELP)
    inspect.add_argument("--plan", required=True, help="plan file (YAML or JSON)")
    inspect.add_argument("--world-size", type=int, help="override expert_parallel.degree (the world size of a "
                         "plain expert-parallel plan; with cfg or sequence-parallel axes the world is the larger of "
                         "this and their product)")
    inspect.add_argument("--batch-size", type=int, default=8, help="global batch for the bytes-per-step column")
    inspect.add_argument("--steps", type=int, default=25, help="diffusion steps for the step-kind table")
    inspect.add_argument("--dump", help="also write per-rank graph code and the pass log to this folder")
    calibrate = commands.add_parser("calibrate", help="measure this machine for the cost model (cpu-local profile)")
    calibrate.add_argument("--link", choices=["loopback", "shaped"], default="loopback",
                           help="shaped: also measure a tbf-shaped veth link between two namespaces (root)")
    calibrate.add_argument("--nodes", type=int, choices=[2], help="with --link shaped: also write the profile of "
                           "the two-node test bed, `shaped-2xR`: R ranks in each namespace (--ranks-per-node)")
    calibrate.add_argument("--ranks-per-node", type=int, default=2, choices=range(1, 9), metavar="{1..8}")
    plan = commands.add_parser("plan", help="predict every candidate plan's step time on a hardware profile and "
                               "write the fastest as a plan file")
    plan.add_argument("--model", default="XL/2-8E2A", help=MODEL_HELP)
    plan.add_argument("--hardware", default="l40-pcie-8", help="profile name (see moedit/planner/hardware/) or YAML file")
    plan.add_argument("--ranks", type=int, default=8)
    plan.add_argument("--max-staleness", type=int, help="leave out plans whose outputs can be more steps old")
    plan.add_argument("--images", type=int, default=32, help="images per batch (global)")
    plan.add_argument("--no-cfg", dest="cfg", action="store_false", help="no classifier-free guidance")
    plan.add_argument("--steps", type=int, default=50, help="diffusion steps per sample")
    plan.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: bfloat16 on published "
                      "GPU profiles, float32 on cpu-local")
    plan.add_argument("--top", type=int, default=6, help="how many plans to print")
    plan.add_argument("--out", default="best_plan.yaml", help="where to write the best plan")
    plan.add_argument("--json", action="store_true", help="print every candidate as JSON")
    plan.add_argument("--wire-dtypes", nargs="+", default=["auto"], choices=["auto", "bfloat16", "float16", "float8"],
                      help="try every candidate with each of these expert_parallel.wire_dtype values")
    plan.add_argument("--max-rel-l2", type=float, help="leave out plans whose measured quality cost (rel. L2 of their "
                      "images to the exact plan's) is above this")
    plan.add_argument("--memory-gb", type=float, help="memory one rank may use, in GB; plans predicted to "
                      "need more are left out (default: the profile's memory_bytes; a CPU machine's RAM over its ranks)")
    plan.add_argument("--quality-images", type=int, default=8, help="images of the sample each lossy candidate's "
                      "quality cost is measured on (models with trained weights; 0: do not measure)")
    models = commands.add_parser("models", help="list every model name with its size and whether a checkpoint ships")
    models.add_argument("names", nargs="*", metavar="NAME", help=f"only these ({MODEL_HELP})")
    commands.add_parser("plan-schema", help="print every plan field as a Markdown table (the plan reference in "
                        "docs/plans.md)")
    args = parser.parse_args(argv)
    try:
        if args.command == "inspect":
            _inspect(args)
        elif args.command == "plan":
            _plan(args)
        elif args.command == "models":
            _models(args)
        elif args.command == "plan-schema":
            from moedit.plan import reference_table

            print(reference_table())
        elif args.command == "calibrate":
            from moedit.planner.calibrate import calibrate as run_calibration

            if args.nodes and args.link != "shaped":
                raise ValueError("--nodes: the nodes of the test bed are joined by the shaped link; add --link shaped")
            run_calibration(args.link, nodes=args.nodes, ranks_per_node=args.ranks_per_node)
    except (moedit.PlanError, moedit.TraceError, ValueError, TypeError, RuntimeError) as err:
        print(f"moedit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
