"""`CompiledModel.explain()`: what every pass inserted, layer by layer, as a text table."""

from __future__ import annotations

import math
import os
from collections import defaultdict

from moedit.passes._tokens import Layout
from moedit.runtime.wire import wire_of

from .graph import meta
from .tracer import attention_nodes, moe_nodes


_KIND_ORDER = ("route", "drop_slots", "permute", "counts", "fetch", "cache_read", "dispatch", "experts", "combine",
               "unpermute", "slot_cache", "shared", "merge", "cache_write")
_CACHING = ("cache_write", "slot_cache")  # kinds that keep one [T*K, H] set of rows across steps


def _mb(num_bytes: float) -> str:
    return f"{num_bytes / 2**20:.2f} MiB"


def _tokens_per_sample(model) -> int | None:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "input_size"):
        return None
    return (cfg.input_size // cfg.patch_size) ** 2


def _wires(compiled) -> list[str]:
    """What the routed exchanges send a row as, where the plan compresses them (see [Note: wire dtypes])."""
    wires = compiled.plan.expert_parallel.wire_dtypes
    if set(wires.values()) == {"auto"} or not compiled.layers:
        return []
    layer = compiled.layers[0]
    parts = []
    for name, dtype in wires.items():
        wire = wire_of(dtype, compiled.plan.expert_parallel.wire_block)
        parts.append(f"{name} {dtype} ({layer.row_bytes} bytes a row)" if wire is None else
                     f"{name} {wire.describe()} ({wire.row_bytes(layer.hidden_size)} bytes a row)")
    return [f"wire: {', '.join(parts)}; the activations' own {layer.row_bytes} bytes a row (layer {layer.index}); "
            "each expert's input and output are rounded to it, at any world size"]


def _layer_slots(compiled, batch_size: int, slots: int | None) -> tuple[dict[int, int] | None, str]:
    """Token rows each MoE layer routes per step (None if unknown), and the line that says how they were counted."""
    how = ("sent = all-to-all bytes off-rank per step with every slot sent, cache = staleness cache per rank; "
           "uniform routing assumed")
    if slots is not None:
        return ({layer.index: slots for layer in compiled.layers},
                f"bytes: global batch {batch_size} images with CFG ({slots} tokens); {how}")
    shapes = {meta(node)["layer"]: meta(node.args[0]).get("shape") for node in moe_nodes(compiled._traced)}
    if compiled.signature is not None and None not in shapes.values():  # a captured call: rows from its shapes
        rows = {layer: math.prod(shape[:-1]) for layer, shape in shapes.items()}
        return rows, (f"bytes: one call as captured ({compiled.signature.describe()}; layers route "
                      f"{min(rows.values(), default=0)}-{max(rows.values(), default=0)} token rows); {how}")
    return None, ("bytes: '-', the token count is unknown: the model has neither a DiT config (input_size, "
                  "patch_size) nor example inputs; compile with example_inputs= to count them")


def explain(compiled, batch_size: int, steps: int) -> str:
    plan, world = compiled.plan, compiled.world_size
    tokens = _tokens_per_sample(compiled.model)
    # Rows are the same on every rank but for expert placement, so rank 0's log is read,
    # for the kind of step the most steps of a sample run.
    table = compiled.steps.table(steps)
    program = max(compiled.kinds, key=table.count).name
    alive = {node.name for node in compiled.graph(0, program).graph.nodes}  # later passes may replace nodes
    per_layer = defaultdict(list)
    for entry in compiled.pass_log:
        if entry["rank"] == 0 and entry["program"] == program:
            for row in entry["inserted"]:
                if row["node"] in alive:
                    per_layer[row["layer"]].append(row)
    changed = dict.fromkeys(e["pass"] for e in compiled.pass_log if e["changed"])
    lines = [
        f"moedit plan: expert_parallel.degree={plan.expert_parallel.degree}"
        + (f" in {plan.expert_parallel.chunks} chunks" if plan.expert_parallel.chunks != 1 else "")
        + f", staleness={plan.staleness.mode}, "
        f"world size {world}, programs {', '.join(k.name for k in compiled.kinds)}",
        "passes that changed the graph: " + ", ".join(changed),
        f"step kinds of a {steps}-step sample ({compiled.steps.rules()}):",
        *compiled.steps.describe(steps),
    ]
    cc = plan.conditional_comm
    if cc.interval is not None:
        what = (f"slots with router weight < {cc.threshold}" if cc.drop == "threshold"
                else f"{cc.slots} slot(s) ({cc.drop})")
        lines.append(f"conditional communication: '_drop' steps leave out {what} per token and reuse the "
                     "outputs cached at the last step that sent every slot")
    lines += _wires(compiled)
    slots = None if tokens is None else 2 * batch_size * tokens  # with CFG the model sees 2 x batch samples
    layer_slots, note = _layer_slots(compiled, batch_size, slots)
    lines.append(note)
    width = max(16, 2 + max((len(layer.path) for layer in compiled.layers), default=0))
    header = f"{'layer':<6}{'module':<{width}}{'mode':<7}{'stale':<6}{'inserted':<90}{'sent/step':>12}{'cache':>12}"
    lines += ["", f"layer rows show the {program} program", header, "-" * len(header)]
    total_sent = total_cache = 0.0
    for layer in compiled.layers:
        rows = per_layer[layer.index]
        present = {r["kind"].removesuffix("_start").removesuffix("_wait") for r in rows}
        kinds = ",".join(k for k in _KIND_ORDER if k in present)
        stale = max((r["staleness"] for r in rows), default=0)
        sent = cache = "-"
        if layer_slots is not None:
            slots = layer_slots[layer.index]
            slot_bytes = layer.top_k * layer.hidden_size * layer.element_size
            ep = plan.mesh.ep
            sent_bytes = sum(r["bytes_per_token"] * r["share"] for r in rows) * slots * layer.top_k * (ep - 1) / ep
            cache_bytes = sum(r["share"] for r in rows if r["kind"] in _CACHING) * slots / world * slot_bytes
            total_sent, total_cache = total_sent + sent_bytes, total_cache + cache_bytes
            sent, cache = _mb(sent_bytes), _mb(cache_bytes)
        lines.append(f"{layer.index:<6}{layer.path:<{width}}{'async' if stale else 'sync':<7}{stale:<6}"
                     f"{kinds:<90}{sent:>12}{cache:>12}")
    if compiled.chunk_basis is not None:
        basis = compiled.chunk_basis
        lines.append(f"expert_parallel.chunks auto: {basis['chunks']} (measured per layer: dispatch "
                     f"{1e3 * basis['dispatch_s']:.2f} ms, combine {1e3 * basis['combine_s']:.2f} ms, experts "
                     f"{1e3 * basis['experts_s']:.2f} ms, latency {1e3 * basis['latency_s']:.2f} ms)")
    if compiled.sensitivity is not None:
        lines.append("selective_sync auto, staleness sensitivity per layer (rel. L2 of a calibration sample): "
                     + ", ".join(f"{i}: {s:.4f}" for i, s in enumerate(compiled.sensitivity)))
    if layer_slots is not None:
        lines.append(f"{'total':<125}{_mb(total_sent):>12}{_mb(total_cache):>12}")
    lines += _shortcut(compiled, program)
    if plan.offload.enabled:
        budget = (f"{plan.offload.resident_experts} experts" if plan.offload.resident_experts is not None
                  else f"{plan.offload.budget_mb:g} MiB")
        lines += ["", f"offload: routed experts stay in host memory; at most {budget} per rank on the device (least "
                  "recently used out); each layer fetches the experts that receive rows as soon as its counts "
                  "are known"]
    slots = None if tokens is None else 2 * batch_size * tokens
    lines += _dense_axes(compiled, tokens, slots)
    lines += _patches(compiled, tokens, slots)
    lines += _nodes(compiled, total_sent if layer_slots is not None else None, _attention_bytes(compiled, slots))
    stage = "; a rank holds its own stage's layers only" if plan.pipefusion.degree > 1 else ""
    if compiled.layers:
        lines += ["", f"expert placement (expert e on rank e % {plan.mesh.ep} of its expert-parallel group{stage}):"]
        lines += [f"  rank {rank}: experts {compiled.experts_of(rank)}" for rank in range(world)]
    else:
        lines += ["", "no MoE layer: a dense model, run by the sequence, CFG, patch and PipeFusion plans only"]
    packed = [layer.path for layer in compiled.layers if not layer.sharded]
    if packed:
        lines.append(f"  not sharded: the experts of {', '.join(packed)} are views of packed parameters, which every "
                     "rank keeps whole (the ranks split the work, not the weights)")
    choice = [layer.path for layer in compiled.layers if layer.adapter.empty_slots]
    if choice and layer_slots is not None:
        lines.append(f"sent/step of {', '.join(choice)} (empty slots, expert choice) counts all K slots of every "
                     "token: an upper bound")
    return "\n".join(lines)


def _shortcut(compiled, program: str) -> list[str]:
    """What the shortcut passes did: the lossy rewrite, and each layer's window and expert slot."""
    settings = compiled.plan.shortcut
    if not settings.enabled:
        return []
    lines = [""]
    if settings.rewrite:
        lines.append(f"shortcut.rewrite: LOSSY - MoE layers 1.. read Pos-{settings.position} of the block before "
                     "(the whole MoE layer, shared expert included), not their own block's attention output; the "
                     "model's outputs change (benchmarks/quality.py reports by how much)")
    source = "measured (schedule.profile)" if compiled.plan.schedule.profile else "estimated"
    lines.append(f"shortcut schedule (exact reordering, {source} costs, ms): per synchronous layer, the backbone "
                 "window between counts start and combine wait, and where the dispatch and the experts go in it")
    for node in compiled.graph(0, program).graph.nodes:
        slot = meta(node).get("shortcut")
        if slot is not None:
            ms = {key: f"{1e3 * value:.2f}" for key, value in slot.items()}
            lines.append(f"  layer {meta(node)['layer']}: window {ms['window_s']}; counts {ms['counts_s']}, dispatch "
                         f"{ms['dispatch_s']} issued after {ms['before_dispatch_s']} of it, experts {ms['experts_s']} "
                         f"after {ms['before_experts_s']}, combine {ms['combine_s']}; predicted {ms['predicted_s']} "
                         f"against {ms['unscheduled_s']} with nothing overlapped")
    return lines


def _dense_axes(compiled, tokens: int | None, slots: int | None) -> list[str]:
    """The xDiT axes: how the mesh splits the work and what attention exchanges."""
    plan = compiled.plan
    mesh, sp = plan.mesh, plan.sequence_parallel
    if mesh.data == mesh.world:
        return []
    lines = ["", f"mesh: {mesh.describe()} = {mesh.world} ranks; ranks "
             + "; ".join(f"{axis} {mesh.groups(axis)}" for axis in (*mesh.AXES, "ep") if mesh.size(axis) > 1)]
    if plan.cfg_parallel:
        lines.append("cfg parallel: the two ranks of each cfg group run one half each of the batch the model is "
                     "called with (under guidance: the conditional and the unconditional inputs); one all-gather "
                     "of the model output per step")
    if sp.degree > 1:
        what = " then ".join(w for w, d in (("Ulysses all-to-all of q/k/v and back", sp.ulysses),
                                             (f"ring of {sp.ring - 1} k/v turn(s)", sp.ring)) if d > 1)
        piece = f"{tokens // sp.degree} of {tokens}" if tokens else f"1/{sp.degree}"
        lines.append(f"sequence parallel (ulysses {sp.ulysses} x ring {sp.ring}): every rank holds {piece} tokens "
                     f"of its images from the first block to the final layer; attention: {what}")
        per_layer = _attention_bytes(compiled, slots)
        if per_layer:
            lines.append(f"  sent per attention layer and step: {_mb(sum(per_layer.values()))} (all ranks, the "
                         "batch above)")
        lines += _joint(compiled)
    return lines


def _attention_bytes(compiled, slots: int | None) -> dict[str, float]:
    """Bytes sequence parallelism sends per attention layer and step, all ranks, by axis (none if unknown)."""
    sp = compiled.plan.sequence_parallel
    if slots is None or not compiled.layers or sp.degree == 1:
        return {}
    # per token: Ulysses sends (U-1)/U of q, k, v and of the output; every ring turn moves k and v
    row = slots * compiled.layers[0].row_bytes
    return {axis: sent for axis, sent in (("ulysses", row * 4 * (sp.ulysses - 1) / sp.ulysses),
                                          ("ring", row * 2 * (sp.ring - 1))) if sent}


def _nodes(compiled, ep_bytes: float | None, attention_bytes: dict[str, float]) -> list[str]:
    """Where the node boundary falls: each axis's groups, whether they cross it, and the bytes a step
    sends across it and inside nodes, where counted (expert and sequence-parallel exchanges)."""
    plan, mesh = compiled.plan, compiled.plan.mesh
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 0)) or None
    per_node = plan.runtime.ranks_per_node or local or mesh.world
    if per_node >= mesh.world:
        return []
    source = "runtime.ranks_per_node" if plan.runtime.ranks_per_node else "torchrun's LOCAL_WORLD_SIZE"
    nodes = -(-mesh.world // per_node)
    lines = ["", f"nodes: {nodes} of {per_node} ranks ({source}): "
             + ", ".join(f"node {n} ranks {n * per_node}-{min(mesh.world, (n + 1) * per_node) - 1}"
                         for n in range(nodes))]
    layers = len(attention_nodes(compiled._traced))
    counted = {"ep": ep_bytes, **{axis: sent * layers for axis, sent in attention_bytes.items()}}
    for axis in (*mesh.AXES, "ep"):
        if mesh.size(axis) == 1:
            continue
        groups = mesh.groups(axis)
        # the share of a member's peers on other nodes, averaged over members
        share = sum(sum(peer // per_node != rank // per_node for peer in group) / (len(group) - 1)
                    for group in groups for rank in group) / mesh.world
        where = "crosses nodes" if share else "inside nodes"
        sent = counted.get(axis)
        what = (f"sent/step across nodes {_mb(sent * share)}, inside {_mb(sent * (1 - share))}" if sent is not None
                else "the output batch, once a sample" if axis == "data" else "bytes not counted here")
        lines.append(f"  {axis:<10} {str(groups):<28} {where:<14} {what}")
    return lines


def _has_text_rows(nodes) -> bool:
    """Whether a program splits values holding text rows beside the image's (joint attention)."""
    return any(isinstance(a, Layout) and (a.before or a.after) for n in nodes for a in n.args)


def _joint(compiled) -> list[str]:
    """What joint attention and expert choice over whole images add under sequence parallelism
    (see [Note: joint layouts] in passes/sequence_parallel.py), read from rank 0's program."""
    nodes = compiled.graph(0).graph.nodes
    joint = _has_text_rows(nodes)
    text = sum(1 for n in nodes if n.kwargs.get("name", "").endswith("text output"))
    scores = [n for n in nodes if n.kwargs.get("name") == "gather of the router scores"]
    lines = []
    if joint:
        lines.append("  joint attention: the image's tokens are split, the text tokens are on every rank (each rank "
                     "runs their rows of every token-wise op in full)"
                     + (f"; Ulysses all-gathers the text rows' outputs over the heads in {text} attention layer(s)"
                        if text else ""))
    if scores:
        lines.append(f"  expert choice over whole images: {len(scores)} layer(s) all-gather their router scores "
                     "([B, n, E] a rank) over the split every step, to choose among all of an image's tokens")
    return lines


def _pipefusion_streams(compiled) -> list[str]:
    """What joint attention and expert choice add under PipeFusion (see passes/pipefusion.py),
    read from rank 0's stale program."""
    nodes = compiled.graph(0, compiled.kinds[-1]).graph.nodes
    joint = _has_text_rows(nodes)
    scores = {n.kwargs["key"] for n in nodes if str(n.kwargs.get("key", "")).endswith("_scores")}
    patches = compiled.plan.pipefusion.num_patches
    lines = []
    if joint:
        lines.append(f"  joint attention: every patch carries all the text rows, so a stage runs their token-wise work "
                     f"and sends them {patches} times a step; the K/V buffers hold the image's K/V only, the text's "
                     "are each patch's own")
    if scores:
        lines.append(f"  expert choice over whole images: {len(scores)} layer(s) on rank 0 keep their router scores "
                     "[B, N, E] like the K/V (this step's for patches 0..p, the step before's for the rest)")
    return lines


def _patches(compiled, tokens: int | None, slots: int | None) -> list[str]:
    """Patch parallelism and PipeFusion: what each attention reads, and the K/V buffers and
    activations a rank holds, per attention layer."""
    from moedit.passes.pipefusion import stages_of_blocks

    plan = compiled.plan
    pp, pf, mesh = plan.patch_parallel, plan.pipefusion, plan.mesh
    if pp.degree == 1 and pf.degree == 1:
        return []
    attentions = [node.target for node in attention_nodes(compiled._traced)]
    stage_of = stages_of_blocks(attentions, pf.degree)  # one attention per block
    if pp.degree > 1:
        lines = ["", f"patch parallel (DistriFusion, {pp.degree} patches, LOSSY): every rank runs every block on one "
                 "patch of its images' tokens; each attention reads the other patches' K/V from the step before, "
                 "gathered over the 'patch' axis while the step runs"]
    else:
        lines = ["", f"pipefusion ({pf.degree} stages, {pf.num_patches} patches, LOSSY): stage s runs its blocks "
                 "patch by patch on the ranks at place s of the 'pipefusion' axis; patch p's attention reads this "
                 "step's K/V for patches 0..p and the previous step's for the rest"]
    lines += _joint(compiled) if pp.degree > 1 else _pipefusion_streams(compiled)
    if slots is None:
        return lines
    layer = compiled.layers[0]
    samples = slots // tokens // mesh.data // mesh.cfg  # per rank
    row = samples * layer.hidden_size * layer.element_size  # one token of every sample
    kv = 2 * tokens * row  # k and v of every token
    piece = -(-tokens // (pp.degree if pp.degree > 1 else pf.num_patches))
    lines.append(f"  memory per rank, for the batch above ({samples} samples a rank): an activation of one patch "
                 f"{_mb(piece * row)}; the K/V of one attention layer, every token, {_mb(kv)}")
    for i, attention in enumerate(attentions):
        where = f"stage {stage_of[attention]}, " if pf.degree > 1 else ""
        lines.append(f"  attention {i} ({attention}): {where}K/V buffer {_mb(kv)}")
    every_layer = _mb(kv * (len(attentions) + 2))
    if pp.degree > 1:
        lines.append(f"  K/V per rank: {every_layer} (every layer's gather in flight, and while a layer attends the "
                     "previous step's gather and the buffer made from it)")
    else:
        per_stage = [kv * list(stage_of.values()).count(s) for s in range(pf.degree)]
        lines.append(f"  K/V per rank: {', '.join(_mb(b) for b in per_stage)} by stage (patch parallelism: "
                     f"{every_layer}); a stage after the first also posts every patch's receive when the step "
                     f"starts: one whole activation ({_mb(tokens * row)}) per value passed on")
    return lines
