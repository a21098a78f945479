"""MoE adapters: how moedit sees a MoE layer class without copying or changing it.

An adapter exposes a layer's parts in one canonical form:

    route(moe, tokens [T,H], *extra) -> (expert_ids [T,K] int64, weights [T,K])
    experts(moe)             -> list of modules, each [n,H] -> [n,H]
    shared_expert(moe)       -> module [T,H] -> [T,H], or None
    combine(moe, routed, shared, *extra) -> [T,H]   (how the two outputs add up)
    output(moe, out [B,N,H]) -> what the layer's forward returns (by default `out`)

`extra` are the arguments the layer is called with after its tokens (a timestep
embedding, a mask), as they are: `route` expands a per-sample value to per-token itself.
See [Note: adapter shapes] for expert-choice routing (`empty_slots`) and experts whose
weights are packed into one parameter.

Registering one for a third-party class takes a few lines:

    class MyMoEAdapter(moedit.MoEAdapter):
        def route(self, moe, tokens):
            return moe.router(tokens)
        def experts(self, moe):
            return list(moe.experts)

    moedit.register_adapter(MyMoE, MyMoEAdapter())

Attention gets the same kind of adapter, for the passes that split one image's tokens
over ranks (sequence parallelism):

    heads(attn)              -> number of attention heads
    qkv(attn, x [B,n,H])     -> q, k, v, each [B, heads, n, d], with any q/k normalisation applied
    out(attn, o [B,heads,n,d]) -> [B,n,H]   (merging the heads and the output projection)
    scale(attn)              -> softmax scale, or None for 1/sqrt(d)
    check(attn)              -> why this instance cannot be split, or None

between which moedit computes softmax(q k^T * scale) v itself, over all n tokens of
the image, wherever they live. Attention over more than one token stream (joint image+text
attention, text as added keys/values) declares its streams, see [Note: attention streams].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn


# [Note: adapter shapes]
# Three shapes of MoE layer fit the canonical form without changing it:
# * Expert-choice routing (each expert picks its tokens, so a token gets 0..E experts): the
#   adapter sets `empty_slots = True` and `route` returns K = top_k(moe) slots on every call
#   (E, say), expert id -1 in a slot that holds no expert. expert_parallel then gives the
#   permute the keep mask `expert_ids >= 0`, so empty slots are never exchanged, and their
#   outputs are zero (their weights are set to 0). Top-k layers (the default False) get no mask.
# * Experts packed into one parameter (`w_up [E,H,F]`): `experts` returns small view modules
#   that read their expert's rows of the packed parameter when called, holding the layer
#   by a plain reference (not as a submodule, as [Note: layer views] in expert_ops.py). The
#   outputs are exact, but a rank cannot drop other ranks' rows of a parameter, so every rank
#   keeps the whole packed parameter (explain() says so); per-expert submodules save memory.
# * Expert choice across a token split: an expert-choice adapter may also split `route` in
#   two, `scores(moe, tokens, *extra) -> [T, E]` (token-wise) and `choose(moe, scores [B, N, E])
#   -> (expert_ids, weights), each [B, N, E]` over every token of each image. Then moedit
#   routes in those two steps, and when sequence parallelism splits an image's tokens over
#   ranks it all-gathers the scores ([B, n, E] a rank, small beside the activations), chooses
#   over the whole image and keeps this rank's rows: the same choice as on one device. A
#   route-only expert-choice adapter is refused under a token split.
# * Extra inputs (`moe(x, temb)`): the call's arguments after the tokens reach `route` and
#   `combine` unchanged; a layer that returns more than its output (`(out, aux_loss)`)
#   builds it in `output`. Arguments an adapter does not take are an error, never dropped.


class MoEAdapter:
    """Describes one MoE layer class in canonical form; subclass and override what differs."""

    empty_slots: bool = False  # route may return expert id -1 ("no expert"), see [Note: adapter shapes]

    def route(self, moe: nn.Module, tokens: torch.Tensor, *extra) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def experts(self, moe: nn.Module) -> Sequence[nn.Module]:
        raise NotImplementedError

    def shared_expert(self, moe: nn.Module) -> nn.Module | None:
        return None

    def combine(self, moe: nn.Module, routed: torch.Tensor, shared: torch.Tensor | None, *extra,
                **extra_kwargs) -> torch.Tensor:
        return routed if shared is None else routed + shared

    def output(self, moe: nn.Module, out: torch.Tensor):
        """What the layer's forward returns, given its output [B,N,H]; override for a layer that
        returns more, e.g. `return out, out.new_zeros(())` for (out, aux_loss)."""
        return out

    def top_k(self, moe: nn.Module) -> int:
        raise NotImplementedError

    def scores(self, moe: nn.Module, tokens: torch.Tensor, *extra) -> torch.Tensor:
        """Expert choice in two steps (optional, see [Note: adapter shapes]): router scores [T, E]."""
        raise NotImplementedError

    def choose(self, moe: nn.Module, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """... and the choice over every token of each image: scores [B, N, E] -> (ids, weights), each [B, N, E]."""
        raise NotImplementedError

    def hidden_size(self, moe: nn.Module) -> int:
        """H; by default the last dim of the first expert's first parameter (its input projection)."""
        weight = next(self.experts(moe)[0].parameters(), None)
        if weight is None:
            raise TypeError(f"{type(self).__name__}: the experts of {type(moe).__name__} hold no parameters (views "
                            "of packed weights?); override MoEAdapter.hidden_size(moe) to return the hidden size")
        return weight.shape[-1]


