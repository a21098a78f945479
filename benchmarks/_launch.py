"""Run `python -m moedit.run` under torchrun with a plan, and read back what it wrote."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile

import torch
import yaml


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, gloo"


def load_plan(path: str, world: int | None = None) -> dict:
    with open(path) as f:
        plan = yaml.safe_load(f) or {}
    if world is not None:
        plan["expert_parallel"] = {**plan.get("expert_parallel", {}), "degree": world}
    return plan


def run_plan(plan: dict, world: int, *, model: str = "digits", steps: int = 20, images: int = 16,
             cfg_scale: float = 1.5, seed: int = 0, extra_args: tuple = (), verbose: bool = False) -> dict:
    """Sample under `plan` on `world` CPU ranks (each with cpu_count // world threads).
    Returns timings.json plus the images as "images"."""
    threads = max(1, (os.cpu_count() or 1) // world)
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = os.path.join(tmp, "plan.yaml")
        with open(plan_file, "w") as f:
            yaml.safe_dump(plan, f)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
               "-m", "moedit.run", "--model", model, "--plan", plan_file, "--out", tmp, "--steps", str(steps),
               "--num-images", str(images), "--cfg-scale", str(cfg_scale), "--seed", str(seed), *extra_args]
        proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=not verbose,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stderr or '')[-4000:]}")
        with open(os.path.join(tmp, "timings.json")) as f:
            result = json.load(f)
        result["images"] = torch.load(os.path.join(tmp, "images.pt"))
    result["threads_per_rank"] = threads
    return result
