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

The MoE layers run expert parallelism on the rank's token shard, unchanged. A rank's
token shard is the contiguous piece at its "sp" index; the pieces are gathered (all-gather
over "sp") where the tokens leave the token-wise region, before the model un-patchifies.

[Note: the token region]
Which values hold tokens is read from the traced graph, not from a per-model wrapper. The
blocks are the modules around attention layers (`blocks.3` around `blocks.3.attn`); with
the recorded shapes, a value is a token value if it is [B, N, ...] with N the attention
input's token count. The region is every node inside the blocks, plus the token values
computed from it after the last block (the final layer). A token value that enters the
region from outside (the patch embedding plus positions) is cut to this rank's piece
where it enters; a token value that leaves it is gathered where it leaves. Inside the
region every op must be token-wise: a node that turns token values into something else
(a mean over tokens, say) would see only a piece, so the pass refuses it by name.

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
from moedit.graph import Emitter, Inserted, Kind, kind_of, meta, run_input
from moedit.pipeline import PassContext, PassResult, shallow_copy
from moedit.plan import PlanError
from moedit.runtime import ops
from moedit.tracer import attention_nodes
from moedit.runtime.sequence_ops import (KVAttention, OutputProjection, Projections, attend, attend_block, from_ranks,
                                         heads_to_ranks, merge_blocks, merged_output, pad_rows, ranks_to_heads,
                                         ranks_to_tokens, shard, tokens_to_ranks, unpad_rows)


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
    """Split the tokens over the "sp" axis; attention by Ulysses, Ring or both."""
    sp = ctx.plan.sequence_parallel
    if sp.degree == 1:
        return PassResult(gm, False, [])
    attentions = attention_nodes(gm)
    region, tokens = token_region(gm, attentions, "sequence_parallel")
    _check_degrees(gm, attentions, tokens, ctx)
    emit = Emitter(gm, None, prefix="sp")
    split_tokens(gm, region, tokens, emit, "sp", sp.degree, ctx.plan.mesh.index("sp", ctx.rank))
    inserted = list(emit.inserted)
    for i, node in enumerate(attentions):
        inserted += _split_attention(gm, node, i, ctx)
    return PassResult(gm, True, inserted)


def split_tokens(gm: fx.GraphModule, region: set[fx.Node], tokens: int, emit: Emitter, axis: str, parts: int,
                 index: int) -> None:
    """Cut every token value entering `region` to piece `index` of `parts` along the tokens, and
    gather every value leaving it over mesh `axis` (see [Note: the token region])."""
    entering = [value for value in gm.graph.nodes if value not in region and is_token(value, tokens)
                and any(user in region for user in value.users)]
    for value in entering:
        with gm.graph.inserting_after(value):
            piece = emit.call(Kind.SHARD, shard, value, 1, parts, index)
        value.replace_all_uses_with(piece, delete_user_cb=lambda user: user in region)
    leaving = [node for node in gm.graph.nodes if node in region and any(u not in region for u in node.users)]
    for value in leaving:
        with gm.graph.inserting_before(value.next):
            pending = emit.call(Kind.GATHER_START, ops.gather_start, value, name="gather of the tokens", layer=None,
                                axis=axis)
            whole = emit.call(Kind.GLUE, from_ranks, emit.call(Kind.GATHER_WAIT, ops.wait, pending), 1)
        value.replace_all_uses_with(whole, delete_user_cb=lambda user: user not in region and user is not pending)


def is_token(node: fx.Node, tokens: int) -> bool:
    shape = meta(node).get("shape")
    return shape is not None and len(shape) >= 3 and shape[1] == tokens


def block_of(node: fx.Node, technique: str = "sequence_parallel") -> str:
    """The repeated block around an attention node: the innermost indexed module on its path."""
    parts = node.target.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[: i + 1])
    raise PlanError(f"{technique}: attention {node.target!r} is not inside a list of blocks (a path like "
                    "'blocks.3.attn'); moedit splits the tokens for the stack of blocks around attention")


def token_region(gm: fx.GraphModule, attentions: list[fx.Node], technique: str) -> tuple[set[fx.Node], int]:
    """The nodes that run on this rank's token piece, and the token count (see [Note: the token region]).
    After expert_parallel, the nodes it emitted for a MoE layer are in the region too."""
    if not attentions:
        raise PlanError(f"{technique}: the model has no attention layer moedit recognises; register an "
                        "adapter for its attention class with moedit.register_attention(cls, adapter)")
    shape = meta(attentions[0].args[0]).get("shape")
    if shape is None:
        raise PlanError(f"{technique} needs the model's activation shapes: give the model an "
                        "`example_inputs(batch)` method returning inputs of the right shapes")
    tokens = shape[1]
    blocks = {block_of(node, technique) for node in attentions}
    region: set[fx.Node] = set()
    for node in gm.graph.nodes:
        paths = [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]
        inside = any(path in blocks for path in paths) or meta(node).get("layer") is not None
        if inside or (is_token(node, tokens) and any(a in region for a in node.all_input_nodes)):
            region.add(node)
    for node in region:
        if kind_of(node) is None and not is_token(node, tokens) and node.target is not operator.getitem \
                and any(a in region and is_token(a, tokens) for a in node.all_input_nodes):
            raise PlanError(f"{technique}: {node.format_node()} inside the blocks turns token values into a value "
                            f"of shape {meta(node).get('shape')}; with the tokens split each rank would see only "
                            "its piece, so moedit cannot split this model's tokens")
    return region, tokens


