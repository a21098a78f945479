"""Whole diffusers pipelines under `moedit.parallelize`: time per image at 1 and 2 ranks, and
the transformer's share of it, beside the eager pipeline.

    python benchmarks/pipelines.py [--models hidream nucleus] [--rounds 3] [--steps 10] [--save]

Expected run time: about 4 min on a 2-core CPU with the defaults.

* Pipelines: diffusers' HiDreamImagePipeline and NucleusMoEImagePipeline, unmodified, with the
  transformers of benchmarks/real_models.py (HiDream-I1 18.9 M and NucleusMoE-Image 25.2 M
  parameters, random float32 weights, 256 image tokens), a tiny random VAE (64 x 64 images)
  and no text encoders: the prompt and the negative prompt come as embeddings (16 tokens),
  which both pipelines accept in place of text. Guidance 3 (CFG: HiDream batches the two
  halves into one transformer call, NucleusMoE makes two calls a step), `--steps` steps of
  the flow-matching Euler scheduler, one image per call.
* Rows: eager (the pipeline as diffusers runs it, one process); single (moedit, 1 rank);
  at 2 ranks sync_ep, ulysses (Ulysses 2 with experts over both ranks) and dice (interweaved
  staleness, the deep half synchronous, conditional communication every 2nd step where the
  model allows it: not NucleusMoE's expert choice). Plans from examples/plans/ with the
  expert-parallel degree set to the world size.
* Each row runs as `torchrun --standalone --nproc_per_node=N` of this script's worker mode
  (OMP_NUM_THREADS=1, one torch thread per rank, gloo on loopback). The worker calls the
  pipeline once untimed (moedit captures and compiles the transformer there: "first call"),
  then once timed: "s/image" is the slowest rank's wall time of `pipe(...)`; "transformer"
  the time inside the transformer's calls, and its share. The table gives the median
  [min-max] over `--rounds` rounds, the rows alternating within each round.
* Images: the timed call's images (`output_type="pt"`) against the eager pipeline's: max
  |diff| for exact plans, relative L2 error for dice.

Prints the table; with --save writes benchmarks/results/pipelines.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
RUN_TIME = "about 4 min on a 2-core CPU with the defaults"
ROWS = [("eager", 1), ("single", 1), ("sync_ep", 2), ("ulysses", 2), ("dice", 2)]
STALE = {"dice"}
TEXT_TOKENS = 16
LAUNCH_TIMEOUT_S = 600


def pipeline(name: str):
    """The pipeline around real_models.py's transformer `name`, a tiny random VAE, no text encoders."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, HiDreamImagePipeline, NucleusMoEImagePipeline
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import AutoencoderKLQwenImage
    from real_models import build, randomise

    if name == "hidream":
        vae = randomise(AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                      up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 16),
                                      layers_per_block=1, latent_channels=16, norm_num_groups=4, shift_factor=0.1))
        pipe = HiDreamImagePipeline(FlowMatchEulerDiscreteScheduler(), vae, *[None] * 8, build(name))
        pipe.default_sample_size = 32  # HiDream scales every image to this area: 64 x 64 pixels, 32 x 32 latents
    else:
        vae = randomise(AutoencoderKLQwenImage(base_dim=16, z_dim=16, dim_mult=[1, 1], num_res_blocks=1,
                                               temperal_downsample=[False], latents_mean=[0.0] * 16,
                                               latents_std=[1.0] * 16))
        pipe = NucleusMoEImagePipeline(build(name), FlowMatchEulerDiscreteScheduler(), vae, None, None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt(name: str) -> dict:
    """The prompt and negative prompt as embeddings, one image."""
    from real_models import HIDREAM, NUCLEUS

    gen = torch.Generator().manual_seed(1)
    embeddings = {}
    for side in ("", "negative_"):
        if name == "hidream":
            t5, llama = HIDREAM["caption_channels"]
            embeddings |= {f"{side}prompt_embeds_t5": torch.randn(1, TEXT_TOKENS, t5, generator=gen),
                           f"{side}prompt_embeds_llama3": torch.randn(len(HIDREAM["llama_layers"]), 1, TEXT_TOKENS,
                                                                      llama, generator=gen),
                           f"{side}pooled_prompt_embeds": torch.randn(1, HIDREAM["text_emb_dim"], generator=gen)}
        else:
            embeddings |= {f"{side}prompt_embeds": torch.randn(1, TEXT_TOKENS, NUCLEUS["joint_attention_dim"],
                                                               generator=gen),
                           f"{side}prompt_embeds_mask": torch.ones(1, TEXT_TOKENS, dtype=torch.bool)}
    return embeddings


def plan_for(model: str, row: str, world: int) -> dict | None:
    """moedit.Plan keyword arguments of `row`; None for the eager pipeline."""
    from _launch import plan_of

    if row == "eager":
        return None
    if row == "single":
        return {}
    plan = plan_of("ulysses@expert_parallel.degree=2" if row == "ulysses" else row, world)
    if model == "nucleus":
        plan.pop("conditional_comm", None)  # expert choice: refused (see real_models.py's dice row)
    return plan


# --- the worker (one row, under torchrun) ---------------------------------------------------

def worker(args) -> int:
    import torch.distributed as dist
    from _launch import reporting_errors

    import moedit

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    with reporting_errors(args.out):
        plan = json.loads(args.plan)
        pipe = pipeline(args.model)
        if plan is not None:
            pipe = moedit.parallelize(pipe, moedit.Plan(**plan))
        inside = [0.0]
        model_call = type(pipe.transformer).__call__

        def timed(module, *a, **kw):
            start = time.perf_counter()
            try:
                return model_call(module, *a, **kw)
            finally:
                inside[0] += time.perf_counter() - start

        type(pipe.transformer).__call__ = timed  # (a throwaway process: patch the class)
        embeddings = prompt(args.model)

        def run():
            generator = torch.Generator().manual_seed(0)
            return pipe(**embeddings, num_inference_steps=args.steps, guidance_scale=3.0, output_type="pt",
                        generator=generator, **({"height": 64, "width": 64} if args.model == "nucleus" else {})).images

        started = time.perf_counter()
        run()
        first = time.perf_counter() - started
        if dist.is_initialized():
            dist.barrier()
        inside[0], started = 0.0, time.perf_counter()
        images = run()
        measured = (time.perf_counter() - started, inside[0], first)
        every = [measured]
        if dist.is_initialized():
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, measured)
        if rank == 0:
            torch.save(images, os.path.join(args.out, "images.pt"))
            with open(os.path.join(args.out, "result.json"), "w") as f:
                json.dump({"image_s": max(m[0] for m in every), "transformer_s": max(m[1] for m in every),
                           "first_s": max(m[2] for m in every)}, f)
    return 0


