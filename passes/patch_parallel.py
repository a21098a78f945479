"""DistriFusion-style displaced patch parallelism: lossy, other patches' K/V 1 step stale.

Plan `patch_parallel: {degree: P, warmup_steps: W}`. As under sequence parallelism
([Note: the token region] in sequence_parallel.py), each rank of the "patch" axis runs
every block on one contiguous piece of each image's tokens (a horizontal strip of the
latent: a patch), and the MoE layers run expert parallelism on that patch's tokens. Only
attention needs the other patches; DistriFusion (Li et al., CVPR 2024, Sec. 4.2) gives it
their K/V from the previous step, so that exchange has a whole step to land. Per
attention layer i, in program order:

    1. qkv      this patch's q, k and v
    2. gather   start the all-gather of this patch's k and v over the "patch" axis; it is
                kept in the step cache ("attn<i>_kv") for the next step
    3. read     wait for the gather the previous step started: every patch's K/V of step t-1
    4. attend   this patch's queries to that K/V, its own piece replaced by step t's

On synchronous steps (warm-up, cool-down, every `staleness.sync_every`-th) the gather is
waited for at once: every patch's K/V is this step's, the result equals the single-device
model, and the cache holds this step's K/V for the next. So at a stale step t, the K/V a
rank uses for another patch is what that patch computed at step t-1 (tests/test_patches.py).

Joint attention (HiDream, Flux, NucleusMoE's added K/V): only the image's K/V are gathered
and kept; the text tokens are on every rank ([Note: joint layouts] in sequence_parallel.py),
so their K/V are this step's on every rank and cost no buffer. An expert choice chooses over
the whole image from this step's router scores of every patch (one synchronous all-gather
of [B, n, E] per layer, see [Note: adapter shapes] in moedit/adapters.py): the scores, unlike
the K/V, are not stale.

Memory: per attention layer, every rank holds the K/V of every image token [2,B,h,N,d] in flight
(the gather) and, while the layer runs, the previous step's: DistriFusion's cost, which
PipeFusion's per-stage buffers avoid (explain() prints both).
"""

from __future__ import annotations

import operator

import torch.fx as fx

from moedit.graph import Emitter, Inserted, Kind
from moedit.pipeline import PassContext, PassResult
from moedit.runtime import ops
from moedit.runtime.comm import MAIN
from moedit.runtime.sequence_ops import image_rows, with_piece, with_text

from ._tokens import TokenSplit, joint_call
from .sequence_parallel import block_of, split_attentions

AXIS = "patch"
STALE = "stale"  # the channel of gathers consumed at the next step (see [Note: channels] in runtime/mesh.py)


def patch_parallel(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    pp = ctx.plan.patch_parallel
    if pp.degree == 1:
        return PassResult(gm, False, [])
    attentions = split_attentions(gm, "patch_parallel")
    emit = Emitter(gm, None, prefix="pp")
    split = TokenSplit(gm, {block_of(node, "patch_parallel") for node in attentions}, emit, AXIS, pp.degree,
                       ctx.plan.mesh.index(AXIS, ctx.rank), "patch_parallel")
    split.seed_from(attentions)
    inserted: list[Inserted] = []
    split.follow(lambda node: _stale_attention(gm, node, attentions.index(node), split, ctx.step.synchronous,
                                               inserted))
    split.mark_expert_choice()
    return PassResult(gm, True, emit.inserted + inserted)


def kv_key(attention: int) -> str:
    return f"attn{attention}_kv"


def _stale_attention(gm: fx.GraphModule, node: fx.Node, i: int, split: TokenSplit, synchronous: bool,
                     inserted: list[Inserted]):
    """Replace attention leaf `node` (the i-th) by steps 1-4 above; returns the node that stands
    for it and the layouts of what it returns. Only the image's K/V travel and are kept: the
    text rows (every rank holds them, see [Note: joint layouts] in sequence_parallel.py) are
    this step's on every rank."""
    call = joint_call(gm, node, split, kv_buffer=True)
    emit = Emitter(gm, None, staleness=0 if synchronous else 1, prefix=f"a{i}")
    piece = call.keys.tokens // split.parts
    with gm.graph.inserting_before(node):
        qkv = emit.module(Kind.QKV, f"{node.target}.sp_qkv", kwargs=call.args)
        q, kv = (emit.call(Kind.GLUE, operator.getitem, qkv, j) for j in (0, 1))
        image = emit.call(Kind.GLUE, image_rows, kv, call.keys.before, piece)
        pending = emit.call(Kind.GATHER_START, ops.gather_start, image, name=f"attention {i} k/v", layer=None,
                            axis=AXIS, channel=MAIN if synchronous else STALE)
        if synchronous:
            gathered = emit.call(Kind.GATHER_WAIT, ops.wait, pending)
            emit.call(Kind.CACHE_WRITE, ops.cache_write, emit.call(Kind.GLUE, ops.ready, gathered), key=kv_key(i))
        else:
            previous = emit.call(Kind.PENDING, ops.cache_read, key=kv_key(i))
            gathered = emit.call(Kind.GATHER_WAIT, ops.wait, previous)
            emit.call(Kind.CACHE_WRITE, ops.cache_write, pending, key=kv_key(i))
        every_patch = emit.call(Kind.GLUE, with_piece, gathered, image, split.index)
        every_token = emit.call(Kind.GLUE, with_text, kv, every_patch, call.keys.before, piece)
        out = emit.module(Kind.ATTEND, f"{node.target}.sp_attend", q, every_token, call.mask)
        result = emit.module(Kind.ATTENTION_OUT, f"{node.target}.sp_out", out, kwargs=call.args)
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
    inserted += emit.inserted
    return result, call.returned
