"""Triton kernels against their torch references (moedit/runtime/kernels), at DiT-MoE-S and
-XL shapes, and a 1-rank compiled model step against the eager model.

    python benchmarks/kernel_times.py [--images 8] [--repeats 20] [--save]

(Not `kernels.py`: a script's folder comes first on sys.path, and a file of that name would
shadow Hugging Face's `kernels` package, which diffusers imports, for every script here.)

On a CUDA device: times from CUDA events, median of `--repeats` after warm-up, for permute
(row gather), unpermute (weighted sum), the grouped SwiGLU experts of one MoE layer (every
local expert, EP 1), and one denoising call of the whole model (S/2-8E2A, random weights,
bfloat16) eager against `moedit.compile` with `kernels: triton` and `kernels: torch`; and a
stream check: how much of a side-stream copy the profiler trace shows under compute kernels.
Expected run time: ~1 min on an H100.

Without CUDA it checks each kernel against its reference under Triton's interpreter at a
small shape and times nothing: interpreter times say nothing about speed.
With --save writes benchmarks/results/kernels.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

import moedit
from _launch import machine
from moedit.models import load_model
from moedit.runtime import expert_ops
from moedit.runtime.kernels import triton_installed

SHAPES = {"S/2-8E2A": 256, "XL/2-8E2A": 256}  # model -> tokens per image (256x256 images, patch 2)
RUN_TIME = "about 1 min on an H100; without CUDA (the interpreter check) about 45 s on a 2-core CPU"


def timed(fn, repeats: int) -> float:
    """Median milliseconds of `fn()` on the current CUDA stream."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def layer_inputs(name: str, tokens: int, device, dtype):
    """One MoE layer of `name` (random weights) and a routed batch for it."""
    torch.manual_seed(0)
    model = load_model(name, depth=1).to(device, dtype)
    moe = model.blocks[0].moe
    x = torch.randn(tokens, model.config.hidden_size, device=device, dtype=dtype)
    ids, weights = moe.gate(x)
    return moe, x, ids.long(), weights


def kernel_rows(name: str, tokens: int, repeats: int, device, dtype) -> list[dict]:
    moe, x, ids, weights = layer_inputs(name, tokens, device, dtype)
    experts = list(moe.experts)
    rows, order, counts = expert_ops.permute(x, ids, 1, len(experts))
    returned = torch.randn_like(rows)
    local = expert_ops.LocalExperts(experts, list(range(len(experts))))
    fused = expert_ops.LocalExperts(experts, list(range(len(experts))), kernels="triton")
    cases = {
        "permute": (lambda: expert_ops.permute(x, ids, 1, len(experts)),
                    lambda: expert_ops.permute(x, ids, 1, len(experts), kernels="triton")),
        "unpermute": (lambda: expert_ops.unpermute(returned, order, weights),
                      lambda: expert_ops.unpermute(returned, order, weights, kernels="triton")),
        "grouped SwiGLU experts": (lambda: local(rows, counts), lambda: fused(rows, counts)),
    }
    out = []
    with torch.no_grad():
        for what, (reference, kernel) in cases.items():
            error = max((a.float() - b.float()).abs().max().item() for a, b in
                        zip(_tuple(reference()), _tuple(kernel())) if a.is_floating_point())
            row = {"model": name, "tokens": tokens, "op": what, "max_abs_error": error}
            if device.type == "cuda":
                row["torch_ms"], row["triton_ms"] = timed(reference, repeats), timed(kernel, repeats)
            out.append(row)
            print(f"  {name} {what}: {row}", flush=True)
    return out


def _tuple(value):
    return value if isinstance(value, tuple) else (value,)


def model_rows(images: int, repeats: int, device, dtype) -> list[dict]:
    """One denoising call (CFG batch) of S/2-8E2A: eager, and compiled on 1 rank both ways."""
    torch.manual_seed(0)
    model = load_model("S/2-8E2A").to(device, dtype)
    x, t, y = (v.to(device) for v in model.example_inputs(2 * images))
    x = x.to(dtype)
    rows = []
    with torch.no_grad():
        rows.append({"run": "eager", "ms": timed(lambda: model(x, t, y), repeats)})
        for kernels in ("torch", "triton"):
            compiled = moedit.compile(model, moedit.Plan(kernels=kernels))
            with compiled.to_runtime(device=device) as runtime:
                program = runtime.programs[compiled.kinds[0]]
                rows.append({"run": f"moedit, kernels: {kernels}",
                             "ms": timed(lambda: program(x, t, y, run=runtime.state), repeats)})
    return rows


