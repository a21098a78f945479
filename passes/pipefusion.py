"""PipeFusion (xDiT; Fang et al. 2024): the blocks in pipeline stages, the latent in patches;
lossy, other patches' K/V up to 1 step stale.

Plan `pipefusion: {degree: S, patches: M, warmup_steps: W}`. The blocks (the modules around
attention layers, [Note: the token region] in sequence_parallel.py) are split into S runs of
consecutive blocks, stage s on the rank at place s of the "pipefusion" axis; what comes
before the blocks (embeddings) and after the token region (un-patchifying) runs on every
rank. A rank's program holds only its stage's blocks, and their experts sharded by expert
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

Within a step the pipeline fills and drains: each stage idles for S-1 of the S-1+M patch
slots, so M well above S keeps the bubble small. (PipeFusion proper also overlaps the next
step's first patches with this step's last ones, which needs the sampler to run patch by
patch; moedit's programs run one whole step.)

Memory: a rank keeps the K/V buffers of its stage's L/S attention layers only, where
patch parallelism (patch_parallel.py) keeps all L, twice while a gather is in flight.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx

from moedit.graph import META, VALUES, Emitter, Inserted, Kind, kind_of, meta
from moedit.pipeline import PassContext, PassResult
from moedit.plan import PlanError
from moedit.runtime import ops
from moedit.runtime.comm import P2P
from moedit.runtime.sequence_ops import kv_of, piece_bounds, shard, token_buffer, write_patch
from moedit.tracer import attention_nodes

from .patch_parallel import kv_key
from .sequence_parallel import block_of, check_attention, is_token, local_attention, token_region

AXIS = "pipefusion"
_SENDS_ROWS = (Kind.DISPATCH_START, Kind.COMBINE_START)  # copies that send `row_bytes` per routed token slot


def pipefusion(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    pf = ctx.plan.pipefusion
    if pf.degree == 1:
        return PassResult(gm, False, [])
    attentions = attention_nodes(gm)
    region, tokens = token_region(gm, attentions, "pipefusion")
    blocks = list(dict.fromkeys(block_of(node, "pipefusion") for node in attentions))
    if len(blocks) < pf.degree:
        raise PlanError(f"pipefusion.degree ({pf.degree}) must not exceed the blocks ({len(blocks)}): every stage "
                        "holds at least one block")
    if pf.num_patches > tokens:
        raise PlanError(f"pipefusion.patches ({pf.num_patches}) must not exceed the tokens per image ({tokens})")
    for node in attentions:
        check_attention(gm, node, "pipefusion")
    stage_of_block = stages_of_blocks(blocks, pf.degree)
    stage = _Stage(gm, ctx, region, _stages(gm, region, stage_of_block), tokens, attentions)
    inserted = stage.emit(1 if ctx.step.synchronous else pf.num_patches)
    gm.graph.eliminate_dead_code()
    for block, s in stage_of_block.items():
        if s != stage.stage:
            gm.delete_submodule(block)  # with its experts: this rank's module holds its stage only
    return PassResult(gm, True, inserted)


def stages_of_blocks(blocks: list[str], degree: int) -> dict[str, int]:
    """Block path -> its stage: `degree` runs of consecutive blocks, the first ones a block
    longer when they do not divide evenly."""
    return {block: s for s in range(degree) for block in blocks[slice(*piece_bounds(len(blocks), degree, s))]}


def _stages(gm: fx.GraphModule, region: set[fx.Node], stage_of_block: dict[str, int]) -> dict[fx.Node, int]:
    """The stage of every node of the token region: its block's, or (for the nodes expert
    parallelism emitted and the final layer) the latest stage among its inputs'."""
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

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, region: set[fx.Node], stage_of: dict[fx.Node, int],
                 tokens: int, attentions: list[fx.Node]):
        self.gm, self.ctx, self.region, self.stage_of = gm, ctx, region, stage_of
        self.stage, self.last = ctx.plan.mesh.index(AXIS, ctx.rank), ctx.plan.pipefusion.degree - 1
        self.attention_index = {node: i for i, node in enumerate(attentions)}
        self.copies: list[Inserted] = []  # rows for the pass log: the nodes copied for each patch
        self.per_patch: list[fx.Node] = []  # this stage's nodes that read a patch's values (`_copy_once`)
        nodes = list(gm.graph.nodes)
        self.mine = [n for n in nodes if stage_of.get(n) == self.stage]
        self.received = self._carried(nodes, self.stage - 1) if self.stage > 0 else []
        self.sent = self._carried(nodes, self.stage) if self.stage < self.last else []
        self.leaving = [n for n in nodes if n in region and any(u not in region for u in n.users)]
        entering = [n for n in nodes if n not in region and is_token(n, tokens) and any(u in region for u in n.users)]
        if not entering:
            raise PlanError("pipefusion: no token value [B, N, ...] enters the blocks; moedit cannot tell the "
                            "shape of the activations the stages pass on")
        self.like = entering[0]  # the embedded tokens: every rank computes them, so buffers take their shape
        self.entering = {n for n in entering if any(u in self.mine for u in n.users)}
        for value in (*self.received, *self.sent, *self.leaving):
            if not is_token(value, tokens):
                raise PlanError(f"pipefusion: {value.format_node()} passes between stages (or leaves the blocks) "
                                f"but is not a token value [B, {tokens}, ...]; moedit can only pass activations "
                                "on, patch by patch")

    def _carried(self, nodes: list[fx.Node], boundary: int) -> list[fx.Node]:
        """Values of stages <= `boundary` that a later stage, or the code after the blocks, reads."""
        later = lambda user: self.stage_of.get(user, self.last + 1) > boundary  # noqa: E731
        return [n for n in nodes if self.stage_of.get(n, self.last + 1) <= boundary and any(map(later, n.users))]

    def emit(self, patches: int) -> list[Inserted]:
        """Steps 1-3 for every patch, the broadcast of the output, and the old region erased."""
        gm = self.gm
        emit = Emitter(gm, None, staleness=0 if patches == 1 else 1, prefix="pf")
        last_of_region = [n for n in gm.graph.nodes if n in self.region][-1]
        with gm.graph.inserting_before(last_of_region.next):
            receives = self._post_receives(emit, patches)
            shared = self._copy_once()
            buffers: dict[int, fx.Node] = {}  # attention index -> its K/V buffer, as the patches update it
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
            for value in self.leaving:
                self._broadcast(emit, value, [env.get(value) for env in outputs])
        for node in reversed([n for n in gm.graph.nodes if n in self.region]):
            gm.graph.erase_node(node)
        return emit.inserted + self.copies

    def _post_receives(self, emit: Emitter, patches: int) -> dict[tuple[int, int], fx.Node]:
        """Step 1, posted for every patch when the step starts: (patch, value) -> the receive."""
        receives = {}
        for p in range(patches):
            piece = emit.call(Kind.SHARD, shard, self.like, 1, patches, p) if patches > 1 else self.like
            for j, value in enumerate(self.received):
                buffer = emit.call(Kind.GLUE, token_buffer, piece, *_tail(value))
                receives[p, j] = emit.call(Kind.RECV_START, ops.recv_start, buffer, peer=self.stage - 1,
                                           tag=p * len(self.received) + j, name="activations", layer=None, axis=AXIS,
                                           channel=P2P)
        return receives

    def _copy_once(self) -> dict[fx.Node, fx.Node]:
        """This stage's nodes that read no token value (a block's modulation from the timestep
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
                   buffers: dict[int, fx.Node]) -> dict[fx.Node, fx.Node]:
        """Step 2 for patch `p`: this stage's nodes copied to read patch p's values; returns them."""
        env.update({n: emit.call(Kind.SHARD, shard, n, 1, patches, p) if patches > 1 else n for n in self.entering})
        env.update({value: emit.call(Kind.RECV_WAIT, ops.wait, receives[p, j])
                    for j, value in enumerate(self.received)})
        for node in self.per_patch:
            if kind_of(node) is Kind.ATTENTION:
                env[node] = self._attention(emit, node, env[node.args[0]], p, patches, buffers)
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
                sends = self.ctx.layers[layer].row_bytes if kind in _SENDS_ROWS else 0
                self.copies.append(Inserted(node=copy.name, layer=layer, kind=kind.value, bytes_per_token=sends,
                                            share=1 / patches))
        return copy

    def _attention(self, emit: Emitter, node: fx.Node, x: fx.Node, p: int, patches: int,
                   buffers: dict[int, fx.Node]) -> fx.Node:
        """Attention of patch `p` of `patches` through the layer's K/V buffer (step 2)."""
        i = self.attention_index[node]
        if p == 0:
            local_attention(self.gm, node, kv_buffer=True)  # checked by `pipefusion`
        qkv = emit.module(Kind.QKV, f"{node.target}.sp_qkv", x)
        if patches == 1:  # synchronous: every token, and the buffer refilled
            buffers[i] = emit.call(Kind.GLUE, kv_of, qkv)
            emit.call(Kind.CACHE_WRITE, ops.cache_write, buffers[i], key=kv_key(i))
        else:
            if p == 0:
                buffers[i] = emit.call(Kind.CACHE_READ, ops.cache_read, key=kv_key(i))
            buffers[i] = emit.call(Kind.GLUE, write_patch, buffers[i], qkv, p, patches)
            if p == patches - 1:
                emit.call(Kind.CACHE_WRITE, ops.cache_write, buffers[i], key=kv_key(i))
        q = emit.call(Kind.GLUE, operator.getitem, qkv, 0)
        out = emit.module(Kind.ATTEND, f"{node.target}.sp_attend", q, buffers[i])
        return emit.module(Kind.ATTENTION_OUT, f"{node.target}.sp_out", out)

    def _broadcast(self, emit: Emitter, value: fx.Node, pieces: list[fx.Node | None]) -> None:
        """The last stage's `value` (joined from its patches' `pieces`) to every stage, for the code
        after the blocks."""
        if self.stage == self.last:
            whole = pieces[0] if len(pieces) == 1 else emit.call(Kind.GLUE, torch.cat, pieces, 1)
        else:
            whole = emit.call(Kind.GLUE, token_buffer, self.like, *_tail(value))
        pending = emit.call(Kind.BROADCAST_START, ops.broadcast_start, whole, root=self.last, name="output",
                            layer=None, axis=AXIS)
        result = emit.call(Kind.BROADCAST_WAIT, ops.wait, pending)
        value.replace_all_uses_with(result, delete_user_cb=lambda user: user not in self.region)


def _tail(value: fx.Node) -> tuple[tuple[int, ...], object]:
    """A token value's dims after [B, N], and its dtype."""
    return tuple(meta(value)["shape"][2:]), meta(value)["dtype"]
