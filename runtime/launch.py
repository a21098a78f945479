"""The torchrun entry point (`python -m moedit.run`): sample a grid of images under a plan
and time every step.

    torchrun --nproc_per_node=2 -m moedit.run --model digits --plan examples/plans/sync_ep.yaml --out out/

Every rank compiles the same plan, keeps only its own experts and runs its share of the
batch; rank 0 writes `samples.png` (captioned with the labels and settings), `images.pt`
(the raw batch), `timings.json` (per step: seconds, seconds blocked on exchanges, program)
and `explain.txt` under --out, and checks that it can write there before any other work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time

import torch
import yaml

import moedit
from moedit.models import CheckpointError, load_model
from moedit.models.images import save_grid
from moedit.models.pretrained import NAMES_HELP, PRETRAINED, sampling_defaults

from .comm import CollectiveError
from .sampling import SAMPLERS, respaced_timesteps
from .timeline import chrome_trace, draw

log = logging.getLogger("moedit.run")

# [Note: one report per error]
# An error every rank hits alike (a bad plan, model, checkpoint, label, argument or --out)
# is printed by rank 0 alone, without a traceback. The other ranks do not exit first:
# torchrun stops every rank as soon as one fails, which could kill rank 0 before it has
# printed. They wait for torchrun to stop them, and print the error themselves only if it
# does not (rank 0 did not fail the same way).
REPORT_WAIT_S = 10.0


def _rank() -> int:
    """This process's rank under torchrun (0 outside it), known before any process group exists."""
    return int(os.environ.get("RANK", "0"))


def _let_rank_0_report() -> None:
    """On ranks other than 0, give torchrun time to stop this rank (see [Note: one report per error])."""
    if _rank() != 0:
        time.sleep(REPORT_WAIT_S)


def _refuse(err) -> int:
    """Report a user error once (see [Note: one report per error]); returns the exit status, 2."""
    _let_rank_0_report()
    print(f"moedit.run: error{f' on rank {_rank()}' if _rank() else ''}: {err}", file=sys.stderr)
    return 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors too: see [Note: one report per error]
        _let_rank_0_report()
        super().error(message)