def launch(model: str, plan: dict | None, world: int, steps: int) -> dict:
    from _launch import launch_worker

    return launch_worker(__file__, model, plan, world, steps, tensors={"images": "images.pt"},
                         timeout_s=LAUNCH_TIMEOUT_S)


# --- the driver -----------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    from _launch import show, spread

    lines = [f"{'model':8} {'plan':8} {'ranks':>5} {'s/image':>18} {'transformer s':>18} {'share':>6} "
             f"{'first call s':>13} {'speed-up':>9} {'vs eager':>16}"]
    eager = {r["model"]: statistics.median(run["image_s"] for run in r["runs"]) for r in rows
             if r["name"] == "eager" and r["runs"]}
    for r in rows:
        runs = r["runs"]
        if not runs:
            lines.append(f"{r['model']:8} {r['name']:8} {r['world']:>5}  error: {r.get('error')}")
            continue
        image, inside = spread([run["image_s"] for run in runs]), spread([run["transformer_s"] for run in runs])
        share = statistics.median(run["transformer_s"] / run["image_s"] for run in runs)
        first = statistics.median(run["first_s"] for run in runs)
        lines.append(f"{r['model']:8} {r['name']:8} {r['world']:>5} {show(image, '{:.2f}'):>18} "
                     f"{show(inside, '{:.2f}'):>18} {share:>6.0%} {first:>13.1f} "
                     f"{eager[r['model']] / image['median']:>8.2f}x {r['vs_eager']:>16}")
    return "\n".join(lines)


def main() -> int:
    from _launch import worker_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["hidream", "nucleus"], default=["hidream", "nucleus"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/pipelines.json")
    worker_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    os.chdir(ROOT)  # the plans are read from examples/plans/
    from _launch import machine

    print(f"expected run time: {RUN_TIME}", flush=True)
    rows = [{"model": model, "name": name, "world": world, "plan": plan_for(model, name, world), "runs": []}
            for model in args.models for name, world in ROWS]
    started = time.perf_counter()
    for i in range(args.rounds):
        for r in rows[i % len(rows):] + rows[:i % len(rows)]:
            result = launch(r["model"], r["plan"], r["world"], args.steps)
            if "error" in result:
                r["error"] = result["error"]
                print(f"  round {i + 1}, {r['model']} {r['name']}: {result['error']}", flush=True)
                continue
            r["images"] = result.pop("images")
            r["runs"].append(result)
            print(f"  round {i + 1}, {r['model']} {r['name']} ({r['world']} rank(s)): {result['image_s']:.2f} s/image",
                  flush=True)
    eager = {r["model"]: r.get("images") for r in rows if r["name"] == "eager"}
    for r in rows:
        reference, got = eager[r["model"]], r.pop("images", None)
        if got is None or reference is None:
            r["vs_eager"] = "-"
        elif r["name"] in STALE:
            r["vs_eager"] = f"rel L2 {float((got - reference).norm() / reference.norm()):.1e}"
        else:
            r["vs_eager"] = f"max {float((got - reference).abs().max()):.1e}"
    text = table(rows)
    print(f"\n{machine()}; {args.steps} steps, 1 image (CFG), {args.rounds} rounds, "
          f"{time.perf_counter() - started:.0f} s\n{text}")
    if args.save:
        path = os.path.join(ROOT, "benchmarks", "results", "pipelines.json")
        with open(path, "w") as f:
            json.dump({"machine": machine(), "steps": args.steps, "rounds": args.rounds, "rows": rows,
                       "table": text}, f, indent=1)
        print(f"wrote {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
