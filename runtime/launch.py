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
import contextlib
import ctypes
import json
import logging
import math
import os
import platform
import signal
import sys
import tempfile
import time
import warnings

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
        self.exit(2, f"moedit.run: error: {message} (python -m moedit.run --help lists the arguments)\n")


OUTPUTS = ("samples.png", "explain.txt", "images.pt", "timings.json", "timeline.json", "timeline.png")


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


def clear_out(out: str) -> None:
    """Remove what an earlier run wrote under --out, once this run's input is accepted: a refused
    command (a typo in the plan) leaves the earlier files alone, and a run that starts and then
    fails leaves no files that look like its own."""
    for name in OUTPUTS:
        if os.path.isfile(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


def parse_overrides(items: list[str]) -> dict:
    """["depth=12", "learn_sigma=false"] -> {"depth": 12, "learn_sigma": False}."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set needs KEY=VALUE, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"--set {item}: the value is not a YAML number, boolean or string ({problem}); "
                             f"e.g. --set {key}=12") from None
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


MAX_STEPS = 10_000
MAX_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed


def check_args(args) -> None:
    """Numbers that would overflow, run for days or mean nothing, refused naming the argument."""
    if not 1 <= args.steps <= MAX_STEPS:
        raise ValueError(f"--steps {args.steps}: give 1 to {MAX_STEPS}")
    if args.labels is None and args.num_images < 1:
        raise ValueError(f"--num-images {args.num_images}: give at least 1")
    if not 0 <= args.seed <= MAX_SEED:
        raise ValueError(f"--seed {args.seed}: give 0 to 2**63 - 1")
    if not math.isfinite(args.cfg_scale) or args.cfg_scale < 0:
        raise ValueError(f"--cfg-scale {args.cfg_scale}: give a finite scale >= 0 (1 means no guidance)")


def check_memory(model, images: int) -> None:
    """Refuse, with the figure, a run whose weights and batch cannot fit in this machine's free
    memory, before allocating them: weights from `model` (built on the meta device), and per image
    with CFG its latents, output and the activations of one block's widest step, a rough bound."""
    cfg = model.config
    tokens = (cfg.input_size // cfg.patch_size) ** 2
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    per_image = 4 * (2 * tokens * cfg.hidden_size * (8 + 4 * cfg.num_experts_per_tok) + 2 * cfg.num_heads * tokens ** 2
                     + 4 * cfg.in_channels * cfg.input_size ** 2)
    needed, free = weights + images * per_image, _free_memory()
    if free is not None and needed > free:
        raise ValueError(f"{images} images of {cfg.input_size}x{cfg.input_size} with a {weights / 2**30:.2f} GiB model "
                         f"need about {needed / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free here; give "
                         "fewer images (--num-images, --labels) or a smaller model (--set)")


def _free_memory() -> int | None:
    """Bytes of memory this machine can give (Linux: MemAvailable, which counts reclaimable caches;
    else the free pages), or None if the system does not say."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def exit_with_launcher() -> None:
    """Linux: have the kernel end this worker when its launcher dies (torchrun killed with SIGKILL
    cannot stop its workers itself), so no rank runs on orphaned."""
    if sys.platform != "linux" or "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun's workers only
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv=None) -> int:
    exit_with_launcher()
    # moedit's own warnings (a plan that runs but gains nothing, say) as one line, not Python's two
    warnings.formatwarning = lambda message, category, *_, **__: (
        f"moedit.run: warning: {message}\n" if issubclass(category, UserWarning) else f"{category.__name__}: {message}\n")
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print(f"moedit.run: interrupted{f' on rank {_rank()}' if _rank() else ''}", file=sys.stderr)
        return 130


def _main(argv=None) -> int:
    args = parse_args(argv)
    created = []  # the folders rank 0 creates for --out (check_out), the deepest first
    path = os.path.abspath(args.out)
    while _rank() == 0 and path != os.path.dirname(path) and not os.path.exists(path):
        created.append(path)
        path = os.path.dirname(path)
    code = 1
    try:
        code = _run(args)
        return code
    finally:
        if code != 0:  # a failed run leaves no empty folders behind (nor files: see clear_out)
            with contextlib.suppress(OSError):
                for folder in created:
                    os.rmdir(folder)


def _run(args) -> int:
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
        check_args(args)
        if args.sampler != "rflow":
            respaced_timesteps(args.steps)  # Gaussian diffusion takes at most its training steps
        plan = moedit.Plan.from_file(args.plan)
        overrides = parse_overrides(args.set)
        try:
            shapes = load_model(args.model, device="meta", **overrides)  # no memory: sizes only
        except (ValueError, TypeError) as err:
            raise ValueError(f"--set {' '.join(args.set)}: {err}" if overrides else err) from None
        check_memory(shapes, len(args.labels or ()) or args.num_images)
        model = load_model(args.model, args.checkpoint, **overrides)
        labels = args.labels or [i % model.config.num_classes for i in range(args.num_images)]
        check_labels(labels, model.config.num_classes)
        compiled = moedit.compile(model, plan)
        runtime = compiled.to_runtime(profile=args.timeline)
        if _rank() == 0:
            clear_out(args.out)
    except (moedit.PlanError, moedit.TraceError, CheckpointError, ValueError, TypeError, FileNotFoundError,
            OverflowError) as err:
        return _refuse(err)
    except CollectiveError as err:  # the ranks did not come together
        print(f"moedit.run: error: {err}", file=sys.stderr)
        return 1
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
    except OSError as err:  # writing the outputs (a full disk, a folder removed): nothing partial is left
        print(f"moedit.run: error: could not write the outputs under --out {args.out} ({err.strerror or err}); "
              "the images were not saved", file=sys.stderr)
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
    """Rank 0's files under --out, each written whole or not at all (`_atomic`); returns their paths."""
    path = {name: os.path.join(args.out, name) for name in OUTPUTS}
    with _atomic(path["samples.png"]) as tmp:
        save_grid(images, tmp, columns=10, scale=4, caption=caption(args, labels, runtime.world_size))
    with _atomic(path["explain.txt"]) as tmp, open(tmp, "w") as f:
        f.write(compiled.explain(batch_size=len(labels), steps=args.steps) + "\n")
    with _atomic(path["images.pt"]) as tmp:
        torch.save(images, tmp)
    with _atomic(path["timings.json"]) as tmp, open(tmp, "w") as f:
        json.dump(timings, f, indent=1)
    if spans is None:
        return [path[name] for name in ("samples.png", "explain.txt", "images.pt", "timings.json")]
    with _atomic(path["timeline.json"]) as tmp:
        chrome_trace(spans, tmp)
    with _atomic(path["timeline.png"]) as tmp:
        draw(spans, tmp, steps=range(1, min(3, args.steps)), title=f"{os.path.basename(args.plan)}, "
             f"{runtime.world_size} ranks")
    return list(path.values())


@contextlib.contextmanager
def _atomic(path: str):
    """Yield a temporary name beside `path` to write; rename it to `path` once written, so that a
    killed or failed run never leaves a partial file under the final name. (The temporary name
    keeps the extension: savers pick the format by it.)"""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.partial{os.path.splitext(name)[1]}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


if __name__ == "__main__":
    sys.exit(main())
