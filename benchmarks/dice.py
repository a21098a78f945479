"""Stale expert-parallel plans against synchronous EP: speed, hidden communication, cache,
and how far the images move.

    python benchmarks/dice.py [--config digits|comm-bound] [--worlds 2 4] [--steps 20] [--images 16] [--save]

Configs: `digits`, the trained model (6 blocks, hidden 64, 64 tokens per image); and
`comm-bound`, the tiny reference config at depth 12 (hidden 32, 16 tokens per image) with
random weights written to a checkpoint, where all-to-all is most of a synchronous step
on this CPU. For each world size, every plan in --plans runs under torchrun on CPU
(gloo) with the same seed. Per plan:

    step ms       mean wall time of a diffusion step (all steps but the first)
    blocked ms    of which the rank was blocked in an exchange (wait nodes, blocking counts)
    a2a share     blocked / step, for sync_ep: the share of the step all-to-all takes
    hidden        1 - blocked / sync_ep's blocked: the share of sync_ep's exposed
                  all-to-all time the plan no longer waits for
    speed-up      sync_ep's step time / the plan's
    cache MiB     peak staleness-cache bytes on rank 0
    rel L2, PSNR  final images against sync_ep's (same seed)

Prints a table; with --save writes benchmarks/results/dice_<config>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch

from moedit.models.metrics import psnr, relative_l2
from moedit.models import dit_moe

from _launch import load_plan, machine, run_plan

PLANS = ["sync_ep", "displaced", "interweaved", "dice"]
COMM_BOUND = {"depth": 12}  # overrides of the "tiny" reference config
RUN_TIME = "about 2 min on a 2-core CPU with the defaults"


@torch.no_grad()
def random_checkpoint(path: str) -> list[str]:
    """Random weights for the comm-bound config (adaLN-Zero's zeros would make every block
    the identity and every plan's images equal); returns moedit.run's model arguments."""
    model = dit_moe("tiny", **COMM_BOUND)
    gen = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.copy_(torch.randn(param.shape, generator=gen) * (param.shape[-1] ** -0.5 if param.dim() > 1 else 0.1))
    torch.save(model.state_dict(), path)
    return ["--checkpoint", path] + [arg for k, v in COMM_BOUND.items() for arg in ("--set", f"{k}={v}")]


def summarise(name: str, result: dict, base: dict | None) -> dict:
    step = statistics.mean(result["step_s"][1:])
    blocked = statistics.mean(result["blocked_s"][1:])
    row = {"plan": name, "world_size": result["world_size"], "step_ms": 1e3 * step, "blocked_ms": 1e3 * blocked,
           "a2a_share": blocked / step, "cache_mib": result["cache_peak_bytes"] / 2**20,
           "programs": result["programs"]}
    if base is not None:
        row.update(hidden=1 - blocked / base["blocked"], speedup=base["step"] / step,
                   rel_l2=relative_l2(result["images"], base["images"]), psnr=psnr(result["images"], base["images"]))
    return row, {"step": step, "blocked": blocked, "images": result["images"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=["digits", "comm-bound"], default="digits")
    parser.add_argument("--worlds", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--plans", nargs="+", default=PLANS, help="names of examples/plans/*.yaml; first is the base")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--save", action="store_true", help="write the rows as JSON to --out")
    parser.add_argument("--out", help="where --save writes (default: benchmarks/results/dice_<config>.json)")
    args = parser.parse_args()
    print(f"expected run time: {RUN_TIME}", flush=True)
    out = args.out or f"benchmarks/results/dice_{args.config}.json"
    tmp = tempfile.TemporaryDirectory()
    model, extra = "digits", []
    if args.config == "comm-bound":
        model, extra = "tiny", random_checkpoint(os.path.join(tmp.name, "random.pt"))
    rows = []
    for world in args.worlds:
        base = None
        for name in args.plans:
            plan = load_plan(os.path.join("examples", "plans", f"{name}.yaml"), world)
            result = run_plan(plan, world, model=model, steps=args.steps, images=args.images,
                              cfg_scale=args.cfg_scale, extra_args=extra)
            row, measured = summarise(name, result, base)
            base = base or measured
            rows.append(row)
            print(f"  {name} on {world} ranks: {row['step_ms']:.1f} ms/step", flush=True)
    print(f"\nconfig {args.config}, {args.images} images with CFG, {args.steps} steps; {machine()}")
    header = (f"{'plan':<13}{'ranks':>6}{'step ms':>9}{'blocked ms':>12}{'a2a share':>11}{'hidden':>8}"
              f"{'speed-up':>10}{'cache MiB':>11}{'rel L2':>9}{'PSNR dB':>9}")
    print(header)
    for r in rows:
        extra = (f"{r['hidden']:>8.0%}{r['speedup']:>9.2f}x{r['cache_mib']:>11.2f}{r['rel_l2']:>9.4f}{r['psnr']:>9.1f}"
                 if "hidden" in r else f"{'-':>8}{'1.00x':>10}{r['cache_mib']:>11.2f}{'-':>9}{'-':>9}")
        print(f"{r['plan']:<13}{r['world_size']:>6}{r['step_ms']:>9.1f}{r['blocked_ms']:>12.1f}{r['a2a_share']:>11.0%}"
              + extra)
    if not args.save:
        return
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump({"machine": machine(), "config": args.config, "images": args.images, "steps": args.steps,
                   "cfg_scale": args.cfg_scale, "rows": rows}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