def overrides(adapter: MoEAdapter, method: str) -> bool:
    """Whether `adapter`'s class defines `method` itself rather than inheriting MoEAdapter's."""
    return getattr(type(adapter), method) is not getattr(MoEAdapter, method)


# [Note: attention streams]
# Real MMDiTs attend over more than one token stream: HiDream's and Flux's double-stream
# blocks join image and text tokens in one attention, NucleusMoE's image queries attend to
# image and text keys. An attention adapter whose `streams(attn)` returns a `Streams` names
# the forward's arguments that hold tokens, in the order attention joins them:
#
#     queries   the arguments whose tokens ask, joined in this order  ("hidden_states", "encoder_hidden_states")
#     keys      the arguments whose tokens are attended to             (the same, or more: added K/V)
#     outputs   which query stream each returned tensor carries        (default: `queries`, one tensor if one)
#     aligned   tensors indexed by those tokens (RoPE tables, masks):  {"image_rotary_emb": ("queries", 1)}
#               argument -> (a stream, "queries" or "keys", token dim); "name.i" for a tuple's element i
#     key_mask  an argument holding a [B, Lk] boolean mask over the joint keys (True: attend), or None
#     image     the argument that holds the image's tokens alone, if any (not in a single-stream
#               block, whose one argument already joins image and text): where the split starts
#
# and `joint_qkv(attn, args)` returns q [B,h,Lq,d] and k, v [B,h,Lk,d] over the joined
# tokens (RoPE and q/k norms applied; grouped K/V heads repeated to h), `joint_out(attn, o,
# args)` what the module returns from o [B,h,Lq,d]. `args` maps the forward's parameter names
# to what it was called with, token arguments cut to this rank's rows.
#
# Under sequence parallelism moedit splits the image tokens and replicates the text tokens
# on every rank (xDiT's choice for joint attention, rather than diffusers' split of both
# streams): text is short beside the image (a few hundred tokens against thousands), so
# replicating it costs little compute, keeps every text-only op of the model (caption
# projections, the text stream's MLP, slicing the text out again) untouched and exact, and
# needs no padding when the text length does not divide by the ranks. What this means for
# the exchanges is in [Note: joint layouts] in passes/sequence_parallel.py.
@dataclass(frozen=True)
class Streams:
    queries: tuple[str, ...]
    keys: tuple[str, ...]
    outputs: tuple[str, ...] | None = None
    aligned: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    key_mask: str | None = None
    image: str | None = None

    def returned(self) -> tuple[str, ...]:
        return self.outputs or self.queries


