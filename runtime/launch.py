"""The torchrun entry point (`python -m moedit.run`): sample a grid of images under a plan
and time every step.

    torchrun --nproc_per_node=2 -m moedit.run --model digits --plan examples/plans/sync_ep.yaml --out out/

Every rank compiles the same plan, keeps only its own experts and runs its share of the
batch; rank 0 writes `samples.png`, `images.pt` (the raw batch), `timings.json` (per step:
seconds, seconds blocked on exchanges, program) and `explain.txt` under --out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time

import torch
import yaml

import moedit
from moedit.models import CheckpointError, load_model
from moedit.models.images import save_grid
from moedit.models.pretrained import SAMPLING

from .comm import CollectiveError
from .timeline import chrome_trace, draw

log = logging.getLogger("moedit.run")


def parse_overrides(items: list[str]) -> dict:
    """["depth=12", "learn_sigma=false"] -> {"depth": 12, "learn_sigma": False}."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set needs KEY=VALUE, got {item!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m moedit.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits", help="shipped model name or reference config (default: digits)")
    parser.add_argument("--checkpoint", help="state-dict file to load into a reference config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a reference config's DiT argument, e.g. --set depth=12 (repeatable)")
    parser.add_argument("--plan", required=True, help="plan file (YAML or JSON), e.g. examples/plans/sync_ep.yaml")
    parser.add_argument("--out", required=True, help="folder for samples.png, timings.json and explain.txt")
    parser.add_argument("--steps", type=int, help="Euler steps (default: the shipped model's, else 25)")
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default: the shipped "
                        "model's, else 1.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=20, help="images, labels cycling through the classes")
    parser.add_argument("--labels", type=int, nargs="+", help="explicit class labels (overrides --num-images)")
    parser.add_argument("--timeline", action="store_true", help="record every compute region and exchange; write "
                        "timeline.json (Chrome trace: open in Perfetto) and timeline.png under --out")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    defaults = SAMPLING.get(args.model, {"steps": 25, "cfg_scale": 1.5})
    args.steps = defaults["steps"] if args.steps is None else args.steps
    args.cfg_scale = defaults["cfg_scale"] if args.cfg_scale is None else args.cfg_scale
    logging.basicConfig(level=logging.INFO,
                        format=f"[rank {os.environ.get('RANK', '0')}] %(asctime)s %(name)s: %(message)s")
    try:
        plan = moedit.Plan.from_file(args.plan)
        model = load_model(args.model, args.checkpoint, **parse_overrides(args.set))
        compiled = moedit.compile(model, plan)
        runtime = compiled.to_runtime(profile=args.timeline)
    except (moedit.PlanError, moedit.TraceError, CheckpointError, ValueError, FileNotFoundError) as err:
        print(f"moedit.run: error: {err}", file=sys.stderr)
        return 2
    try:
        labels = args.labels or [i % model.config.num_classes for i in range(args.num_images)]
        start = time.perf_counter()
        images = runtime.sample(labels, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed)
        total = time.perf_counter() - start
        spans = runtime.timeline() if args.timeline else None
        if runtime.rank == 0:
            os.makedirs(args.out, exist_ok=True)
            save_grid(images, os.path.join(args.out, "samples.png"), columns=10, scale=4)
            with open(os.path.join(args.out, "explain.txt"), "w") as f:
                f.write(compiled.explain(batch_size=len(labels), steps=args.steps) + "\n")
            timings = {
                "model": args.model, "plan": args.plan, "plan_settings": plan.to_dict(),
                "world_size": runtime.world_size, "device": str(runtime.device),
                "backend": torch.distributed.get_backend(), "torch": torch.__version__,
                "host": platform.node(), "cpu_count": os.cpu_count(),
                "images": len(labels), "steps": args.steps, "cfg_scale": args.cfg_scale, "seed": args.seed,
                "total_s": total, "step_s": runtime.step_times, "blocked_s": runtime.blocked_times,
                "blocked_by_exchange_s": runtime.blocked_by,
                "sent_bytes": runtime.sent_bytes,
                "median_step_s": sorted(runtime.step_times)[len(runtime.step_times) // 2],
                "programs": [kind.name for kind in runtime.step_log],
                "cache_peak_bytes": runtime.state.cache.peak_bytes,
            }
            if spans is not None:
                chrome_trace(spans, os.path.join(args.out, "timeline.json"))
                draw(spans, os.path.join(args.out, "timeline.png"), steps=range(1, min(3, args.steps)),
                     title=f"{os.path.basename(args.plan)}, {runtime.world_size} ranks")
            torch.save(images, os.path.join(args.out, "images.pt"))
            with open(os.path.join(args.out, "timings.json"), "w") as f:
                json.dump(timings, f, indent=1)
            log.info("%d images in %.2f s (median step %.1f ms) -> %s", len(labels), total,
                     1e3 * timings["median_step_s"], args.out)
    except (CollectiveError, FloatingPointError, MemoryError) as err:
        print(f"moedit.run: error: {err}", file=sys.stderr)
        return 1
    finally:
        runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
