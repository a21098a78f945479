"""Image quality of every plan in examples/plans/ on the trained digits model.

    python benchmarks/quality.py [--seeds 0 1 2] [--images 200] [--steps 25] [--plans ...] [--name quality] [--save]
                                 [--grid-only]

A plan is a file name in examples/plans/, or one with settings as benchmarks/overlap.py takes
them ("sync_ep@expert_parallel.wire_dtype=float8"), compared with sync_ep.

Per plan and seed (each run under torchrun on the plan's own number of CPU ranks):
classifier accuracy against the requested labels, FD-digits (Fréchet distance of
classifier features to the real test digits), and relative L2 / PSNR against the
sync_ep plan's images from the same seed. Plans that need an ScMoE model (the shortcut
schedule) run on digits-scmoe and are compared with its own sync_ep row. Reports mean ± std over seeds; with
--save writes benchmarks/results/<name>.{json,md} and a side-by-side PNG <name>_plans.png (one row per plan,
named at its left, seed 0); --grid-only --save writes the PNG alone, from 20 images of the first seed. Expected run time: about 25 s per plan and seed at 25 steps on 2 CPUs (all plans: ~25 min).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

import torch
from tqdm import tqdm

import moedit
from moedit.models import metrics
from moedit.models.images import save_grid
from moedit.models.pretrained import SAMPLING

from _launch import load_plan, machine, plan_of, run_plan

BASE = "sync_ep"
SCMOE = "digits-scmoe"
RUN_TIME = "about 25 s per plan and seed on a 2-core CPU at 25 steps (every plan, 3 seeds: about 25 min)"


def _rows() -> dict[str, tuple[str, str, str]]:
    """Row name -> (model, plan, the row it is compared with). Every plan runs on `digits`, but
    the shortcut schedule, which needs an ScMoE model, runs on `digits-scmoe` and is compared
    with that model's sync_ep row."""
    names = sorted(os.path.basename(p)[:-5] for p in glob.glob("examples/plans/*.yaml"))
    rows = {BASE: ("digits", BASE, BASE)}
    scmoe_base = f"{SCMOE}: {BASE}"
    for name in names:
        shortcut = moedit.Plan(**load_plan(f"examples/plans/{name}.yaml")).shortcut
        if shortcut.enabled and not shortcut.rewrite:
            rows.setdefault(scmoe_base, (SCMOE, BASE, scmoe_base))
            rows[f"{SCMOE}: {name}"] = (SCMOE, name, scmoe_base)
        elif name != BASE:
            rows[name] = ("digits", name, BASE)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--images", type=int, default=200, help="per run; labels cycle through the 10 classes")
    parser.add_argument("--steps", type=int, default=SAMPLING["digits"]["steps"])
    parser.add_argument("--cfg-scale", type=float, default=SAMPLING["digits"]["cfg_scale"])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--plans", nargs="+", help="only these rows (names of examples/plans; the rows they are "
                        "compared with run too)")
    parser.add_argument("--name", default="quality", help="file stem of what --save writes")
    parser.add_argument("--save", action="store_true", help="write the table, the raw numbers and the PNG")
    parser.add_argument("--grid-only", action="store_true", help="only the labelled PNG: the first seed, 20 images "
                        "per plan (about 10 s a plan); with --save writes <name>_plans.png alone")
    args = parser.parse_args()
    if args.grid_only:
        args.seeds, args.images = args.seeds[:1], min(args.images, 20)
    print(f"expected run time: {RUN_TIME}", flush=True)
    rows = _rows()
    rows.update({name: ("digits", name, BASE) for name in args.plans or () if "@" in name})
    if args.plans:
        unknown = sorted(set(args.plans) - set(rows))
        if unknown:
            parser.error(f"no row {unknown}; rows: {', '.join(rows)}")
        keep = set(args.plans) | {rows[name][2] for name in args.plans}
        rows = {name: row for name, row in rows.items() if name in keep}
    names = list(rows)
    labels = torch.arange(args.images) % 10
    clf = metrics.classifier()
    real, _ = metrics.digits_dataset("test")
    images, raw = {}, {}
    bar = tqdm(total=len(rows) * len(args.seeds), desc="plans x seeds", unit="run", leave=False)
    for name, (model, plan_name, base_name) in rows.items():
        plan = plan_of(plan_name)
        world = moedit.Plan(**plan).world_size
        for seed in args.seeds:
            result = run_plan(plan, world, model=model, steps=args.steps, images=args.images,
                              cfg_scale=args.cfg_scale, seed=seed)
            batch = result["images"]
            images[name, seed] = batch
            base = images[base_name, seed]
            fd = metrics.fd_digits(batch, clf, real)
            base_fd = fd if name == base_name else raw[base_name][len(raw.get(name, []))]["fd_digits"]
            raw.setdefault(name, []).append({
                "seed": seed, "world_size": world, "accuracy": metrics.accuracy(batch, labels, clf),
                "fd_digits": fd, "fd_minus_sync": fd - base_fd,
                "rel_l2": metrics.relative_l2(batch, base), "psnr": metrics.psnr(batch, base),
            })
            bar.update()
            tqdm.write(f"  {name} seed {seed}: accuracy {raw[name][-1]['accuracy']:.3f}, "
                       f"FD {raw[name][-1]['fd_digits']:.2f}")
    bar.close()
    if args.grid_only:
        if args.save:
            path = os.path.join(args.out, f"{args.name}_plans.png")
            _save_plans_png(images, names, args, path)
            print(f"wrote {path} (rows: {', '.join(names)})")
        return
    keys = ("accuracy", "fd_digits", "fd_minus_sync", "rel_l2")
    table = {name: {key: metrics.summarize([r[key] for r in runs]) for key in keys} for name, runs in raw.items()}
    for name, runs in raw.items():
        finite = [r["psnr"] for r in runs if r["psnr"] != float("inf")]
        table[name]["psnr"] = metrics.summarize(finite) if finite else {"mean": float("inf"), "std": 0.0, "n": 0}
    reference_fd = metrics.fd_digits(metrics.digits_dataset("train")[0][: args.images], clf, real)
    lines = [f"Digits DiT-MoE, {args.images} images per run, {args.steps} steps, CFG {args.cfg_scale}, "
             f"seeds {args.seeds} (mean ± std over seeds); {machine()}.",
             f"FD-digits of {args.images} real training digits against the test split: {reference_fd:.2f}.", "",
             "FD-digits − sync_ep's is taken per seed (same seeds, same labels), so it is free of the seed-to-seed "
             f"spread of FD itself. Rows named `{SCMOE}: …` run the ScMoE model and compare with its sync_ep row.", "",
             "| plan | ranks | accuracy | FD-digits | FD − sync_ep's, paired | rel. L2 vs sync_ep "
             "| PSNR vs sync_ep (dB) |",
             "|---|---|---|---|---|---|---|"]
    for name in names:
        t, world = table[name], raw[name][0]["world_size"]
        psnr_text = "∞ (identical)" if t["psnr"]["n"] == 0 else f"{t['psnr']['mean']:.1f} ± {t['psnr']['std']:.1f}"
        lines.append(f"| {name} | {world} | {t['accuracy']['mean']:.3f} ± {t['accuracy']['std']:.3f} | "
                     f"{t['fd_digits']['mean']:.2f} ± {t['fd_digits']['std']:.2f} | "
                     f"{t['fd_minus_sync']['mean']:+.2f} ± {t['fd_minus_sync']['std']:.2f} | "
                     f"{t['rel_l2']['mean']:.4f} ± {t['rel_l2']['std']:.4f} | {psnr_text} |")
    markdown = "\n".join(lines)
    print("\n" + markdown)
    if not args.save:
        return
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, args.name)
    with open(f"{stem}.md", "w") as f:
        f.write(markdown + "\n")
    with open(f"{stem}.json", "w") as f:
        json.dump({"machine": machine(), "images": args.images, "steps": args.steps, "cfg_scale": args.cfg_scale,
                   "seeds": args.seeds, "reference_fd_digits": reference_fd, "summary": table, "runs": raw}, f,
                  indent=1)
    _save_plans_png(images, names, args, f"{stem}_plans.png")
    print(f"wrote {stem}.md, .json, _plans.png (rows: {', '.join(names)})")


def _save_plans_png(images: dict, names: list[str], args, path: str) -> None:
    """One row per plan, its name at the left: the first 20 images of the first seed."""
    shown = min(20, args.images)
    save_grid(torch.cat([images[name, args.seeds[0]][:shown] for name in names]), path, columns=shown, scale=3,
              row_labels=names, caption=f"the first {shown} of {args.images} images of seed {args.seeds[0]} per plan "
              f"(labels 0-9 in turn), digits DiT-MoE, {args.steps} steps, CFG {args.cfg_scale:g}; benchmarks/quality.py")


if __name__ == "__main__":
    main()