def overlap_row(device) -> dict:
    """The stream check: a 256 MB pinned host->device copy on a side stream (a stand-in for an
    exchange, as offloading's copy stream and NCCL's stream run beside compute), ordered by an
    event, while matmuls run on the compute stream. From the profiler's trace: how much of the
    copy's time some compute kernel on another stream was running."""
    import os
    import tempfile

    host = torch.empty(64 * 2**20, pin_memory=True)
    buffer = torch.empty_like(host, device=device)
    a = torch.randn(4096, 4096, device=device)
    side = torch.cuda.Stream(device)

    def step():
        copied = torch.cuda.Event()
        with torch.cuda.stream(side):
            buffer.copy_(host, non_blocking=True)
            copied.record(side)
        for _ in range(8):
            a @ a
        torch.cuda.current_stream().wait_event(copied)

    step()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    spans = [(e["ts"], e["ts"] + e["dur"], e.get("args", {}).get("stream"), e.get("cat")) for e in events
             if e.get("cat") in ("kernel", "gpu_memcpy") and "dur" in e]
    copies = [s for s in spans if s[3] == "gpu_memcpy"]
    kernels = [s for s in spans if s[3] == "kernel"]
    copy_us = sum(end - start for start, end, _, _ in copies)
    covered = sum(_covered(start, end, [(s, e) for s, e, stream, _ in kernels if stream != copy_stream])
                  for start, end, copy_stream, _ in copies)
    return {"copy_ms": copy_us / 1e3, "overlapped_ms": covered / 1e3,
            "overlapped_share": covered / copy_us if copy_us else 0.0}


def _covered(start: float, end: float, intervals: list[tuple[float, float]]) -> float:
    """Length of [start, end] covered by the union of `intervals`."""
    total, reach = 0.0, start
    for s, e in sorted(intervals):
        s, e = max(s, reach), min(e, end)
        if e > s:
            total, reach = total + e - s, e
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8, help="images per batch (x2 with CFG)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/kernels.json")
    args = parser.parse_args()
    print(f"expected run time: {RUN_TIME}", flush=True)
    if not triton_installed():
        print("kernel_times.py: Triton is not installed; pip install -e \".[kernels]\"", file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    device, dtype = (torch.device("cuda"), torch.bfloat16) if cuda else (torch.device("cpu"), torch.float32)
    results = {"machine": machine(), "device": torch.cuda.get_device_name() if cuda else "cpu (interpreter)"}
    if cuda:
        results["kernels"] = [row for name, tokens in SHAPES.items()
                              for row in kernel_rows(name, 2 * args.images * tokens, args.repeats, device, dtype)]
        results["model"] = model_rows(args.images, args.repeats, device, dtype)
        results["overlap"] = overlap_row(device)
    else:
        print("no CUDA device: checking the kernels against torch under Triton's interpreter at a small shape; "
              "nothing is timed (interpreter times are not speed)")
        results["kernels"] = kernel_rows("S/2-8E2A", 64, 0, device, dtype)
    print(f"\n{results['device']}; {machine()}")
    print(f"{'model':<12}{'rows':>8}  {'op':<26}{'torch ms':>10}{'triton ms':>11}{'max |diff|':>12}")
    for r in results["kernels"]:
        times = (f"{r['torch_ms']:>10.3f}{r['triton_ms']:>11.3f}" if "torch_ms" in r else f"{'-':>10}{'-':>11}")
        print(f"{r['model']:<12}{r['tokens']:>8}  {r['op']:<26}{times}{r['max_abs_error']:>12.2e}")
    for r in results.get("model", []):
        print(f"S/2-8E2A, {2 * args.images} samples: {r['run']:<26}{r['ms']:>10.2f} ms")
    if "overlap" in results:
        o = results["overlap"]
        print(f"side-stream copy beside compute: {o['copy_ms']:.2f} ms of copies, {o['overlapped_ms']:.2f} ms of it "
              f"({o['overlapped_share']:.0%}) under compute kernels on another stream (profiler trace)")
    if args.save:
        with open("benchmarks/results/kernels.json", "w") as f:
            json.dump(results, f, indent=1)
        print("wrote benchmarks/results/kernels.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
