"""moedit's plans on the two real MoE-DiTs diffusers ships, HiDream-I1 and NucleusMoE-Image
(unmodified diffusers classes, small random float32 configs), beside one rank: step time,
speed-up and agreement with the eager model, with the simulator's prediction per row.

    python benchmarks/real_models.py [--link loopback|shaped] [--models hidream nucleus] [--worlds 1 2 4] [--rounds 3] [--steps 10] [--save]

Expected run time: about 12 min on a 2-core CPU with the defaults (both models, 1, 2 and 4
ranks, 3 rounds, 10 steps); `--worlds 1 2` about 7 min. Most of it is starting each plan's
processes and capturing the model (7 s a launch at 1 rank, 12 s at 2, 20 s at 4), not the steps.

* Models (configs HIDREAM and NUCLEUS below): HiDream-I1, 2 double- and 4 single-stream blocks of
  width 192 (4 heads), 8 routed experts top-2 plus the shared one, a 32x32x16 latent
  (256 image tokens) and 16+16 text tokens per Llama/T5 stream (18.9 M parameters);
  NucleusMoE-Image, 6 blocks of width 256 (4 query / 2 K/V heads), all MoE, 8 experts
  chosen by expert choice (capacity 2), 256 image tokens of 64 packed channels, 16 text
  tokens (25.2 M parameters). One eager call on a batch of 2 takes ~100 ms on one core.
* Sampling: a batch of 2 (one image with CFG: the latents twice, the text differing), a
  flow-matching Euler loop of 1 + `--steps` steps with guidance 2, timesteps falling from 1
  (x1000 for HiDream) as the two pipelines pass them, the output negated as they do.
  The first step is a warm-up, untimed (compiling captured the model before it); one
  sample (`reset(steps=1 + --steps)`) holds all steps, so the stale plans' first step is
  the warm-up and every timed step is a stale step where the plan makes it one.
* Plans (moedit.Plan keyword arguments, read from examples/plans/ with the expert-parallel
  degree set to the world size, see `_launch.plan_of`): 1 rank: single; 2 ranks: sync_ep,
  ulysses, ring, patch_parallel (DistriFusion, warm-up 1), pipefusion (2 stages, 4 patches,
  warm-up 1, every stage holding all its blocks' experts), dice (interweaved staleness,
  warm-up 1, the deep half of the MoE layers synchronous, conditional communication every
  2nd step); 4 ranks: sync_ep, usp (Ulysses 2 x Ring 2), patch_parallel, pipefusion 4 (4
  stages of the 6 blocks). NucleusMoE routes by expert choice, which conditional_comm refuses, so its
  dice row runs without conditional_comm (the row says so).
* Each plan runs as `torchrun --standalone --nproc_per_node=N` of this script's worker
  mode, OMP_NUM_THREADS=1 and one torch thread per rank (4 ranks share the 2 cores: the
  4-rank rows show oversubscription, not a speed-up), over gloo on loopback, or with
  `--link shaped` (as root) half the ranks in each of two network namespaces joined by a
  400 Mbit/s veth (`torchrun --nnodes=2`; the 1-rank row stays on loopback).
* Step time: per step the slowest rank's wall time of `runner.denoise` (the sampler's
  arithmetic included), the mean of the timed steps per run; the table gives the median
  [min-max] over `--rounds` rounds, the plans alternating within each round (the first one
  rotating). Blocked: time waiting on exchanges, the same way. Speed-up: single's median
  over the plan's.
* Agreement: the final step's output against the eager diffusers model run through the
  same loop in this process: max |diff| for exact plans (must be <= 1e-4, marked FAIL
  otherwise), relative L2 error for stale ones (dice).
* Predicted: `moedit.planner.simulate.replay` + `simulate` of the same compiled plan with the
  `cpu-local` profile (`moedit calibrate`), or, where replay or the profile cannot serve,
  the exact error instead.

A plan that fails to compile or run keeps its row, with the error. Prints the table; with
--save writes benchmarks/results/real_models.json.
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
RUN_TIME = ("about 12 min on a 2-core CPU with the defaults (both models, 1, 2 and 4 ranks, 3 rounds, "
            "10 steps); --worlds 1 2 about 7 min")
BATCH = 2  # one image with CFG
GUIDANCE = 2.0
LAUNCH_TIMEOUT_S = 900

# --- the models -----------------------------------------------------------------------------

HIDREAM = dict(patch_size=2, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=48,
               num_attention_heads=4, caption_channels=[32, 32], text_emb_dim=32, num_routed_experts=8,
               num_activated_experts=2, axes_dims_rope=(12, 18, 18), max_resolution=(64, 64),
               llama_layers=list(range(6)))  # one Llama layer per block
HIDREAM_LATENT = (16, 32, 32)  # channels, height, width: 16 x 16 = 256 image tokens after 2x2 patches
NUCLEUS = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=6, attention_head_dim=64,
               num_attention_heads=4, num_key_value_heads=2, joint_attention_dim=32, axes_dims_rope=(16, 24, 24),
               dense_moe_strategy="all_moe", num_experts=8, moe_intermediate_dim=512, capacity_factors=2.0)
NUCLEUS_GRID = (16, 16)  # packed latent grid: 256 image tokens of 64 channels (16 latent channels x 2 x 2)
TEXT_TOKENS = 16


@torch.no_grad()
def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Seeded random weights everywhere (diffusers zero-initialises some output layers, and a
    comparison through a zero layer proves nothing): matrices randn * 0.5 / sqrt(fan_in),
    vectors randn * 0.1."""
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.copy_(torch.randn(param.shape, generator=gen) * (0.5 * param.shape[-1] ** -0.5 if param.dim() > 1
                                                               else 0.1))
    return model.eval()


