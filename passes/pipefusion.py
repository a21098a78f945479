"""PipeFusion (xDiT; Fang et al. 2024): the blocks in pipeline stages, the latent in patches;
lossy, other patches' K/V up to 1 step stale.

Plan `pipefusion: {degree: S, patches: M, warmup_steps: W}`. The blocks (the modules around
attention layers, [Note: the token region] in sequence_parallel.py) are split into S runs of
consecutive blocks, stage s on the rank at place s of the "pipefusion" axis; what comes
before the blocks (embeddings) and after the image's tokens leave them (un-patchifying) runs
on every rank. A rank's program holds only its stage's blocks, and their experts sharded by expert
parallelism within the stage.

On a stale step the tokens are split into M patches (horizontal strips of the latent), and
every stage runs its blocks patch by patch, patch p in three numbered steps:

    1. receive   patch p's activations from the stage before (all receives are posted when
                 the step starts) - or, on stage 0, cut patch p of the embedded tokens
    2. blocks    this stage's blocks on patch p; each attention writes patch p's k and v into
                 its layer's K/V buffer [2,B,h,N,d] (in place) and attends patch p's queries
                 to the whole buffer
    3. send      patch p's activations to the next stage, started at once and waited for at
                 the end of the step: stage s works on patch p+1 while stage s+1 works on p

The last stage joins the patches' outputs and broadcasts them to every stage. The buffers
live in the step cache, so patch p's attention at step t reads this step's K/V for the
patches before p (written earlier in the step), its own, and the previous step's for the
patches after p - xDiT's in-place buffer update. Synchronous steps (warm-up, cool-down,
every `staleness.sync_every`-th) run the whole latent as one patch: exact (the single-device
model's result), and they refill the buffers. tests/test_patches.py checks the rule per layer.

Joint attention (HiDream, Flux, NucleusMoE's added K/V): a patch is its image rows with every
text row, laid out as [Note: joint layouts] in sequence_parallel.py describes (the text rows
are those patch parallelism replicates on every rank), and the stages pass on patch p's
image and text rows. The buffers hold only the image's K/V; the text rows' K/V are
recomputed by every patch, so patch p attends to its own text K/V, and each patch carries its
own copy of the text stream through the blocks (HiDream's double-stream blocks update it).
Where the text rows leave with the image's (before a final slice drops them) they are the
last patch's, which saw this step's K/V of every patch. The cost: every stage runs the text
rows' token-wise work M times a step, and sends them M times; no buffer holds them.

An expert choice (NucleusMoE) chooses over a whole image, so its router scores are kept like
the K/V: a buffer [B,N,E] per layer in the step cache, patch p's rows written when patch p
routes, the choice over the buffer (this step's scores for patches 0..p, the previous step's
for the rest), patch p keeping its rows of it. Synchronous steps choose over this step's
scores of every token, exactly as the model does. tests/test_real_models.py checks both rules.

Within a step the pipeline fills and drains: each stage idles for S-1 of the S-1+M patch
slots, so M well above S keeps the bubble small. (PipeFusion proper also overlaps the next
step's first patches with this step's last ones, which needs the sampler to run patch by
patch; moedit's programs run one whole step.)

Memory: a rank keeps the K/V buffers of its stage's L/S attention layers only (and the score
buffers of its expert-choice layers, [B,N,E] each), where patch parallelism
(patch_parallel.py) keeps all L, twice while a gather is in flight.
"""

from __future__ import annotations

import dataclasses
import operator

import torch.fx as fx
from torch.fx.node import map_arg

from moedit.graph import META, VALUES, Emitter, Inserted, Kind, kind_of, meta
from moedit.pipeline import PassContext, PassResult
from moedit.plan import PlanError
from moedit.runtime import ops
from moedit.runtime.comm import P2P
from moedit.runtime.sequence_ops import (image_rows, join_patches, patch_buffer, piece_bounds, take_rows, with_text,
                                         write_patch)

from ._tokens import JointCall, Layout, TokenSplit, joint_call
from .expert_parallel import routed_exchange
from .patch_parallel import kv_key
from .sequence_parallel import block_of, split_attentions

