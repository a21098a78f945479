"""Sequence parallelism (xDiT's Ulysses, Ring and USP) and CFG parallelism: exact.

`sequence_parallel` (plan `sequence_parallel: {ulysses: U, ring: R}`) splits one image's
tokens over the U x R ranks of the "sp" axis for the whole stack of blocks and the layers
after it, so every token-wise layer (adaLN modulation, MLPs, MoE, the final layer) runs on
1/(U R) of the tokens; only attention needs every token, and gets them by communication:

    Ulysses  q/k/v [B,h,n,d] from token shards to head shards by one all-to-all over the
             "ulysses" axis (U must divide the head count), attention over every token of
             h/U heads, and the output back by a second all-to-all;
    Ring     q stays; k and v travel around the "ring" axis point to point, R-1 turns, the
             next block's transfer in flight while this block is attended to; the blocks'
             partial outputs merge exactly through their log-sum-exps;
    USP      both: Ulysses inside each ring position, the ring across them.

The MoE layers run expert parallelism on the rank's token shard, unchanged (an expert
choice chooses over the whole image, see [Note: adapter shapes] in moedit/adapters.py).
Where the tokens are split and gathered is read from the traced graph (passes/_tokens.py):
the image's tokens are cut where they enter the blocks and gathered (all-gather over "sp")
where they leave the token-wise region, before the model un-patchifies; text tokens of
joint attention stay whole on every rank ([Note: joint layouts] below).

[Note: the token region]
Sequence parallelism, patch parallelism and PipeFusion find the tokens they split the same
way (passes/_tokens.py). The blocks are the modules around attention layers (`blocks.3`
around `blocks.3.attn`). The image's tokens are cut where they enter the blocks: walking
back from the first attention's image argument (`Streams.image`, or a self-attention's
input) to the values outside the blocks with its token count (the patch embedding plus
positions). From there a layout follows every value that holds them ([Note: joint layouts]
below); a value that loses them outside the blocks (un-patchifying) is where they leave,
and they are gathered there (PipeFusion: joined from the patches and broadcast by the last
stage). Inside the blocks every op must keep the image's rows whole or cut along them: a
node that turns them into something else (a mean over tokens, a slice into the image) would
see only a piece, so the pass refuses it by name.

`cfg_parallel` (plan `cfg_parallel: true`) splits the batch the model is called with into
two halves over the "cfg" axis: under classifier-free guidance the sampler stacks the
conditional and unconditional inputs, so each half of the mesh computes one of them; the
outputs are gathered (one all-gather a step) so every rank forms the guided velocity.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch.fx.node import map_arg

from moedit.adapters import attention_adapter_for
from moedit.graph import Emitter, Inserted, Kind, kind_of, run_input
from moedit.pipeline import PassContext, PassResult
from moedit.plan import PlanError
from moedit.runtime import ops
from moedit.tracer import attention_nodes
from moedit.runtime.sequence_ops import (attend_block, attend_joint, from_ranks, image_heads_to_ranks,
                                         image_out_to_ranks, image_rows, joint_output, joint_rows, key_block_mask,
                                         merge_blocks, merged_output, pad_rows, ranks_to_heads, ranks_to_tokens,
                                         shard, text_key_mask, text_rows, unpad_rows)

from ._tokens import Layout, TokenSplit, joint_call


# -- CFG parallelism -------------------------------------------------------------------
def cfg_parallel(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Each half of the "cfg" axis computes its half of the batch; the outputs are gathered."""
    if not ctx.plan.cfg_parallel:
        return PassResult(gm, False, [])
    index = ctx.plan.mesh.index("cfg", ctx.rank)
    emit = Emitter(gm, None, prefix="cfg")
    inputs = [n for n in gm.graph.find_nodes(op="placeholder") if kind_of(n) is not Kind.RUN]
    for node in inputs:
        with gm.graph.inserting_after(run_input(gm)):
            half = emit.call(Kind.SHARD, shard, node, 0, 2, index)
        node.replace_all_uses_with(half, delete_user_cb=lambda user: user is not half)
    output = gm.graph.output_node()
    with gm.graph.inserting_before(output):
        output.args = map_arg(output.args, lambda value: _gather_halves(emit, value, inputs[0]))
    return PassResult(gm, True, emit.inserted)