def build(name: str) -> torch.nn.Module:
    import moedit.models.diffusers_adapters  # noqa: F401  (registers moedit's adapters for diffusers' classes)

    if name == "hidream":
        from diffusers.models.transformers.transformer_hidream_image import HiDreamImageTransformer2DModel

        return randomise(HiDreamImageTransformer2DModel(**HIDREAM))
    from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoEImageTransformer2DModel

    return randomise(NucleusMoEImageTransformer2DModel(**NUCLEUS))


def initial(name: str) -> tuple[torch.Tensor, dict]:
    """One image's initial latents and the CFG batch's fixed inputs (cond and uncond text)."""
    gen = torch.Generator().manual_seed(1)
    if name == "hidream":
        latents = torch.randn(1, *HIDREAM_LATENT, generator=gen)
        text = dict(encoder_hidden_states_t5=torch.randn(BATCH, TEXT_TOKENS, HIDREAM["caption_channels"][0],
                                                         generator=gen),
                    encoder_hidden_states_llama3=torch.randn(len(HIDREAM["llama_layers"]), BATCH, TEXT_TOKENS,
                                                             HIDREAM["caption_channels"][1], generator=gen),
                    pooled_embeds=torch.randn(BATCH, HIDREAM["text_emb_dim"], generator=gen))
        return latents, text
    height, width = NUCLEUS_GRID
    latents = torch.randn(1, height * width, NUCLEUS["in_channels"], generator=gen)
    text = dict(img_shapes=[(1, height, width)] * BATCH,
                encoder_hidden_states=torch.randn(BATCH, TEXT_TOKENS, NUCLEUS["joint_attention_dim"], generator=gen))
    return latents, text


def call(name: str, latents: torch.Tensor, text: dict, sigma: float) -> dict:
    """The transformer's keyword arguments for one step at noise level `sigma` (HiDream's
    pipeline passes the timestep t = 1000 sigma, NucleusMoE's t / 1000 = sigma)."""
    batch = latents.expand(BATCH, *latents.shape[1:]).contiguous()
    if name == "hidream":
        return dict(hidden_states=batch, timesteps=torch.full((BATCH,), 1000 * sigma), **text, return_dict=False)
    return dict(hidden_states=batch, timestep=torch.full((BATCH,), sigma), **text, return_dict=False)


BATCH_DIMS = {"hidream": {"encoder_hidden_states_llama3": 1}, "nucleus": None}  # HiDream: [layers, B, n, C]


def sigmas(steps: int) -> list[float]:
    return torch.linspace(1, 0, steps + 1).tolist()


