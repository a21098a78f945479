"""diffusers' own context parallelism (Ulysses and Ring) on a tiny random Flux transformer,
beside the same model on one process, with a place for moedit's rows.

    torchrun --standalone --nproc_per_node=2 benchmarks/flux_context_parallel.py \\
        [--rounds 3] [--calls 5] [--batch 1] [--no-shim] [--save]

Two ranks under gloo on the CPU, one thread per rank (torch.set_num_threads(1)). Expected run
time: about 15 s on a 2-core CPU with the defaults.

* single: `tiny_flux()` on rank 0 alone (rank 1 waits), one thread: the baseline.
* diffusers ulysses / ring: `transformer.enable_parallelism(config=ContextParallelConfig(
  ulysses_degree=2))` (or `ring_degree=2`) exactly as diffusers ships it. In diffusers 0.42.1
  this raises on a CPU before any communication (`ModelMixin._resolve_parallel_config` picks
  the device as `rank % torch.accelerator.device_count()`, and a CPU-only torch counts 0
  accelerators); the row records the exception's type, first line and where it was raised.
* diffusers ulysses / ring + shim (unless --no-shim): the same call with
  `torch.accelerator.device_count` answering 1 for the duration of `enable_parallelism` only,
  to see whether the context-parallel attention itself runs on gloo; ring once more with the
  `_native_flash` attention backend, since the default (native SDPA) one gives no log-sum-exp,
  which ring attention needs. diffusers is not modified; these rows are labelled as not what
  diffusers runs as shipped.
* moedit ulysses / ring: `moedit.compile(tiny_flux(), Plan(...), example_inputs=flux_inputs(b))`,
  see `moedit_rows` below (a failure is recorded as the row's error).

Every configuration that runs is checked against the single-process output of the same
weights on the same inputs (max |diff| over every rank's output) and timed: `--rounds`
rounds, the configurations alternating within each round (the starting one rotating), one
warm-up call then `--calls` timed calls per configuration and round, between barriers, the
slower rank's mean; the table gives the median [min-max] over rounds.

Other code imports the model and inputs from here: `tiny_flux()`, `flux_inputs(batch)`,
`TINY_FLUX` (the config), `MOEDIT_PLANS`, `moedit_step(plan, batch, stack)` (one plan: a
callable returning the output) and `moedit_rows(plans, batch, stack)` (all of them, errors as rows).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import statistics
import sys
import time
import traceback
from typing import Callable
from unittest import mock

import torch
import torch.distributed as dist

# The tiny config: 4 heads of 64 (inner dim 256), 3 double-stream and 6 single-stream blocks,
# 13.4 M parameters; one call on 256 image + 16 text tokens takes ~65 ms on one core.
TINY_FLUX = dict(
    patch_size=1,
    in_channels=16,
    num_layers=3,
    num_single_layers=6,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=32,
    pooled_projection_dim=16,
    guidance_embeds=False,
    axes_dims_rope=(16, 24, 24),  # sums to attention_head_dim
)
LATENT_SIDE = 16   # packed latent grid: 16 x 16 = 256 image tokens (FluxPipeline's height // 2 x width // 2)
TEXT_TOKENS = 16
RUN_TIME = "about 15 s on a 2-core CPU with the defaults"

# moedit's plans for the same comparison (moedit.Plan keyword arguments). Flux has no MoE
# layer, so no expert parallelism: the image's tokens are split, the text replicated.
MOEDIT_PLANS = {
    "moedit ulysses": {"sequence_parallel": {"ulysses": 2}},
    "moedit ring": {"sequence_parallel": {"ring": 2}},
}


def tiny_flux(seed: int = 0) -> "torch.nn.Module":
    """A float32 `diffusers.FluxTransformer2DModel` of TINY_FLUX in eval mode, with seeded random
    weights and no zero in any parameter (diffusers zero-initialises some output layers):
    matrices randn * 0.5 / sqrt(fan_in), vectors randn * 0.1, except normalisation gains
    (the q/k RMSNorms), 1 + randn * 0.1, so attention logits are not shrunk tenfold."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**TINY_FLUX).eval()   # float32 by default
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if p.dim() >= 2:
                p.copy_(noise * 0.5 / math.sqrt(p[0].numel()))
            elif "norm" in name and name.endswith(".weight"):
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
            assert bool((p != 0).all()), f"{name} has a zero"
    return model