def _gather_halves(emit: Emitter, half: fx.Node, whole: fx.Node) -> fx.Node:
    """The two halves of an output, joined on both ranks (`whole`: an input, for the batch size)."""
    padded = emit.call(Kind.GLUE, pad_rows, half, whole, 2)
    pending = emit.call(Kind.GATHER_START, ops.gather_start, padded, name="gather of the CFG halves", layer=None,
                        axis="cfg")
    return emit.call(Kind.GLUE, unpad_rows, emit.call(Kind.GATHER_WAIT, ops.wait, pending), whole)


# -- sequence parallelism --------------------------------------------------------------
def sequence_parallel(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Split the image's tokens over the "sp" axis; attention by Ulysses, Ring or both."""
    sp = ctx.plan.sequence_parallel
    if sp.degree == 1:
        return PassResult(gm, False, [])
    attentions = split_attentions(gm, "sequence_parallel")
    for node in attentions:
        _check_heads(gm, node, sp.ulysses)
    emit = Emitter(gm, None, prefix="sp")
    split = TokenSplit(gm, {block_of(node) for node in attentions}, emit, "sp", sp.degree,
                       ctx.plan.mesh.index("sp", ctx.rank), "sequence_parallel")
    split.seed_from(attentions)
    inserted: list[Inserted] = []

    def on_attention(node: fx.Node):
        return _split_attention(gm, node, split, attentions.index(node), inserted, ctx)

    split.follow(on_attention)
    split.mark_expert_choice()
    return PassResult(gm, True, emit.inserted + inserted)


def _check_heads(gm: fx.GraphModule, node: fx.Node, ulysses: int) -> None:
    attn = gm.get_submodule(node.target)
    heads = attention_adapter_for(attn).heads(attn)
    if heads % ulysses:
        raise PlanError(f"sequence_parallel.ulysses ({ulysses}) must divide the head count of {node.target} "
                        f"({heads}); choose a Ulysses degree that divides {heads} and put the rest of the ranks on "
                        "ring")


def block_of(node: fx.Node, technique: str = "sequence_parallel") -> str:
    """The repeated block around an attention node: the innermost indexed module on its path."""
    parts = node.target.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    raise PlanError(f"{technique}: attention {node.target!r} is not inside a list of blocks (a path like "
                    "'blocks.3.attn'); moedit splits the tokens for the stack of blocks around attention")


def split_attentions(gm: fx.GraphModule, technique: str) -> list[fx.Node]:
    """The attention leaves a token split splits, in program order; refuses a model without any,
    and an attention its adapter says moedit cannot split (naming it)."""
    attentions = attention_nodes(gm)
    if not attentions:
        raise PlanError(f"{technique}: the model has no attention layer moedit recognises; register an adapter "
                        "for its attention class with moedit.register_attention(cls, adapter)")
    for node in attentions:
        attn = gm.get_submodule(node.target)
        problem = attention_adapter_for(attn).check(attn)
        if problem is not None:
            raise PlanError(f"{technique}: {node.target}: {problem}")
    return attentions


# [Note: joint layouts]
# Every attention is split the same way, plain self-attention being the case with one
# stream and no text rows. The image's tokens are split over the "sp" axis; text tokens are
# on every rank (see [Note: attention streams] in moedit/adapters.py for why). So the joined
# queries of an attention are, on every rank, `before` text rows, this rank's n image rows
# and `after` text rows (passes/_tokens.py follows these layouts through the graph), and so
# are its keys. Ulysses sends only the image rows through its all-to-all (each rank keeps
# the text rows of its own heads: every rank has them) and attends over the image's rows of
# U ranks with every text row; afterwards the image rows go back by the second all-to-all,
# and the text rows' outputs, which each rank computed for its heads only, are all-gathered
# (B x T x h x d: small beside the image's exchange). Ring passes only the image's K/V
# around; the text K/V is one more block every rank attends to once, merged like the others
# by its log-sum-exp, and every rank computes the same text rows. A key mask [B, Lk] is used
# in the model's own key order, one block's columns at a time under Ring. RoPE tables and
# masks indexed by the tokens are cut to this rank's rows as their adapter declares
# (`Streams.aligned`). What the replication costs: every rank runs the text rows of every
# token-wise op (the text stream's MLP, a single-stream block's MoE) in full.


def _split_attention(gm: fx.GraphModule, node: fx.Node, split: TokenSplit, index: int, inserted: list[Inserted],
                     ctx: PassContext):
    """Replace attention leaf `node` by projections of this rank's rows, exchanges and attention
    over every token; returns the node that stands for it and the layouts of what it returns."""
    sp = ctx.plan.sequence_parallel
    call = joint_call(gm, node, split)
    queries, keys, mask, scale = call.queries, call.keys, call.mask, call.scale
    emit = Emitter(gm, None, prefix=f"a{index}")
    piece = queries.tokens // sp.degree
    with gm.graph.inserting_before(node):
        qkv = emit.module(Kind.QKV, f"{node.target}.sp_qkv", kwargs=call.args)
        q, kv = (emit.call(Kind.GLUE, operator.getitem, qkv, i) for i in (0, 1))
        if sp.ulysses > 1:
            rows = emit.call(Kind.GLUE, image_heads_to_ranks, q, kv, queries.before, keys.before, piece, sp.ulysses)
            image = _exchange(emit, rows, ranks_to_tokens, sp.ulysses, f"attention {index} q/k/v")
            both = emit.call(Kind.GLUE, joint_rows, image, q, kv, queries, keys, piece, sp.ulysses,
                             ctx.plan.mesh.index("ulysses", ctx.rank))
            q, kv = (emit.call(Kind.GLUE, operator.getitem, both, i) for i in (0, 1))
        rows = piece * sp.ulysses  # image rows per rank after Ulysses
        if sp.ring > 1:
            out = _ring(emit, q, kv, keys, rows, mask, sp.ring, ctx.plan.mesh.index("ring", ctx.rank), scale, index)
        else:
            out = emit.call(Kind.ATTEND, attend_joint, q, kv, scale, mask)
        if sp.ulysses > 1:
            out = _ulysses_back(emit, out, queries, rows, sp.ulysses, index)
        result = emit.module(Kind.ATTENTION_OUT, f"{node.target}.sp_out", out, kwargs=call.args)
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
    inserted += emit.inserted
    return result, call.returned


def _exchange(emit: Emitter, rows: fx.Node, from_ranks_, ranks: int, name: str) -> fx.Node:
    pending = emit.call(Kind.ULYSSES_START, ops.exchange_start, rows, [1] * ranks, [1] * ranks, name=name,
                        layer=None, axis="ulysses")
    return emit.call(Kind.GLUE, from_ranks_, emit.call(Kind.ULYSSES_WAIT, ops.wait, pending))


def _ulysses_back(emit: Emitter, out: fx.Node, queries: Layout, rows: int, ranks: int, index: int) -> fx.Node:
    """The image rows' outputs back to their ranks; the text rows' outputs gathered over the heads."""
    image = _exchange(emit, emit.call(Kind.GLUE, image_out_to_ranks, out, queries.before, rows, ranks),
                      ranks_to_heads, ranks, f"attention {index} output")
    text = None
    if queries.before + queries.after:
        pending = emit.call(Kind.GATHER_START, ops.gather_start, emit.call(Kind.GLUE, text_rows, out, queries.before,
                                                                           rows),
                            name=f"attention {index} text output", layer=None, axis="ulysses")
        text = emit.call(Kind.GLUE, from_ranks, emit.call(Kind.GATHER_WAIT, ops.wait, pending), 1)
    return emit.call(Kind.GLUE, joint_output, image, text, queries.before)


def _ring(emit: Emitter, q: fx.Node, kv: fx.Node, keys: Layout, rows: int, mask, ranks: int, position: int, scale,
          index: int) -> fx.Node:
    """R turns: attend to the image K/V block held while the next one is in flight, merging as they
    come; the text K/V (every rank has it) is one more block, attended to once."""
    image = emit.call(Kind.GLUE, image_rows, kv, keys.before, rows)
    partial = None
    if keys.before + keys.after:
        text = emit.call(Kind.GLUE, text_rows, kv, keys.before, rows)
        partial = emit.call(Kind.ATTEND, attend_block, q, text, scale,
                            emit.call(Kind.GLUE, text_key_mask, mask, keys) if mask is not None else None)
    for turn in range(ranks):
        last = turn == ranks - 1
        if not last:
            pending = emit.call(Kind.RING_START, ops.ring_start, image, name=f"attention {index} k/v", layer=None,
                                axis="ring")
        block_mask = None
        if mask is not None:  # the block that started at ring position (position - turn)
            start = keys.before + (position - turn) % ranks * rows
            block_mask = emit.call(Kind.GLUE, key_block_mask, mask, start, rows)
        block = emit.call(Kind.ATTEND, attend_block, q, image, scale, block_mask)
        partial = block if partial is None else emit.call(Kind.ATTEND, merge_blocks, partial, block)
        if not last:
            image = emit.call(Kind.RING_WAIT, ops.wait, pending)
    return emit.call(Kind.GLUE, merged_output, partial, q)
