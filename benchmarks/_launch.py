"""Run `python -m moedit.run` under torchrun with a plan, and read back what it wrote."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import traceback

import torch
import yaml

from moedit.planner.calibrate import probe
from moedit.plan import read_mapping
from moedit.runtime.netns import LinkError, ShapedLink, free_port


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, gloo"


def load_plan(path: str, world: int | None = None) -> dict:
    """A plan file as a dict (read as `moedit.Plan.from_file` reads it), its expert-parallel degree
    set to `world` if given."""
    plan = read_mapping(path, "plan")
    if world is not None:
        plan["expert_parallel"] = {**plan.get("expert_parallel", {}), "degree": world}
    return plan


def shaped_link(kind: str, script: str, rate: str = "400mbit") -> ShapedLink | None:
    """The shaped link a benchmark asked for (`--link shaped`), not made yet, or None for
    loopback. A machine that cannot make it (no root, no iproute2) ends `script` with
    status 2, saying why."""
    if kind != "shaped":
        return None
    problem = ShapedLink.check()
    if problem:
        print(f"{script}: {problem}", file=sys.stderr)
        raise SystemExit(2)
    return ShapedLink(rate=rate)


@contextlib.contextmanager
def made(link: ShapedLink | None, script: str):
    """Make `link` (if any) for the block and remove it after; a failure to make it ends
    `script` with status 2."""
    if link is None:
        yield
        return
    try:
        with link:
            yield
    except LinkError as err:
        print(f"{script}: could not make the shaped link: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def torchrun_commands(args: list[str], world: int, env: dict, link=None) -> list[tuple[list[str], dict]]:
    """(command, environment) pairs that run `args` (a script or `-m module`, with its flags) on
    `world` ranks: one standalone torchrun, or with `link` (a ShapedLink) one torchrun node per
    namespace (`--nnodes=2`), half the ranks in each, so every exchange between the halves crosses it."""
    launcher = [sys.executable, "-m", "torch.distributed.run"]
    if link is None or world == 1:
        return [(launcher + ["--standalone", f"--nproc_per_node={world}", *args], env)]
    port = str(free_port())
    return [(link.exec(i, launcher + ["--nnodes=2", f"--node_rank={i}", f"--nproc_per_node={world // 2}",
                                      f"--master_addr={link.addresses[0]}", f"--master_port={port}", *args]),
             {**env, **link.env(i)}) for i in range(2)]


def worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The hidden flags with which `launch_worker` re-runs a benchmark as one torchrun worker."""
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one plan, under torchrun
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)


@contextlib.contextmanager
def reporting_errors(out: str):
    """In a worker: an exception is written to OUT/error_rank<R>.txt (its line, then the
    traceback), for `launch_worker` to report, and raised."""
    try:
        yield
    except Exception as err:
        with open(os.path.join(out, f"error_rank{os.environ.get('RANK', '0')}.txt"), "w") as f:
            f.write(f"{type(err).__name__}: {err}\n\n{traceback.format_exc()}")
        raise