def latent_image_ids(height: int, width: int) -> torch.Tensor:
    """[height * width, 3] as FluxPipeline._prepare_latent_image_ids builds them (0, row, column)."""
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(height)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def flux_inputs(batch: int = 1, seed: int = 1) -> dict:
    """Keyword arguments of one `tiny_flux()` call, as FluxPipeline makes them: packed latents
    [B, 256, 16], T5-like states [B, 16, 32], pooled CLIP-like states [B, 16], a timestep in
    (0, 1) per image (the pipeline passes t / 1000), img_ids [256, 3], txt_ids zeros [16, 3],
    and return_dict=False (the call returns a 1-tuple)."""
    gen = torch.Generator().manual_seed(seed)
    cfg = TINY_FLUX
    return dict(
        hidden_states=torch.randn(batch, LATENT_SIDE * LATENT_SIDE, cfg["in_channels"], generator=gen),
        encoder_hidden_states=torch.randn(batch, TEXT_TOKENS, cfg["joint_attention_dim"], generator=gen),
        pooled_projections=torch.randn(batch, cfg["pooled_projection_dim"], generator=gen),
        timestep=torch.rand(batch, generator=gen),
        img_ids=latent_image_ids(LATENT_SIDE, LATENT_SIDE),
        txt_ids=torch.zeros(TEXT_TOKENS, 3),
        return_dict=False,
    )


def error_of(err: BaseException) -> dict:
    """The exception's type, first line of its message, where it was raised (innermost frame)
    and the innermost diffusers frame, paths relative to site-packages."""
    frames = traceback.extract_tb(err.__traceback__)

    def where(frame) -> str:
        path = frame.filename
        for marker in ("site-packages/", "/work/main/"):
            if marker in path:
                path = path.split(marker, 1)[1]
        return f"{path}:{frame.lineno} in {frame.name}"

    message = str(err).strip().splitlines()
    out = {"type": f"{type(err).__module__}.{type(err).__qualname__}".removeprefix("builtins."),
           "message": message[0] if message else "", "raised_at": where(frames[-1]) if frames else None}
    in_diffusers = [f for f in frames if "/diffusers/" in f.filename]
    if in_diffusers:
        out["diffusers_frame"] = where(in_diffusers[-1])
    return out


def agree(ok: bool, err: BaseException | None) -> dict | None:
    """Every rank's outcome: None if every rank succeeded, else the first failing rank's error."""
    mine = None if ok else {**error_of(err), "rank": dist.get_rank()}
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, mine)
    failed = [o for o in outcomes if o is not None]
    return failed[0] if failed else None


# --- diffusers -----------------------------------------------------------------------------

@contextlib.contextmanager
def device_count_shim():
    """torch.accelerator.device_count() answers 1 (not 0) on a CPU-only torch, so diffusers'
    `rank % device_count()` picks cpu:0 instead of dividing by zero. Nothing in diffusers changes."""
    with mock.patch.object(torch.accelerator, "device_count", lambda: 1):
        yield


def diffusers_step(kind: str, shim: bool, batch: int, backend: str | None = None) -> Callable[[], torch.Tensor]:
    """A call of tiny_flux() under diffusers' context parallelism of `kind` ("ulysses" or
    "ring", degree = world size), returning the whole output on every rank. `backend`: an
    attention backend set with `set_attention_backend` first (default: diffusers' active one,
    "native", i.e. torch SDPA)."""
    from diffusers import ContextParallelConfig

    world = dist.get_world_size()
    model = tiny_flux()
    if backend is not None:
        # set_attention_backend also makes `backend` diffusers' process-wide active backend, which
        # every model whose processors name none (all the others here) would then use: put it back.
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        active = _AttentionBackendRegistry.get_active_backend()[0]
        try:
            model.set_attention_backend(backend)
        finally:
            _AttentionBackendRegistry.set_active_backend(active)
    config = ContextParallelConfig(**{f"{kind}_degree": world})
    with device_count_shim() if shim else contextlib.nullcontext():
        model.enable_parallelism(config=config)
    inputs = flux_inputs(batch)

    def step() -> torch.Tensor:
        return model(**inputs)[0]

    return step


# --- moedit: its rows go here ---------------------------------------------------------------

def moedit_step(plan: dict, batch: int, stack: contextlib.ExitStack) -> Callable[[], torch.Tensor]:
    """A call of tiny_flux() compiled by moedit under `plan` (moedit.Plan keyword arguments),
    returning the whole output on every rank. The runtime stays open until `stack` closes.

    Today this raises: moedit needs at least one MoE layer (compiler/tracer.py, `annotate`:
    "... has no MoE layer moedit recognises ...") and Flux has none; Flux's attention under
    sequence parallelism is being added. The rows then carry the error."""
    import moedit
    import moedit.models.diffusers_adapters  # noqa: F401 - registers moedit's adapters for diffusers' classes

    model = tiny_flux()
    inputs = flux_inputs(batch)
    compiled = moedit.compile(model, moedit.Plan(**plan), example_inputs=inputs,
                              batch_dims={"img_ids": None, "txt_ids": None})   # [N, 3]: no batch axis
    runner = stack.enter_context(compiled.to_runtime())
    runner.prepare(**inputs)

    def step() -> torch.Tensor:
        return runner.denoise(**inputs)[0]

    return step