class AttentionAdapter:
    """Describes one attention class in canonical form; subclass and override. Plain
    self-attention overrides `qkv`/`out`; attention over several token streams overrides
    `streams`, `joint_qkv` and `joint_out` (see [Note: attention streams])."""

    def heads(self, attn: nn.Module) -> int:
        raise NotImplementedError

    def qkv(self, attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def out(self, attn: nn.Module, o: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scale(self, attn: nn.Module) -> float | None:
        return None

    def check(self, attn: nn.Module) -> str | None:
        """Why this instance cannot be split (a configuration the adapter does not cover), or None."""
        return None

    def streams(self, attn: nn.Module) -> Streams | None:
        """The token streams of a joint attention, or None for self-attention over its first argument."""
        return None

    def joint_qkv(self, attn: nn.Module, args: Mapping[str, Any]):
        raise NotImplementedError

    def joint_out(self, attn: nn.Module, o: torch.Tensor, args: Mapping[str, Any]):
        raise NotImplementedError


_ADAPTERS: dict[type, MoEAdapter] = {}
_ATTENTION: dict[type, AttentionAdapter] = {}
_LEAVES: set[type] = set()
_BATCH_DIMS: dict[type, dict[str, int | None]] = {}


def register_adapter(module_type: type, adapter: MoEAdapter) -> None:
    """Make moedit treat every `module_type` instance as a MoE layer described by `adapter`."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_adapter needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(adapter, MoEAdapter):
        raise TypeError(f"adapter must be a moedit.MoEAdapter instance, got {type(adapter).__name__}")
    _ADAPTERS[module_type] = adapter


def register_attention(module_type: type, adapter: AttentionAdapter) -> None:
    """Make moedit treat every `module_type` instance as self-attention described by `adapter`
    (it is kept as one node when tracing, and sequence parallelism can split it)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_attention needs an nn.Module subclass, got {module_type!r}")
    if not isinstance(adapter, AttentionAdapter):
        raise TypeError(f"adapter must be a moedit.AttentionAdapter instance, got {type(adapter).__name__}")
    _ATTENTION[module_type] = adapter
    _LEAVES.add(module_type)


def register_leaf(module_type: type) -> None:
    """Keep `module_type` (attention, say) as one opaque node when tracing."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_leaf needs an nn.Module subclass, got {module_type!r}")
    _LEAVES.add(module_type)


def register_batch_dims(model_type: type, batch_dims: dict[str, int | None]) -> None:
    """The batch axis of each input of `model_type` whose batch axis is not the first (see
    `compile`'s `batch_dims`), used when the caller names none: a model's own layout, as
    HiDream-I1 stacks its Llama states [layers, B, n, C]."""
    if not (isinstance(model_type, type) and issubclass(model_type, nn.Module)):
        raise TypeError(f"register_batch_dims needs an nn.Module subclass, got {model_type!r}")
    _BATCH_DIMS[model_type] = dict(batch_dims)


def batch_dims_for(model: nn.Module) -> dict[str, int | None]:
    return next((dict(_BATCH_DIMS[cls]) for cls in type(model).__mro__ if cls in _BATCH_DIMS), {})


def adapter_for(module: nn.Module) -> MoEAdapter | None:
    for cls in type(module).__mro__:
        if cls in _ADAPTERS:
            return _ADAPTERS[cls]
    return None


def attention_adapter_for(module: nn.Module) -> AttentionAdapter | None:
    for cls in type(module).__mro__:
        if cls in _ATTENTION:
            return _ATTENTION[cls]
    return None


def is_registered_leaf(module: nn.Module) -> bool:
    return any(cls in _LEAVES for cls in type(module).__mro__)