def euler(latents: torch.Tensor, out: torch.Tensor, sigma: float, next_sigma: float) -> torch.Tensor:
    """One flow-matching Euler step with CFG; both pipelines negate the transformer's output."""
    uncond, cond = (-out).chunk(2)
    return latents + (next_sigma - sigma) * (uncond + GUIDANCE * (cond - uncond))


@torch.no_grad()
def eager_final(name: str, steps: int) -> torch.Tensor:
    """The eager diffusers model's output at the last of `steps` steps of the same loop."""
    model = build(name)
    latents, text = initial(name)
    levels = sigmas(steps)
    for i in range(steps):
        out = model(**call(name, latents, text, levels[i]))[0]
        latents = euler(latents, out, levels[i], levels[i + 1])
    return out


# --- the plans ------------------------------------------------------------------------------

PLANS = {  # world -> row names (examples/plans/<name>.yaml; the expert-parallel degree is the world size)
    1: ["single"],
    2: ["sync_ep", "ulysses", "ring", "patch_parallel", "pipefusion", "dice"],
    4: ["sync_ep", "usp", "patch_parallel", "pipefusion 4"],
}
SPECS = {  # row name -> plan spec (benchmarks/_launch.py's plan_of), where it is not the name
    "pipefusion": "pipefusion@expert_parallel.degree=1",  # 2 stages, each with all its blocks' experts
    "pipefusion 4": "pipefusion@pipefusion.degree=4,expert_parallel.degree=1",
}
STALE = {"dice", "patch_parallel", "pipefusion", "pipefusion 4"}  # rows compared by relative L2 error; the others
# must equal the eager model


def plan_for(model: str, name: str, world: int) -> tuple[dict, str]:
    """moedit.Plan keyword arguments of `name` at `world` ranks for `model`, and a note. A plan
    with conditional_comm that the model refuses (NucleusMoE: expert choice) runs without it;
    the note quotes the refusal."""
    import moedit
    from _launch import plan_of

    if name == "single":
        return {}, ""
    plan = plan_of(SPECS.get(name, name), world)
    if "conditional_comm" in plan:
        latents, text = initial(model)
        try:
            moedit.compile(build(model), moedit.Plan(**plan), example_inputs=call(model, latents, text, 1.0),
                           batch_dims=BATCH_DIMS[model]).graph(world - 1)
        except moedit.PlanError as err:
            if not str(err).startswith("conditional_comm"):
                raise
            del plan["conditional_comm"]
            return plan, f"without conditional_comm, refused: PlanError: {err}"
    return plan, ""


# --- the worker (one plan, under torchrun) --------------------------------------------------

def worker(args) -> int:
    import torch.distributed as dist
    from _launch import reporting_errors

    import moedit

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    with reporting_errors(args.out):
        plan = json.loads(args.plan)
        name, steps = args.model, 1 + args.steps
        latents, text = initial(name)
        levels = sigmas(steps)
        compiled = moedit.compile(build(name), moedit.Plan(**plan), example_inputs=call(name, latents, text, 1.0),
                                  batch_dims=BATCH_DIMS[name])
        times, blocked = [], []
        with compiled.to_runtime() as runner:
            runner.reset(steps=steps)
            dist.barrier()
            for i in range(steps):
                inputs = call(name, latents, text, levels[i])
                start, waited = time.perf_counter(), runner.state.blocked_s
                out = runner.denoise(**inputs)[0]
                latents = euler(latents, out, levels[i], levels[i + 1])
                times.append(time.perf_counter() - start)
                blocked.append(runner.state.blocked_s - waited)
            every = [None] * dist.get_world_size()
            dist.all_gather_object(every, (times, blocked))
        if rank == 0:
            torch.save(out, os.path.join(args.out, "final.pt"))
            with open(os.path.join(args.out, "result.json"), "w") as f:
                json.dump({"step_s": [max(t[i] for t, _ in every) for i in range(steps)],
                           "blocked_s": [max(b[i] for _, b in every) for i in range(steps)],
                           "kinds": [str(k) for k in runner.step_log]}, f)
    return 0