def launch_worker(script: str, model: str, plan, world: int, steps: int, *, tensors: dict[str, str],
                  timeout_s: float, link=None) -> dict:
    """Run `script --worker` (see `worker_arguments`) for `plan` on `world` ranks (across `link`, if
    given, as `torchrun_commands`); rank 0's result.json with `tensors` ({key: file name}) loaded from
    the files it wrote, or {"error": ...}: the first rank's error file (`reporting_errors`), else
    torchrun's exit status and the end of its stderr."""
    with tempfile.TemporaryDirectory() as tmp:
        args = [os.path.abspath(script), "--worker", "--model", model, "--plan", json.dumps(plan), "--steps",
                str(steps), "--out", tmp]
        commands = torchrun_commands(args, world, {**os.environ, "OMP_NUM_THREADS": "1"}, link)
        procs = [subprocess.Popen(cmd, env=cmd_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for cmd, cmd_env in commands]
        try:
            outputs = [proc.communicate(timeout=timeout_s) for proc in procs]
        except subprocess.TimeoutExpired:
            for proc in procs:
                proc.kill()
            return {"error": f"timed out after {timeout_s} s"}
        errors = sorted(f for f in os.listdir(tmp) if f.startswith("error_rank"))
        if errors:
            with open(os.path.join(tmp, errors[0])) as f:
                text = f.read()
            return {"error": text.split("\n\n")[0].strip(), "traceback": text, "rank": errors[0][10:-4]}
        failed = next((i for i, proc in enumerate(procs) if proc.returncode != 0), None)
        if failed is not None:
            stderr = outputs[failed][1]
            return {"error": f"torchrun exited with {procs[failed].returncode}: {stderr[-2000:]}",
                    "stderr": stderr[-4000:]}
        with open(os.path.join(tmp, "result.json")) as f:
            result = json.load(f)
        for key, name in tensors.items():
            result[key] = torch.load(os.path.join(tmp, name))
    return result


def run_plan(plan: dict, world: int, *, model: str = "digits", steps: int = 20, images: int = 16,
             cfg_scale: float = 1.5, seed: int = 0, extra_args: tuple = (), verbose: bool = False,
             link=None, timeline: str | None = None, name: str = "plan") -> dict:
    """Sample under `plan` on `world` CPU ranks (each with cpu_count // world threads).
    With `link` (a ShapedLink), half the ranks run in each of its two namespaces, so every
    exchange between the halves crosses the shaped link. With `timeline` (a folder), the
    run records a timeline and its Chrome trace and PNG are copied there.
    Returns timings.json plus the images as "images"."""
    threads = max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = os.path.join(tmp, re.sub(r"[^\w.=@,-]+", "_", name) + ".yaml")  # its name titles the timeline
        with open(plan_file, "w") as f:
            yaml.safe_dump(plan, f)
        args = ["-m", "moedit.run", "--model", model, "--plan", plan_file, "--out", tmp, "--steps", str(steps),
                "--num-images", str(images), "--cfg-scale", str(cfg_scale), "--seed", str(seed), *extra_args]
        if timeline:
            args.append("--timeline")
        if link is not None and world % 2:
            raise ValueError(f"the shaped link splits the ranks over two namespaces; {world} ranks do not split")
        commands = torchrun_commands(args, world, {**os.environ, "OMP_NUM_THREADS": str(threads)}, link)
        procs = [subprocess.Popen(cmd, env=cmd_env, stdout=None if verbose else subprocess.PIPE,
                                  stderr=None if verbose else subprocess.PIPE, text=True) for cmd, cmd_env in commands]
        outputs = [proc.communicate() for proc in procs]
        for proc, (cmd, _), (_, err) in zip(procs, commands, outputs):
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{(err or '')[-4000:]}")
        with open(os.path.join(tmp, "timings.json")) as f:
            result = json.load(f)
        result["images"] = torch.load(os.path.join(tmp, "images.pt"))
        if timeline:
            os.makedirs(timeline, exist_ok=True)
            for name in ("timeline.json", "timeline.png"):
                shutil.copy(os.path.join(tmp, name), os.path.join(timeline, name))
    result["threads_per_rank"] = threads
    return result


def link_throughput(link, size_bytes: int) -> dict:
    """Sustained throughput and small-message latency of 2-rank all-to-alls of `size_bytes`
    (to the other rank) over `link` (a ShapedLink) or, with None, loopback."""
    return probe(2, size_bytes, link=link)


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def show(spread: dict, fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(spread['median'])} [{fmt.format(spread['min'])}-{fmt.format(spread['max'])}]"


def plan_of(spec: str, world: int | None = None, profile: str | None = None) -> dict:
    """"dice" is examples/plans/dice.yaml; "dice@schedule.policy=overlap,expert_parallel.chunks=2" also
    sets those fields; a value "PROFILE" stands for the timeline of the profiling run (--profile).
    `world`: the expert-parallel degree (None: the file's)."""
    name, _, settings = spec.partition("@")
    plan = load_plan(os.path.join("examples", "plans", f"{name}.yaml"), world)
    for item in filter(None, settings.split(",")):
        path, _, value = item.partition("=")
        *sections, key = path.split(".")
        target = plan
        for section in sections:
            target = target.setdefault(section, {})
        if value == "PROFILE" and profile is None:
            raise SystemExit(f"{spec}: PROFILE needs --profile")
        target[key] = profile if value == "PROFILE" else yaml.safe_load(value)
    return plan