AXIS = "pipefusion"
_SENDS_ROWS = (Kind.DISPATCH_START, Kind.COMBINE_START)  # copies that send a routed row per token slot


def pipefusion(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    pf = ctx.plan.pipefusion
    if pf.degree == 1:
        return PassResult(gm, False, [])
    attentions = split_attentions(gm, "pipefusion")
    blocks = list(dict.fromkeys(block_of(node, "pipefusion") for node in attentions))
    if len(blocks) < pf.degree:
        raise PlanError(f"pipefusion.degree ({pf.degree}) must not exceed the blocks ({len(blocks)}): every stage "
                        "holds at least one block")
    patches = 1 if ctx.step.synchronous else pf.num_patches
    emit = Emitter(gm, None, staleness=0 if patches == 1 else 1, prefix="pf")
    split = _Patches(gm, set(blocks), emit, patches)
    tokens = split.seed_from(attentions)
    if pf.num_patches > tokens:
        raise PlanError(f"pipefusion.patches ({pf.num_patches}) must not exceed the tokens per image ({tokens})")
    calls: dict[fx.Node, JointCall] = {}

    def on_attention(node: fx.Node):
        calls[node] = joint_call(gm, node, split, kv_buffer=True)
        if calls[node].mask in split.leaving.values():
            raise PlanError(f"pipefusion: the key mask of {node.target} is computed from the image's tokens; "
                            "moedit needs key masks every patch can read whole")
        node.args, node.kwargs = (), dict(calls[node].args)  # the node reads this patch's cuts (RoPE, say)
        return node, calls[node].returned

    split.follow(on_attention)
    gm.graph.eliminate_dead_code()
    stage_of_block = stages_of_blocks(blocks, pf.degree)
    stage = _Stage(gm, ctx, split, stage_of_block, calls, attentions)
    inserted = stage.emit(emit, patches)
    gm.graph.eliminate_dead_code()
    for block, s in stage_of_block.items():
        if s != stage.stage:
            gm.delete_submodule(block)  # with its experts: this rank's module holds its stage only
    return PassResult(gm, True, inserted)


def stages_of_blocks(blocks: list[str], degree: int) -> dict[str, int]:
    """Block path -> its stage: `degree` runs of consecutive blocks, the first ones a block
    longer when they do not divide evenly."""
    return {block: s for s in range(degree) for block in blocks[slice(*piece_bounds(len(blocks), degree, s))]}


def _is_choice(node: fx.Node) -> bool:
    """An expert choice's node (expert_parallel's `ep_choice`, see [Note: adapter shapes])."""
    return node.op == "call_module" and node.target.endswith(".ep_choice")


def _leaving(value):
    """Stands, while the pass runs, for a value's patches joined where it leaves the blocks."""
    return value


class _Patches(TokenSplit):
    """The graph laid out for patch 0 of `patches` (`_Stage` copies it for every patch); a value
    that leaves the blocks gets a stand-in where a sequence split would gather it."""

    def __init__(self, gm: fx.GraphModule, blocks: set[str], emit: Emitter, patches: int):
        super().__init__(gm, blocks, emit, None, patches, 0, "pipefusion", even=False)
        self.leaving: dict[fx.Node, fx.Node] = {}  # value -> its stand-in

    def gather(self, value: fx.Node, name: str = "") -> fx.Node:
        if value not in self.leaving:
            with self.gm.graph.inserting_before(value.next):
                self.leaving[value] = self.gm.graph.call_function(_leaving, (value,))
        return self.leaving[value]


def _stages(gm: fx.GraphModule, region: set[fx.Node], stage_of_block: dict[str, int]) -> dict[fx.Node, int]:
    """The stage of every node of the patches' region: its block's, or (for the nodes between and
    after blocks, and those expert parallelism emitted) the latest stage among its inputs'."""
    stage_of: dict[fx.Node, int] = {}
    for node in gm.graph.nodes:
        if node in region:
            paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
            inside = [stage_of_block[path] for path in paths if path in stage_of_block]
            inputs = [stage_of[a] for a in node.all_input_nodes if a in stage_of]
            stage_of[node] = inside[0] if inside else max(inputs, default=0)
    return stage_of


class _Stage:
    """One rank's stage of the pipeline: which values it receives, runs, sends and returns."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, split: _Patches, stage_of_block: dict[str, int],
                 calls: dict[fx.Node, JointCall], attentions: list[fx.Node]):
        self.gm, self.ctx, self.split, self.calls = gm, ctx, split, calls
        self.stage, self.last = ctx.plan.mesh.index(AXIS, ctx.rank), ctx.plan.pipefusion.degree - 1
        self.attention_index = {node: i for i, node in enumerate(attentions)}
        self.copies: list[Inserted] = []  # rows for the pass log: the nodes copied for each patch
        self.per_patch: list[fx.Node] = []  # this stage's nodes that read a patch's values (`_copy_once`)
        self.like = split.cuts[0].args[0]  # the embedded tokens: every rank computes them, buffers take their batch
        nodes = list(gm.graph.nodes)
        self.region = self._region(nodes)
        self.stage_of = _stages(gm, self.region, stage_of_block)
        self.mine = [n for n in nodes if self.stage_of.get(n) == self.stage]
        self.received = self._carried(nodes, self.stage - 1) if self.stage > 0 else []
        self.sent = self._carried(nodes, self.stage) if self.stage < self.last else []
        self.entering = [cut for cut in split.cuts if any(u in self.mine for u in cut.users)]
        for value in (*self.received, *self.sent):
            self._patch_shape(value, 0, 1)  # refuses what cannot be passed on

    def _region(self, nodes: list[fx.Node]) -> set[fx.Node]:
        """The nodes that run patch by patch: the blocks, what follows the image's tokens, and
        everything computed from them, up to where they leave (the stand-ins)."""
        outside = set(self.split.cuts) | set(self.split.leaving.values())
        region: set[fx.Node] = set()
        for node in nodes:
            if node in outside or node.op in ("placeholder", "get_attr", "output"):  # attributes: every rank has them
                continue
            if node in self.split.layouts or self.split.inside(node) \
                    or any(a in region or a in self.split.cuts for a in node.all_input_nodes):
                region.add(node)
        for value in self.gm.graph.output_node().all_input_nodes:
            if value in region:
                raise PlanError(f"pipefusion: the model returns {value.format_node()}, computed from the patches "
                                "but not from the image's token rows; each patch computes its own, so moedit "
                                "cannot tell which to return")
        for node in region:
            if _is_choice(node):
                layout = self.split.layouts.get(node.args[0])
                if not isinstance(layout, Layout) or layout.before or layout.after:
                    raise PlanError(f"pipefusion: the expert choice of {node.target.removesuffix('.ep_choice')} "
                                    "would choose among text tokens as well as the image's; moedit chooses over a "
                                    "whole image only for layers that see image tokens alone")
        return region

    def _carried(self, nodes: list[fx.Node], boundary: int) -> list[fx.Node]:
        """Values of stages <= `boundary` that a later stage, or the code after the blocks, reads."""
        later = lambda user: self.stage_of.get(user, self.last + 1) > boundary  # noqa: E731
        return [n for n in nodes if self.stage_of.get(n, self.last + 1) <= boundary and any(map(later, n.users))]

    def _patch_shape(self, value: fx.Node, p: int, patches: int) -> tuple[int, ...]:
        """The shape of `value` for patch `p` of `patches`: its image rows cut, its text rows whole."""
        shape, layout = meta(value).get("shape"), self.split.layouts.get(value)
        if shape is None or len(shape) < 2 or shape[0] != meta(self.like)["shape"][0] \
                or not (layout is None or isinstance(layout, Layout)):
            raise PlanError(f"pipefusion: {value.format_node()} passes between stages (or leaves the blocks) but is "
                            "not a batch-first tensor; moedit can only pass activations on, patch by patch")
        if layout is None:
            return tuple(shape)
        start, stop = piece_bounds(layout.tokens, patches, p)
        rows = layout.before + stop - start + layout.after
        return (*shape[: layout.dim], rows, *shape[layout.dim + 1:])

    def emit(self, emit: Emitter, patches: int) -> list[Inserted]:
        """Steps 1-3 for every patch, the broadcast of the output, and the old region erased."""
        gm = self.gm
        last_of_region = [n for n in gm.graph.nodes if n in self.region][-1]
        with gm.graph.inserting_before(last_of_region.next):
            receives = self._post_receives(emit, patches)
            shared = self._copy_once()
            buffers: dict[str, fx.Node] = {}  # cache key -> its buffer, as the patches update it
            sends, outputs = [], []
            for p in range(patches):
                env = self._run_patch(emit, p, patches, receives, dict(shared), buffers)
                sends += [emit.call(Kind.SEND_START, ops.send_start, env[value], peer=self.stage + 1,
                                    tag=p * len(self.sent) + j, name="activations sent", layer=None, axis=AXIS,
                                    channel=P2P)
                          for j, value in enumerate(self.sent)]
                outputs.append(env)
            for pending in sends:
                emit.call(Kind.SEND_WAIT, ops.wait, pending)
            for value, stand_in in self.split.leaving.items():
                self._broadcast(emit, value, stand_in, [env.get(value) for env in outputs])
        for node in reversed([n for n in gm.graph.nodes if n in self.region]):
            gm.graph.erase_node(node)
        return emit.inserted + self.copies

    def _post_receives(self, emit: Emitter, patches: int) -> dict[tuple[int, int], fx.Node]:
        """Step 1, posted for every patch when the step starts: (patch, value) -> the receive."""
        receives = {}
        for p in range(patches):
            for j, value in enumerate(self.received):
                buffer = emit.call(Kind.GLUE, patch_buffer, self.like, self._patch_shape(value, p, patches),
                                   meta(value)["dtype"])
                receives[p, j] = emit.call(Kind.RECV_START, ops.recv_start, buffer, peer=self.stage - 1,
                                           tag=p * len(self.received) + j, name="activations", layer=None, axis=AXIS,
                                           channel=P2P)
        return receives

    def _copy_once(self) -> dict[fx.Node, fx.Node]:
        """This stage's nodes that read no patch's values (a block's modulation from the timestep
        and class, say), copied once for all patches."""
        per_patch = set(self.entering) | set(self.received)
        shared = {}
        for node in self.mine:
            if kind_of(node) is Kind.ATTENTION or any(a in per_patch for a in node.all_input_nodes):
                per_patch.add(node)
            else:
                shared[node] = self._copy(node, shared, 1)
        self.per_patch = [n for n in self.mine if n in per_patch]
        return shared

    def _run_patch(self, emit: Emitter, p: int, patches: int, receives: dict, env: dict,
                   buffers: dict[str, fx.Node]) -> dict[fx.Node, fx.Node]:
        """Step 2 for patch `p`: this stage's nodes copied to read patch p's values; returns them."""
        for cut in self.entering:  # the patch's rows of what every rank holds whole
            env[cut] = cut.args[0] if patches == 1 else \
                emit.call(Kind.SHARD, take_rows, *cut.args[:2], patches, p, *cut.args[4:])
        env.update({value: emit.call(Kind.RECV_WAIT, ops.wait, receives[p, j])
                    for j, value in enumerate(self.received)})
        for node in self.per_patch:
            if kind_of(node) is Kind.ATTENTION:
                env[node] = self._attention(emit, node, env, p, patches, buffers)
            elif _is_choice(node):
                env[node] = self._choice(emit, node, env, p, patches, buffers)
            else:
                env[node] = self._copy(node, env, patches)
        return env

    def _copy(self, node: fx.Node, env: dict, patches: int) -> fx.Node:
        """`node` copied for one patch, reading that patch's values."""
        copy = self.gm.graph.node_copy(node, lambda a: env.get(a, a))
        if META in node.meta:
            copy.meta[META] = dataclasses.replace(node.meta[META])
            kind, layer = kind_of(node), meta(node).get("layer")
            if kind is not None and kind not in VALUES:
                sends = (routed_exchange(self.ctx.plan, self.ctx.layers[layer], node.kwargs["name"])["bytes_per_token"]
                         if kind in _SENDS_ROWS else 0)
                self.copies.append(Inserted(node=copy.name, layer=layer, kind=kind.value, bytes_per_token=sends,
                                            share=1 / patches))
        return copy

    def _buffer(self, emit: Emitter, key: str, rows: fx.Node, p: int, patches: int, buffers: dict[str, fx.Node],
                dim: int) -> fx.Node:
        """The buffer under `key` with patch `p`'s `rows` (along `dim`) this step's: on a synchronous
        step (one patch) the rows themselves, kept for the next step; otherwise last step's buffer,
        patch by patch overwritten in place, kept after the last patch."""
        if patches == 1:
            buffers[key] = rows
        else:
            if p == 0:
                buffers[key] = emit.call(Kind.CACHE_READ, ops.cache_read, key=key)
            buffers[key] = emit.call(Kind.GLUE, write_patch, buffers[key], rows, p, patches, dim)
        if p == patches - 1:
            emit.call(Kind.CACHE_WRITE, ops.cache_write, buffers[key], key=key)
        return buffers[key]

    def _attention(self, emit: Emitter, node: fx.Node, env: dict, p: int, patches: int,
                   buffers: dict[str, fx.Node]) -> fx.Node:
        """Attention of patch `p` through the layer's buffer of the image's K/V (step 2); the text
        rows travel with the patch, so their K/V are this patch's."""
        call = self.calls[node]
        args = map_arg(node.kwargs, lambda a: env.get(a, a))
        start, stop = piece_bounds(call.keys.tokens, patches, p)
        qkv = emit.module(Kind.QKV, f"{node.target}.sp_qkv", kwargs=args)
        q, kv = (emit.call(Kind.GLUE, operator.getitem, qkv, j) for j in (0, 1))
        image = emit.call(Kind.GLUE, image_rows, kv, call.keys.before, stop - start)
        buffer = self._buffer(emit, kv_key(self.attention_index[node]), image, p, patches, buffers, -2)
        every_token = emit.call(Kind.GLUE, with_text, kv, buffer, call.keys.before, stop - start)
        out = emit.module(Kind.ATTEND, f"{node.target}.sp_attend", q, every_token, call.mask)
        return emit.module(Kind.ATTENTION_OUT, f"{node.target}.sp_out", out, kwargs=args)

    def _choice(self, emit: Emitter, node: fx.Node, env: dict, p: int, patches: int,
                buffers: dict[str, fx.Node]) -> fx.Node:
        """An expert choice over the whole image from a buffer of router scores [B, N, E] kept like
        the K/V: this step's for patches 0..p, the previous step's for the rest (see the module's
        docstring); patch p keeps its rows of the choice."""
        layout = self.split.layouts[node.args[0]]
        scores = self._buffer(emit, f"layer{meta(node)['layer']}_scores", env[node.args[0]], p, patches, buffers,
                              layout.dim)
        choice = self._copy(node, {node.args[0]: scores}, patches)
        for element in (0, 1) if patches > 1 else ():
            choice = emit.call(Kind.GLUE, take_rows, choice, layout, patches, p, element)
        return choice

    def _broadcast(self, emit: Emitter, value: fx.Node, stand_in: fx.Node, pieces: list[fx.Node | None]) -> None:
        """The last stage's `value` (joined from its patches' `pieces`) to every stage, for the code
        after the blocks."""
        layout = self.split.layouts[value]
        if self.stage == self.last:
            whole = pieces[0] if len(pieces) == 1 else emit.call(Kind.GLUE, join_patches, pieces, layout)
        else:
            whole = emit.call(Kind.GLUE, patch_buffer, self.like, tuple(meta(value)["shape"]), meta(value)["dtype"])
        pending = emit.call(Kind.BROADCAST_START, ops.broadcast_start, whole, root=self.last, name="output",
                            layer=None, axis=AXIS)
        stand_in.replace_all_uses_with(emit.call(Kind.BROADCAST_WAIT, ops.wait, pending))
        self.gm.graph.erase_node(stand_in)