def launch(model: str, plan: dict, world: int, steps: int, link=None) -> dict:
    """Run `plan` on `world` ranks (across `link`, if given); the worker's result, plus "final" (the
    last step's output), or {"error": ...}."""
    from _launch import launch_worker

    return launch_worker(__file__, model, plan, world, steps, tensors={"final": "final.pt"},
                         timeout_s=LAUNCH_TIMEOUT_S, link=link)


# --- the simulator --------------------------------------------------------------------------

def predicted(model: str, plan: dict, steps: int, hardware) -> dict:
    """The simulator's mean step time for `plan`, or the exact error that stopped it."""
    import moedit
    from moedit.planner.simulate import replay, simulate

    try:
        latents, text = initial(model)
        compiled = moedit.compile(build(model), moedit.Plan(**plan), example_inputs=call(model, latents, text, 1.0),
                                  batch_dims=BATCH_DIMS[model])
        replayed = replay(compiled, BATCH)
    except Exception as err:  # noqa: BLE001 - the row reports it
        return {"error": f"{type(err).__name__}: {err}"}
    if isinstance(hardware, str):
        return {"error": hardware}
    try:
        p = simulate(replayed, hardware, steps=1 + steps)
    except Exception as err:  # noqa: BLE001
        return {"error": f"{type(err).__name__}: {err}"}
    return {"ms": 1e3 * p.mean_step_s, "blocked_ms": 1e3 * p.exposed_comm_s}


# --- the driver -----------------------------------------------------------------------------

def measure(args, rows: list[dict], link=None) -> None:
    """Fill every row's "runs", the plans of each model alternating within each round."""
    for round_index in range(args.rounds):
        for model in args.models:
            mine = [r for r in rows if r["model"] == model]
            shift = round_index % len(mine)
            for r in mine[shift:] + mine[:shift]:
                started = time.perf_counter()
                result = launch(model, r["plan"], r["world"], args.steps, link)
                wall = time.perf_counter() - started
                if "error" in result:
                    r.setdefault("errors", []).append(result)
                    print(f"  round {round_index + 1}, {model} {r['name']}: {result['error']} ({wall:.0f} s)",
                          flush=True)
                    continue
                timed = slice(1, None)  # step 0 is the warm-up
                r["runs"].append({"step_ms": 1e3 * statistics.mean(result["step_s"][timed]),
                                  "blocked_ms": 1e3 * statistics.mean(result["blocked_s"][timed]),
                                  "steps_ms": [1e3 * s for s in result["step_s"]], "kinds": result["kinds"],
                                  "launch_s": wall})
                ref = r["_reference"]
                diff = result["final"] - ref
                r["max_abs_diff"] = max(r.get("max_abs_diff", 0.0), diff.abs().max().item())
                r["rel_l2"] = max(r.get("rel_l2", 0.0), (diff.norm() / ref.norm()).item())
                print(f"  round {round_index + 1}, {model} {r['name']} ({r['world']} rank(s)): "
                      f"{r['runs'][-1]['step_ms']:.1f} ms/step, max |diff| {r['max_abs_diff']:.1e} "
                      f"({wall:.0f} s with start-up)", flush=True)


def summarise(rows: list[dict]) -> None:
    from _launch import spread

    for r in rows:
        r.pop("_reference", None)
        if r["runs"]:
            r["measured_ms"] = spread([run["step_ms"] for run in r["runs"]])
            r["blocked"] = spread([run["blocked_ms"] for run in r["runs"]])
        if "errors" in r:
            r["error"] = r["errors"][0]["error"]
        if "max_abs_diff" in r:
            r["agrees"] = None if r["stale"] else r["max_abs_diff"] <= 1e-4  # stale: reported, not judged
        pred = r["predicted"]
        if "ms" in pred and "measured_ms" in r:
            pred["error"] = pred["ms"] / r["measured_ms"]["median"] - 1
    for model in {r["model"] for r in rows}:
        single = next((r for r in rows if r["model"] == model and r["name"] == "single" and "measured_ms" in r), None)
        for r in rows:
            if r["model"] == model and single is not None and "measured_ms" in r:
                r["speedup"] = single["measured_ms"]["median"] / r["measured_ms"]["median"]