def moedit_rows(plans: dict[str, dict], batch: int, stack: contextlib.ExitStack) -> tuple[dict, list[dict]]:
    """moedit's configurations: ({name: step} for those that compile and start, [error rows]
    for those that do not, as "moedit: <error>")."""
    steps, errors = {}, []
    for name, plan in plans.items():
        step, err = None, None
        try:
            step = moedit_step(plan, batch, stack)
        except Exception as caught:  # noqa: BLE001 - the row reports it
            err = caught
        failed = agree(err is None, err)
        if failed is None:
            steps[name] = step
        else:
            errors.append({"name": name, "ranks": dist.get_world_size(), "plan": plan,
                           "status": f"moedit: {failed['type']}: {failed['message'][:200]}", "error": failed})
    return steps, errors


# --- measuring ------------------------------------------------------------------------------

def max_diff(step: Callable[[], torch.Tensor], reference: torch.Tensor) -> float:
    with torch.no_grad():
        out = step()
    diff = torch.tensor([(out - reference).abs().max().item() if out.shape == reference.shape else float("inf")])
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def timed(step: Callable[[], torch.Tensor] | None, calls: int) -> float:
    """Seconds per call, one warm-up call first: the slower rank's mean over `calls` calls
    between barriers. A rank with `step` None waits (the single-process baseline)."""
    with torch.no_grad():
        if step is not None:
            step()
        dist.barrier()
        start = time.perf_counter()
        if step is not None:
            for _ in range(calls):
                step()
        elapsed = time.perf_counter() - start
        dist.barrier()
    seconds = torch.tensor([elapsed / calls if step is not None else 0.0], dtype=torch.float64)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    return seconds.item()


def single_step(model, inputs: dict, rank: int) -> Callable[[], torch.Tensor] | None:
    """The single-process baseline: rank 0 runs the whole model, the other ranks wait."""
    if rank != 0:
        return None
    return lambda: model(**inputs)[0]


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "all": values}