def check_out(out: str) -> None:
    """Create the --out folder and write a file in it, so that a folder no one can write
    fails before any work; raises ValueError saying what to give instead."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder; give a folder path (it is created if missing)")
    try:
        os.makedirs(out, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create or write to it ({err.strerror}); give a folder you can "
                         "write to") from None


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
    parser = _Parser(prog="python -m moedit.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="digits", help=f"{NAMES_HELP} (default: digits; `moedit models` lists "
                        "each with its size)")
    parser.add_argument("--checkpoint", help="state-dict file to load into a reference config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a reference config's DiT argument, e.g. --set depth=12 (repeatable)")
    parser.add_argument("--plan", required=True, help="plan file (YAML or JSON), e.g. examples/plans/sync_ep.yaml")
    parser.add_argument("--out", required=True, help="folder for samples.png, timings.json and explain.txt "
                        "(created if missing; checked before any work)")
    parser.add_argument("--sampler", choices=list(SAMPLERS), help="rectified flow, or DDPM / DDIM "
                        "(Gaussian diffusion) (default: the model's: ddpm for S and B, else rflow)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's: 250 for S and B, 50 for "
                        "XL and G, the shipped model's, else 25)")
    parser.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default: the shipped "
                        "model's, else 1.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-images", type=int, default=20, help="images, labels cycling through the classes")
    parser.add_argument("--labels", type=int, nargs="+", help="explicit class labels (overrides --num-images)")
    parser.add_argument("--timeline", action="store_true", help="record every compute region and exchange; write "
                        "timeline.json (Chrome trace: open in Perfetto) and timeline.png under --out")
    return parser.parse_args(argv)


def check_labels(labels: list[int], num_classes: int) -> None:
    bad = [label for label in labels if not 0 <= label < num_classes]
    if bad:
        raise ValueError(f"--labels {bad}: this model's classes are 0..{num_classes - 1}")


def caption(args, labels: list[int], world_size: int) -> str:
    """The line under samples.png: what made these images."""
    return (f"{args.model}, {os.path.basename(args.plan)} on {world_size} rank(s), {args.sampler} {args.steps} "
            f"steps, cfg {args.cfg_scale:g}, seed {args.seed}; labels {' '.join(map(str, labels))}")


def main(argv=None) -> int:
    args = parse_args(argv)
    defaults = sampling_defaults(args.model)
    args.sampler = defaults["sampler"] if args.sampler is None else args.sampler
    args.steps = defaults["steps"] if args.steps is None else args.steps
    args.cfg_scale = defaults["cfg_scale"] if args.cfg_scale is None else args.cfg_scale
    logging.basicConfig(level=logging.INFO,
                        format=f"[rank {os.environ.get('RANK', '0')}] %(asctime)s %(name)s: %(message)s")
    if args.model in PRETRAINED and args.sampler != defaults["sampler"] and _rank() == 0:
        log.warning("--sampler %s: %s was trained for %s sampling, so expect noise, not images", args.sampler,
                    args.model, defaults["sampler"])
    try:
        if _rank() == 0:  # the only rank that writes
            check_out(args.out)
        if args.steps < 1 or args.num_images < 1:
            raise ValueError(f"--steps ({args.steps}) and --num-images ({args.num_images}) must be at least 1")
        if args.sampler != "rflow":
            respaced_timesteps(args.steps)  # Gaussian diffusion takes at most its training steps
        plan = moedit.Plan.from_file(args.plan)
        model = load_model(args.model, args.checkpoint, **parse_overrides(args.set))
        labels = args.labels or [i % model.config.num_classes for i in range(args.num_images)]
        check_labels(labels, model.config.num_classes)
        compiled = moedit.compile(model, plan)
        runtime = compiled.to_runtime(profile=args.timeline)
    except (moedit.PlanError, moedit.TraceError, CheckpointError, ValueError, TypeError, FileNotFoundError) as err:
        return _refuse(err)
    try:
        start = time.perf_counter()
        images = runtime.sample(labels, steps=args.steps, cfg_scale=args.cfg_scale, seed=args.seed,
                                sampler=args.sampler)
        total = time.perf_counter() - start
        spans = runtime.timeline() if args.timeline else None
        if runtime.rank == 0:
            timings = _timings(args, plan, runtime, labels, total)
            written = _write(args, compiled, runtime, labels, images, spans, timings)
            log.info("%d images in %.2f s (median step %.1f ms); wrote %s", len(labels), total,
                     1e3 * timings["median_step_s"], ", ".join(written))
    except (ValueError, TypeError) as err:  # what Runtime.sample refuses, before any exchange, alike on every rank
        return _refuse(err)
    except (CollectiveError, FloatingPointError, MemoryError) as err:
        print(f"moedit.run: error: {err}", file=sys.stderr)
        return 1
    finally:
        runtime.close()
    return 0


def _timings(args, plan, runtime, labels, total: float) -> dict:
    return {
        "model": args.model, "plan": args.plan, "plan_settings": plan.to_dict(),
        "world_size": runtime.world_size, "device": str(runtime.device),
        "backend": torch.distributed.get_backend(), "torch": torch.__version__,
        "host": platform.node(), "cpu_count": os.cpu_count(),
        "images": len(labels), "sampler": args.sampler, "steps": args.steps, "cfg_scale": args.cfg_scale,
        "seed": args.seed,
        "total_s": total, "step_s": runtime.step_times, "blocked_s": runtime.blocked_times,
        "blocked_by_exchange_s": runtime.blocked_by,
        "sent_bytes": runtime.sent_bytes,
        "median_step_s": sorted(runtime.step_times)[len(runtime.step_times) // 2],
        "programs": [kind.name for kind in runtime.step_log],
        "cache_peak_bytes": runtime.state.cache.peak_bytes,
    }


def _write(args, compiled, runtime, labels, images, spans, timings: dict) -> list[str]:
    """Rank 0's files under --out; returns their paths."""
    path = {name: os.path.join(args.out, name) for name in ("samples.png", "explain.txt", "images.pt",
                                                            "timings.json", "timeline.json", "timeline.png")}
    save_grid(images, path["samples.png"], columns=10, scale=4, caption=caption(args, labels, runtime.world_size))
    with open(path["explain.txt"], "w") as f:
        f.write(compiled.explain(batch_size=len(labels), steps=args.steps) + "\n")
    torch.save(images, path["images.pt"])
    with open(path["timings.json"], "w") as f:
        json.dump(timings, f, indent=1)
    if spans is None:
        return [path[name] for name in ("samples.png", "explain.txt", "images.pt", "timings.json")]
    chrome_trace(spans, path["timeline.json"])
    draw(spans, path["timeline.png"], steps=range(1, min(3, args.steps)),
         title=f"{os.path.basename(args.plan)}, {runtime.world_size} ranks")
    return list(path.values())


if __name__ == "__main__":
    sys.exit(main())