def _check_degrees(gm: fx.GraphModule, attentions: list[fx.Node], tokens: int, ctx: PassContext) -> None:
    sp = ctx.plan.sequence_parallel
    if tokens % sp.degree:
        raise PlanError(f"sequence_parallel: ulysses x ring ({sp.ulysses} x {sp.ring} = {sp.degree}) must divide "
                        f"the tokens per image ({tokens}); choose degrees whose product divides {tokens}")
    for node in attentions:
        attn = gm.get_submodule(node.target)
        heads = check_attention(gm, node, "sequence_parallel").heads(attn)
        if heads % sp.ulysses:
            raise PlanError(f"sequence_parallel.ulysses ({sp.ulysses}) must divide the head count of "
                            f"{node.target} ({heads}); choose a Ulysses degree that divides {heads} and put the "
                            "rest of the ranks on ring")


def check_attention(gm: fx.GraphModule, node: fx.Node, technique: str):
    """Refuse an attention leaf moedit cannot split the tokens of; return its adapter."""
    attn = gm.get_submodule(node.target)
    adapter = attention_adapter_for(attn)
    problem = adapter.check(attn)
    if problem is not None:
        raise PlanError(f"{technique}: {node.target}: {problem}")
    if len(node.args) != 1 or node.kwargs:
        raise PlanError(f"{technique}: {node.target} is called with more than the hidden states "
                        f"({node.format_node()}); moedit splits self-attention over one token sequence only")
    return adapter


def local_attention(gm: fx.GraphModule, node: fx.Node, kv_buffer: bool = False) -> float | None:
    """Give attention leaf `node` a copy of its module holding graph nodes for its q/k/v projection
    (`sp_qkv`) and output projection (`sp_out`), and with `kv_buffer` for attention to a K/V
    buffer (`sp_attend`, patch parallelism and PipeFusion); returns the attention's scale."""
    attn = gm.get_submodule(node.target)
    adapter = attention_adapter_for(attn)
    scale = adapter.scale(attn)
    local = shallow_copy(attn)
    local.add_module("sp_qkv", Projections(adapter, local))
    local.add_module("sp_out", OutputProjection(adapter, local))
    if kv_buffer:
        local.add_module("sp_attend", KVAttention(scale))
    parent, _, name = node.target.rpartition(".")
    setattr(gm.get_submodule(parent), name, local)
    return scale


def _split_attention(gm: fx.GraphModule, node: fx.Node, index: int, ctx: PassContext) -> list[Inserted]:
    """Replace attention leaf `node` by projections, exchanges and attention over every token."""
    sp = ctx.plan.sequence_parallel
    scale = local_attention(gm, node)
    emit = Emitter(gm, None, prefix=f"a{index}")
    with gm.graph.inserting_before(node):
        qkv = emit.module(Kind.QKV, f"{node.target}.sp_qkv", node.args[0])
        if sp.ulysses > 1:
            qkv = _ulysses(emit, qkv, heads_to_ranks, ranks_to_tokens, sp.ulysses, f"attention {index} q/k/v")
        if sp.ring > 1:
            out = _ring(emit, qkv, sp.ring, scale, index)
        else:
            out = emit.call(Kind.ATTEND, attend, qkv, scale)
        if sp.ulysses > 1:
            out = _ulysses(emit, out, tokens_to_ranks, ranks_to_heads, sp.ulysses, f"attention {index} output")
        result = emit.module(Kind.ATTENTION_OUT, f"{node.target}.sp_out", out)
    node.replace_all_uses_with(result)
    gm.graph.erase_node(node)
    return emit.inserted


def _ulysses(emit: Emitter, value: fx.Node, to_ranks, from_ranks_, ranks: int, name: str) -> fx.Node:
    rows = emit.call(Kind.GLUE, to_ranks, value, ranks)
    pending = emit.call(Kind.ULYSSES_START, ops.exchange_start, rows, [1] * ranks, [1] * ranks, name=name,
                        layer=None, axis="ulysses")
    return emit.call(Kind.GLUE, from_ranks_, emit.call(Kind.ULYSSES_WAIT, ops.wait, pending))


def _ring(emit: Emitter, qkv: fx.Node, ranks: int, scale, index: int) -> fx.Node:
    """R turns: attend to the k/v block held while the next one is in flight, merging as they come."""
    q = emit.call(Kind.GLUE, operator.getitem, qkv, 0)
    kv = emit.call(Kind.GLUE, operator.getitem, qkv, slice(1, None))
    partial = None
    for turn in range(ranks):
        last = turn == ranks - 1
        if not last:
            pending = emit.call(Kind.RING_START, ops.ring_start, kv, name=f"attention {index} k/v", layer=None,
                                axis="ring")
        block = emit.call(Kind.ATTEND, attend_block, q, kv, scale)
        partial = block if partial is None else emit.call(Kind.ATTEND, merge_blocks, partial, block)
        if not last:
            kv = emit.call(Kind.RING_WAIT, ops.wait, pending)
    return emit.call(Kind.GLUE, merged_output, partial, q)