def show(s: dict) -> str:
    return f"{s['median']:.1f} [{s['min']:.1f}-{s['max']:.1f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=5, help="timed calls per configuration and round")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-shim", action="store_true", help="skip the device_count-shimmed diffusers rows")
    parser.add_argument("--save", action="store_true",
                        help="write the results to benchmarks/results/flux_context_parallel.json (rank 0)")
    parser.add_argument("--out", default=None, help="or write them here")
    args = parser.parse_args()

    torch.set_num_threads(1)
    if "RANK" not in os.environ:
        print("launch with: torchrun --standalone --nproc_per_node=2 benchmarks/flux_context_parallel.py",
              file=sys.stderr)
        return 2
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        print(f"expected run time: {RUN_TIME}", flush=True)

    import diffusers
    import platform

    inputs = flux_inputs(args.batch)
    single = tiny_flux()
    with torch.no_grad():
        reference = single(**inputs)[0]

    rows: list[dict] = []
    steps: dict[str, Callable[[], torch.Tensor] | None] = {"single": single_step(single, inputs, rank)}
    rows.append({"name": "single", "ranks": 1, "status": "ran", "max_abs_diff": 0.0})
    variants = [(kind, False, None) for kind in ("ulysses", "ring")]
    if not args.no_shim:
        # Ring needs the attention's log-sum-exp, which the native (SDPA) backend does not give;
        # _native_flash is the one other SDPA-based backend that supports context parallelism.
        variants += [("ulysses", True, None), ("ring", True, None), ("ring", True, "_native_flash")]
    for kind, shim, backend in variants:
        name = f"diffusers {kind}" + (" + device_count shim" if shim else "") + (f", {backend}" if backend else "")
        row = {"name": name, "ranks": world, "config": f"ContextParallelConfig({kind}_degree={world})",
               "attention_backend": backend or "native (default)", "device_count_shim": shim}
        step, err, diff = None, None, None
        try:
            step = diffusers_step(kind, shim, args.batch, backend)
        except Exception as caught:  # noqa: BLE001 - the row reports it
            err = caught
        failed = agree(err is None, err)
        if failed is None:  # enable_parallelism went through; the first call may still fail
            try:
                diff = max_diff(step, reference)
            except Exception as caught:  # noqa: BLE001
                err = caught
            failed = agree(err is None, err)
            row["failed_in"] = None if failed is None else "the first forward call"
        else:
            row["failed_in"] = "set_attention_backend / enable_parallelism"
        if failed is None:
            row.update(status="ran", max_abs_diff=diff)
            steps[name] = step
        else:
            row.update(status=f"error: {failed['type']}: {failed['message'][:200]}", error=failed)
        rows.append(row)

    with contextlib.ExitStack() as stack:
        moedit_steps, moedit_errors = moedit_rows(MOEDIT_PLANS, args.batch, stack)
        for name, step in moedit_steps.items():
            rows.append({"name": name, "ranks": world, "plan": MOEDIT_PLANS[name], "status": "ran",
                         "max_abs_diff": max_diff(step, reference)})
            steps[name] = step
        rows += moedit_errors

        names = list(steps)
        times = {name: [] for name in names}
        for round_index in range(args.rounds):
            order = names[round_index % len(names):] + names[:round_index % len(names)]
            for name in order:
                times[name].append(1e3 * timed(steps[name], args.calls))
            if rank == 0:
                print(f"  round {round_index + 1}: " + ", ".join(f"{n} {times[n][-1]:.1f} ms" for n in names),
                      flush=True)
    for row in rows:
        if row["name"] in times:
            row["step_ms"] = spread(times[row["name"]])
    base = statistics.median(times["single"])
    for row in rows:
        if "step_ms" in row:
            row["speedup_vs_single"] = base / row["step_ms"]["median"]

    if rank == 0:
        params = sum(p.numel() for p in single.parameters())
        results = {
            "machine": f"{platform.node()}: {os.cpu_count()} CPUs ({platform.machine()}), torch {torch.__version__}, "
                       f"diffusers {diffusers.__version__}, gloo",
            "command": "torchrun --standalone --nproc_per_node=2 benchmarks/flux_context_parallel.py "
                       + " ".join(sys.argv[1:]),
            "model": {"class": "diffusers.FluxTransformer2DModel", "config": TINY_FLUX, "parameters": params,
                      "dtype": "float32", "weights": "tiny_flux(seed=0)"},
            "inputs": {"batch": args.batch, "image_tokens": LATENT_SIDE ** 2, "text_tokens": TEXT_TOKENS,
                       "builder": "flux_inputs(batch, seed=1)", "output_max_abs": reference.abs().max().item(),
                       "output_std": reference.std().item()},
            "threads_per_rank": torch.get_num_threads(), "world": world, "rounds": args.rounds,
            "timed_calls_per_round": args.calls,
            "notes": ["single: rank 0 alone, one thread, while rank 1 waits in a barrier",
                      "step_ms: per round, the slower rank's mean of the timed calls after one warm-up; median, "
                      "min, max over rounds in which the configurations alternate",
                      "max_abs_diff: against single's output (same weights, same inputs), max over ranks",
                      "rows with device_count_shim true are not diffusers as shipped: torch.accelerator."
                      "device_count is made to answer 1 while enable_parallelism runs (diffusers unmodified)",
                      "error.message is the first line of the exception's message (the status column may cut it)"],
            "rows": rows,
        }
        print(f"\ntiny Flux ({params / 1e6:.1f} M parameters, {TINY_FLUX['num_layers']}+"
              f"{TINY_FLUX['num_single_layers']} blocks, {TINY_FLUX['num_attention_heads']}x"
              f"{TINY_FLUX['attention_head_dim']} heads), batch {args.batch}, {LATENT_SIDE ** 2}+{TEXT_TOKENS} tokens; "
              f"{results['machine']}; 1 thread per rank; {args.rounds} alternating rounds of {args.calls} calls")
        print(f"{'configuration':<52}{'ranks':>6}{'step ms':>24}{'speed-up':>10}{'max |diff|':>12}  status")
        for r in rows:
            step = show(r["step_ms"]) if "step_ms" in r else "-"
            speed = f"{r['speedup_vs_single']:.2f}x" if "speedup_vs_single" in r else "-"
            diff = f"{r['max_abs_diff']:.1e}" if r.get("max_abs_diff") is not None else "-"
            status = r["status"] if r["status"] == "ran" else r["status"][:160]
            print(f"{r['name']:<52}{r['ranks']:>6}{step:>24}{speed:>10}{diff:>12}  {status}")
            if "error" in r and r["error"].get("raised_at"):
                print(f"{'':<58}raised at {r['error']['raised_at']}")
        if args.save and not args.out:
            args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "flux_context_parallel.json")
        if args.out:
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
            print(f"wrote {args.out}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