def print_rows(rows: list[dict]) -> None:
    """The table; notes and prediction errors, which are long, as numbered footnotes."""
    from _launch import show

    footnotes: list[str] = []

    def ref(text: str) -> str:
        if text not in footnotes:
            footnotes.append(text)
        return f"[{footnotes.index(text) + 1}]"

    print(f"{'model':<9}{'plan':<16}{'ranks':>6}{'step ms':>24}{'blocked ms':>22}{'speed-up':>10}"
          f"{'vs eager':>20}  {'predicted':>16}")
    for r in rows:
        label = r["name"] + (f" {ref(r['note'])}" if r["note"] else "")
        if "measured_ms" not in r:
            print(f"{r['model']:<9}{label:<16}{r['world']:>6}   failed: {r.get('error', 'not run')}")
            continue
        if r["stale"]:
            agree = f"rel L2 {r['rel_l2']:.1e}"
        else:
            agree = f"max {r['max_abs_diff']:.1e}{'' if r['agrees'] else ' FAIL'}"
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"  # no single row measured
        pred = r["predicted"]
        pred = f"{pred['ms']:.1f} ({pred['error']:+.0%})" if "ms" in pred else f"error {ref(pred['error'])}"
        print(f"{r['model']:<9}{label:<16}{r['world']:>6}{show(r['measured_ms']):>24}{show(r['blocked']):>22}"
              f"{speedup:>10}{agree:>20}  {pred:>16}")
    for i, text in enumerate(footnotes, 1):
        print(f"[{i}] {text}")


def main() -> int:
    from _launch import worker_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=["hidream", "nucleus"], default=["hidream", "nucleus"])
    parser.add_argument("--worlds", nargs="+", type=int, choices=sorted(PLANS), default=sorted(PLANS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps, after one warm-up step")
    parser.add_argument("--link", choices=["loopback", "shaped"], default="loopback",
                        help="shaped: half the ranks in each of two network namespaces joined by a 400 Mbit/s "
                             "veth (as root)")
    parser.add_argument("--save", action="store_true", help="write benchmarks/results/real_models_<link>.json")
    worker_arguments(parser)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    os.chdir(ROOT)  # the plans are read from examples/plans/
    from _launch import machine, made, shaped_link
    from moedit.planner.costs import Hardware, HardwareError

    print(f"expected run time: {RUN_TIME}", flush=True)
    try:
        hardware = Hardware.load("cpu-local")
    except HardwareError as err:
        hardware = f"HardwareError: {err}"
    rows = []
    for model in args.models:
        reference = eager_final(model, 1 + args.steps)
        for world in args.worlds:
            for name in PLANS[world]:
                plan, note = plan_for(model, name, world)
                rows.append({"model": model, "name": name, "world": world, "plan": plan, "note": note,
                             "stale": name in STALE, "runs": [], "_reference": reference,
                             "predicted": predicted(model, plan, args.steps, hardware)})
                print(f"  predicted {model} {name} ({world} rank(s)): "
                      f"{rows[-1]['predicted'].get('ms', rows[-1]['predicted'].get('error'))}", flush=True)
    started = time.perf_counter()
    link = shaped_link(args.link, "real_models.py")
    with made(link, "real_models.py"):
        measure(args, rows, link)
    summarise(rows)
    wall = time.perf_counter() - started
    where = "loopback gloo" if link is None else f"gloo over {link.describe()} (1-rank rows on loopback)"
    print(f"\n{where}; {machine()}; OMP_NUM_THREADS=1 per rank; batch {BATCH} (one image with CFG), "
          f"1 warm-up + {args.steps} timed steps; {args.rounds} alternating round(s); measured in {wall / 60:.1f} min")
    print_rows(rows)
    if args.save:
        out = os.path.join("benchmarks", "results", f"real_models_{args.link}.json")
        with open(out, "w") as f:
            json.dump({"machine": machine(), "link": where, "profile": "cpu-local", "rounds": args.rounds,
                       "steps": args.steps, "batch": BATCH, "guidance": GUIDANCE, "models": {"hidream": HIDREAM,
                       "nucleus": NUCLEUS}, "rows": rows}, f, indent=1, default=str)
        print(f"wrote {out}")
    failed = [r for r in rows if r.get("agrees") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
