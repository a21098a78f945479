"""GPU acceptance: every CUDA-only path of moedit, run and checked in one command.

    python benchmarks/gpu_check.py [--save]

Checks, each PASS, FAIL or SKIP (never PASS for what did not run):

    kernels          the Triton kernels (permute, unpermute, grouped SwiGLU) compiled for the
                     GPU against their torch references at DiT-MoE-S shapes in bfloat16, timed
    compiled step    one denoising call of S/2-8E2A (random weights, bfloat16 on CUDA, float32
                     on a CPU) compiled on 1 rank against the eager model
    offload          the ScMoE offload plan on 1 rank against the same plan without offloading
                     (exact), and on CUDA its pinned host memory released by close()
    copy stream      a side-stream host->device copy overlapping compute, read from a profiler
                     trace (as offloading's copy stream and NCCL's stream run beside compute)
    nccl timeline    a 1-rank NCCL runtime's profiled timeline: its exchanges have spans

Without CUDA it says so, runs the CPU side of "compiled step" and "offload" and reports the
rest as SKIP. Exits 1 if any check fails. Prints a table; with --save writes
benchmarks/results/gpu_check.json. Expected run time: see RUN_TIME.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import torch

import moedit
from _launch import machine
from real_models import randomise
from moedit.models import load_model, pretrained
from moedit.runtime.timeline import COMPUTE

RUN_TIME = "about 3 min on an H100 (8 at most); without CUDA about 30 s on a 2-core CPU"
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"


def check_kernels(cuda: bool) -> tuple[str, str]:
    if not cuda:
        return SKIP, "no CUDA (the tests check the kernels under Triton's interpreter)"
    from kernel_times import kernel_rows

    rows = kernel_rows("S/2-8E2A", 2 * 8 * 256, 20, torch.device("cuda"), torch.bfloat16)
    worst = max(r["max_abs_error"] for r in rows)
    detail = "; ".join(f"{r['op']}: torch {r['torch_ms']:.3f} ms, triton {r['triton_ms']:.3f} ms" for r in rows)
    return (PASS if worst <= 5e-2 else FAIL), f"max |diff| {worst:.1e} (bf16); {detail}"


def check_compiled_step(cuda: bool) -> tuple[str, str]:
    device, dtype, tolerance = ("cuda", torch.bfloat16, 3e-2) if cuda else ("cpu", torch.float32, 1e-5)
    model = randomise(load_model("S/2-8E2A")).to(device, dtype)
    x, t, y = (v.to(device) for v in model.example_inputs(8))
    x = x.to(dtype)
    with torch.no_grad():
        eager = model(x, t, y).float()
        with moedit.compile(model, moedit.Plan()).to_runtime(device=device) as runtime:
            got = runtime.denoise(x, t, y).float()
    relative = ((got - eager).norm() / eager.norm()).item()
    return (PASS if relative <= tolerance else FAIL), f"rel. L2 to eager {relative:.1e} ({dtype}, kernels auto)"


def check_offload(cuda: bool) -> tuple[str, str]:
    device = "cuda" if cuda else "cpu"
    plan = moedit.Plan.from_file("examples/plans/scmoe_offload.yaml").to_dict()
    plan["expert_parallel"]["degree"] = 1
    plan["offload"]["resident_experts"] = 8
    without = {key: value for key, value in plan.items() if key != "offload"}
    model = pretrained("digits-scmoe").to(device)
    labels = [0, 1, 2, 3]
    images, pinned = [], None
    for settings in (without, plan):
        with moedit.compile(model, moedit.Plan(**settings)).to_runtime(device=device) as runtime:
            images.append(runtime.sample(labels, steps=4, cfg_scale=1.5, seed=0, progress=False))
        if cuda and settings is plan and hasattr(torch.cuda, "host_memory_stats"):
            torch.cuda.synchronize()
            pinned = torch.cuda.host_memory_stats().get("allocated_bytes.all.current")
    difference = (images[0] - images[1]).abs().max().item()
    detail = f"max |diff| to the plan without offloading {difference:.1e}"
    if pinned is not None:
        detail += f"; pinned host memory held after close: {pinned / 2**20:.1f} MiB"
    ok = difference <= 1e-5 and (pinned is None or pinned < 2**20)
    return (PASS if ok else FAIL), detail


def check_copy_stream(cuda: bool) -> tuple[str, str]:
    if not cuda:
        return SKIP, "no CUDA"
    from kernel_times import overlap_row

    row = overlap_row(torch.device("cuda"))
    return (PASS if row["overlapped_share"] >= 0.5 else FAIL), (
        f"{row['copy_ms']:.2f} ms of copies, {row['overlapped_share']:.0%} under compute on another stream")


def check_nccl_timeline(cuda: bool) -> tuple[str, str]:
    if not cuda:
        return SKIP, "no CUDA"
    model = randomise(load_model("tiny")).to("cuda")
    plan = moedit.Plan(runtime={"backend": "nccl"})
    with moedit.compile(model, plan).to_runtime(device="cuda", profile=True) as runtime:
        runtime.sample([0, 1, 2, 3], steps=3, cfg_scale=1.5, seed=0, progress=False)
        spans = runtime.timeline()
    exchanges = [s for s in spans if s.lane != COMPUTE]
    ok = bool(exchanges) and all(s.end >= s.start for s in exchanges)
    return (PASS if ok else FAIL), f"{len(spans)} spans, {len(exchanges)} on exchange lanes"


CHECKS = {"kernels": check_kernels, "compiled step": check_compiled_step, "offload": check_offload,
          "copy stream": check_copy_stream, "nccl timeline": check_nccl_timeline}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/gpu_check.json")
    args = parser.parse_args()
    print(f"expected run time: {RUN_TIME}", flush=True)
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else "no CUDA device: the CUDA checks are skipped"
    print(device, flush=True)
    rows = []
    for name, check in CHECKS.items():
        start = time.perf_counter()
        try:
            status, detail = check(cuda)
        except Exception as err:  # a check that breaks is a failed check, and the others still run
            status, detail = FAIL, f"{type(err).__name__}: {err}"
            traceback.print_exc()
        rows.append({"check": name, "status": status, "detail": detail, "seconds": time.perf_counter() - start})
        print(f"  {name}: {status} ({rows[-1]['seconds']:.1f} s) {detail}", flush=True)
    print(f"\n{device}; {machine()}\n| check | status | s | detail |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row['check']} | {row['status']} | {row['seconds']:.1f} | {row['detail']} |")
    if args.save:
        with open("benchmarks/results/gpu_check.json", "w") as f:
            json.dump({"machine": machine(), "device": device, "rows": rows}, f, indent=1)
        print("wrote benchmarks/results/gpu_check.json")
    return 1 if any(row["status"] == FAIL for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
