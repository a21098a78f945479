"""`CompiledModel.explain()`: what every pass inserted, layer by layer, as a text table."""

from __future__ import annotations

from collections import defaultdict


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"


def _tokens_per_sample(model) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "input_size"):
        return None
    return (cfg.input_size // cfg.patch_size) ** 2


def explain(compiled, batch_size: int) -> str:
    plan, world = compiled.plan, compiled.world_size
    tokens = _tokens_per_sample(compiled.model)
    # Rows are identical on every rank except for expert placement, so rank 0's log is read.
    per_layer = defaultdict(list)
    for entry in compiled.pass_log:
        if entry["rank"] == 0:
            for row in entry["inserted"]:
                per_layer[row["layer"]].append((entry["pass"], row))
    lines = [
        f"moedit plan: expert_parallel.degree={plan.expert_parallel.degree}, "
        f"staleness={plan.staleness.mode}, world size {world}",
        "passes: " + ", ".join(sorted({e["pass"] for e in compiled.pass_log})),
    ]
    if tokens is not None:
        # With CFG the model sees 2 x batch samples; off-rank share assumes uniform routing.
        slots = 2 * batch_size * tokens
        lines.append(f"bytes per step: global batch {batch_size} images with CFG ({slots} tokens), "
                     f"all-to-all bytes sent off-rank, uniform routing assumed")
    header = f"{'layer':<6}{'module':<16}{'sync':<6}{'stale':<6}{'inserted':<70}{'bytes/step':>14}"
    lines += ["", header, "-" * len(header)]
    for layer in compiled.layers:
        rows = per_layer[layer.index]
        kinds = ",".join(dict.fromkeys(r["kind"].removesuffix("_start").removesuffix("_wait") for _, r in rows))
        stale = max((r["staleness"] for _, r in rows), default=0)
        sent = "-"
        if tokens is not None:
            per_slot = sum(r["bytes_per_token"] for _, r in rows)
            sent = _mb(per_slot * 2 * batch_size * tokens * layer.top_k * (world - 1) / world)
        lines.append(f"{layer.index:<6}{layer.path:<16}{'yes' if stale == 0 else 'no':<6}{stale:<6}"
                     f"{kinds:<70}{sent:>14}")
    lines += ["", "expert placement (expert e on rank e % P):"]
    for rank in range(world):
        lines.append(f"  rank {rank}: experts {compiled.experts_of(rank)}")
    return "\n".join(lines)
