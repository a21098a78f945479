"""Adapters for diffusers' modules: import this module to register them.

    import moedit.models.diffusers_adapters   # needs `pip install diffusers`

Attention (for sequence parallelism, see [Note: attention streams] in moedit/adapters.py):
* `Attention` as plain self-attention: only the plain configuration (called with the
  hidden states alone, no group or spatial norm, no residual inside, no rescaling, the
  default processors), and NucleusMoE-Image's attention (that class with its processor:
  image queries, image and text keys);
* HiDream-I1's `HiDreamAttention`, both block kinds (joint image+text, and the single
  stream that already holds both);
* Flux's `FluxAttention`, both block kinds.
Any other configuration is refused by name at compile time rather than split wrongly.

MoE layers: HiDream-I1's `MOEFeedForwardSwiGLU` (top-k with a shared expert) and
NucleusMoE-Image's `NucleusMoELayer` (expert choice, experts packed in one `SwiGLUExperts`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from moedit.adapters import (AttentionAdapter, MoEAdapter, Streams, register_adapter, register_attention,
                            register_batch_dims)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """[B, L, h, d] -> [B, h, L, d]."""
    return x.transpose(1, 2)


def _merge_heads(o: torch.Tensor) -> torch.Tensor:
    """[B, h, L, d] -> [B, L, h*d]."""
    return o.transpose(1, 2).flatten(2)


# -- diffusers' Attention: plain self-attention, or NucleusMoE-Image's -----------------------

class DiffusersAttentionAdapter(AttentionAdapter):
    def check(self, attn):
        if _is_nucleus(attn):
            return None
        unsupported = [name for name, bad in (
            ("group_norm", getattr(attn, "group_norm", None) is not None),
            ("spatial_norm", getattr(attn, "spatial_norm", None) is not None),
            ("residual_connection", getattr(attn, "residual_connection", False)),
            ("rescale_output_factor", getattr(attn, "rescale_output_factor", 1) != 1),
            ("added_kv_proj_dim", getattr(attn, "added_kv_proj_dim", None) is not None),
            (f"processor {type(attn.processor).__name__}", type(attn.processor) not in (AttnProcessor,
                                                                                        AttnProcessor2_0)),
        ) if bad]
        if unsupported:
            return (f"diffusers {type(attn).__name__} with {', '.join(unsupported)} is not supported by its moedit "
                    "adapter; register an AttentionAdapter for it (moedit.register_attention)")
        return None

    def heads(self, attn):
        return attn.heads

    def qkv(self, attn, x):
        batch = x.shape[0]
        q, k, v = (proj(x).view(batch, -1, attn.heads, proj.out_features // attn.heads).transpose(1, 2)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return q, k, v

    def out(self, attn, o):
        return attn.to_out[1](attn.to_out[0](o.transpose(1, 2).flatten(2)))

    def scale(self, attn):
        # AttnProcessor2_0 (and NucleusMoE's) leave the scale to scaled_dot_product_attention's
        # default; AttnProcessor uses attn.scale
        return attn.scale if type(attn.processor) is AttnProcessor else None

    # NucleusMoE-Image: image queries; keys and values of the image and of the text (added K/V),
    # RoPE on both (the image's table is (img_freqs [N, d/2], txt_freqs [T, d/2])); grouped K/V heads.
    def streams(self, attn):
        if not _is_nucleus(attn):
            return None
        return Streams(queries=("hidden_states",), keys=("hidden_states", "encoder_hidden_states"),
                       aligned={"image_rotary_emb.0": ("hidden_states", 0)}, key_mask="attention_mask",
                       image="hidden_states")

    def joint_qkv(self, attn, args):
        if args.get("cached_txt_key") is not None:
            raise ValueError("NucleusMoE attention with cached_txt_key/cached_txt_value is not supported under "
                             "sequence parallelism; call the model without them")
        x, text, rope = args["hidden_states"], args.get("encoder_hidden_states"), args.get("image_rotary_emb")
        kv_heads = attn.inner_kv_dim // (attn.inner_dim // attn.heads)
        q = attn.to_q(x).unflatten(-1, (attn.heads, -1))
        k = attn.to_k(x).unflatten(-1, (kv_heads, -1))
        v = attn.to_v(x).unflatten(-1, (kv_heads, -1))
        q, k = attn.norm_q(q) if attn.norm_q is not None else q, attn.norm_k(k) if attn.norm_k is not None else k
        if rope is not None:
            q, k = _nucleus_rope(q, rope[0]), _nucleus_rope(k, rope[0])
        if text is not None:
            text_k = attn.add_k_proj(text).unflatten(-1, (kv_heads, -1))
            text_v = attn.add_v_proj(text).unflatten(-1, (kv_heads, -1))
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            if rope is not None:
                text_k = _nucleus_rope(text_k, rope[1])
            k, v = torch.cat([k, text_k], dim=1), torch.cat([v, text_v], dim=1)
        k, v = (t.repeat_interleave(attn.heads // kv_heads, dim=2) for t in (k, v))
        return _heads_first(q), _heads_first(k), _heads_first(v)

    def joint_out(self, attn, o, args):
        out = attn.to_out[0](_merge_heads(o).to(args["hidden_states"].dtype))
        return attn.to_out[1](out) if len(attn.to_out) > 1 else out


def _nucleus_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """NucleusMoE's complex RoPE (`_apply_rotary_emb_nucleus(..., use_real=False)`): x [B, L, h, d], freqs [L, d/2]."""
    rotated = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2)) * freqs.unsqueeze(1)
    return torch.view_as_real(rotated).flatten(3).type_as(x)


def _is_nucleus(attn) -> bool:
    return _NucleusProcessor is not None and isinstance(attn.processor, _NucleusProcessor)


register_attention(Attention, DiffusersAttentionAdapter())


# -- HiDream-I1 -----------------------------------------------------------------------------

try:
    from diffusers.models.transformers.transformer_hidream_image import (HiDreamAttention, HiDreamAttnProcessor,
                                                                         HiDreamImageTransformer2DModel,
                                                                         MOEFeedForwardSwiGLU, apply_rope)
except ImportError:  # an older diffusers
    HiDreamAttention = None


class HiDreamAttentionAdapter(AttentionAdapter):
    """HiDream's attention: a double-stream block joins image and text queries, keys and values
    (image first; each stream with its own projections and q/k RMS norms); a single-stream
    block's one argument already holds image and text tokens. RoPE over the joined tokens,
    the optional mask multiplies the image keys."""

    def check(self, attn):
        if type(attn.processor) is not HiDreamAttnProcessor:
            return f"HiDreamAttention with processor {type(attn.processor).__name__} is not supported"
        return None

    def heads(self, attn):
        return attn.heads

    def streams(self, attn):
        queries = ("norm_hidden_states",) if attn.single else ("norm_hidden_states", "norm_encoder_hidden_states")
        return Streams(queries=queries, keys=queries, aligned={"image_rotary_emb": ("queries", 1),
                                                               "hidden_states_masks": ("norm_hidden_states", 1)},
                       image=None if attn.single else "norm_hidden_states")

    def joint_qkv(self, attn, args):
        x, mask = args["norm_hidden_states"], args.get("hidden_states_masks")
        q, k, v = self._project(x, attn.to_q, attn.to_k, attn.to_v, attn.q_rms_norm, attn.k_rms_norm, attn.heads)
        if mask is not None:
            k = k * mask.view(x.shape[0], -1, 1, 1)
        if not attn.single:
            text = args["norm_encoder_hidden_states"]
            qt, kt, vt = self._project(text, attn.to_q_t, attn.to_k_t, attn.to_v_t, attn.q_rms_norm_t,
                                       attn.k_rms_norm_t, attn.heads)
            q, k, v = torch.cat([q, qt], dim=1), torch.cat([k, kt], dim=1), torch.cat([v, vt], dim=1)
        rope = args["image_rotary_emb"]
        if q.shape[-1] == rope.shape[-3] * 2:
            q, k = apply_rope(q, k, rope)
        else:  # RoPE on the first half of each head
            (q1, q2), (k1, k2) = q.chunk(2, dim=-1), k.chunk(2, dim=-1)
            q1, k1 = apply_rope(q1, k1, rope)
            q, k = torch.cat([q1, q2], dim=-1), torch.cat([k1, k2], dim=-1)
        return _heads_first(q), _heads_first(k), _heads_first(v)

    @staticmethod
    def _project(x, to_q, to_k, to_v, norm_q, norm_k, heads):
        dtype = x.dtype
        q, k, v = norm_q(to_q(x)).to(dtype), norm_k(to_k(x)).to(dtype), to_v(x)
        return (t.view(x.shape[0], -1, heads, t.shape[-1] // heads) for t in (q, k, v))

    def joint_out(self, attn, o, args):
        o = _merge_heads(o)
        if attn.single:
            return attn.to_out(o)
        image, text = o.split([args["norm_hidden_states"].shape[1], args["norm_encoder_hidden_states"].shape[1]], 1)
        return attn.to_out(image), attn.to_out_t(text)


# HiDream-I1's MoE feed-forward: a DeepSeek-style softmax gate over routed SwiGLU experts,
# top-k weights not renormalised, plus a shared expert.
class HiDreamMoEAdapter(MoEAdapter):
    def route(self, moe, tokens):
        expert_ids, weights, _ = moe.gate(tokens.unsqueeze(0))  # the gate reads [B, N, H]
        return expert_ids, weights

    def experts(self, moe):
        return list(moe.experts)

    def shared_expert(self, moe):
        return moe.shared_experts

    def top_k(self, moe):
        return moe.gate.top_k


if HiDreamAttention is not None:
    register_attention(HiDreamAttention, HiDreamAttentionAdapter())
    register_adapter(MOEFeedForwardSwiGLU, HiDreamMoEAdapter())
    # the Llama layers' states come stacked first, [layers, B, n, C]
    register_batch_dims(HiDreamImageTransformer2DModel, {"encoder_hidden_states_llama3": 1})


# -- Flux -----------------------------------------------------------------------------------

try:
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import (FluxAttention, FluxAttnProcessor, FluxTransformer2DModel,
                                                                _get_qkv_projections)
except ImportError:
    FluxAttention = None


class FluxAttentionAdapter(AttentionAdapter):
    """Flux's attention: a double-stream block joins text and image (text first) and returns
    (image, text); a single-stream block's one argument already holds both. RoPE (cos, sin)
    [L, d] over the joined tokens."""

    def check(self, attn):
        if type(attn.processor) is not FluxAttnProcessor:
            return f"FluxAttention with processor {type(attn.processor).__name__} is not supported"
        return None

    def heads(self, attn):
        return attn.heads

    def streams(self, attn):
        rope = {"image_rotary_emb.0": ("queries", 0), "image_rotary_emb.1": ("queries", 0)}
        if attn.added_kv_proj_dim is None:
            return Streams(queries=("hidden_states",), keys=("hidden_states",), aligned=rope,
                           key_mask="attention_mask")
        joined = ("encoder_hidden_states", "hidden_states")
        return Streams(queries=joined, keys=joined, outputs=("hidden_states", "encoder_hidden_states"), aligned=rope,
                       key_mask="attention_mask", image="hidden_states")

    def joint_qkv(self, attn, args):
        q, k, v, tq, tk, tv = _get_qkv_projections(attn, args["hidden_states"], args.get("encoder_hidden_states"))
        q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.added_kv_proj_dim is not None:
            tq, tk, tv = (t.unflatten(-1, (-1, attn.head_dim)) for t in (tq, tk, tv))
            tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
            q, k, v = torch.cat([tq, q], dim=1), torch.cat([tk, k], dim=1), torch.cat([tv, v], dim=1)
        rope = args.get("image_rotary_emb")
        if rope is not None:
            q, k = apply_rotary_emb(q, rope, sequence_dim=1), apply_rotary_emb(k, rope, sequence_dim=1)
        return _heads_first(q), _heads_first(k), _heads_first(v)

    def joint_out(self, attn, o, args):
        o = _merge_heads(o)
        if attn.added_kv_proj_dim is None:
            return o  # a single-stream block projects after its MLP, outside attention
        text, image = o.split([args["encoder_hidden_states"].shape[1], args["hidden_states"].shape[1]], dim=1)
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())


if FluxAttention is not None:
    register_attention(FluxAttention, FluxAttentionAdapter())
    register_batch_dims(FluxTransformer2DModel, {"img_ids": None, "txt_ids": None})  # per token, not per sample


# -- NucleusMoE-Image -----------------------------------------------------------------------

try:
    from diffusers.models.transformers.transformer_nucleusmoe_image import NucleusMoEAttnProcessor2_0, NucleusMoELayer
    _NucleusProcessor = NucleusMoEAttnProcessor2_0
except ImportError:
    _NucleusProcessor = NucleusMoELayer = None


class _PackedSwiGLU(nn.Module):
    """Expert e of a `SwiGLUExperts`: reads its rows of the packed weights when called (no copy;
    the layer is held by a plain reference, see [Note: adapter shapes] in moedit/adapters.py)."""

    def __init__(self, experts: nn.Module, e: int):
        super().__init__()
        object.__setattr__(self, "packed", experts)
        self.e = e

    def forward(self, x):  # SwiGLUExperts' loop for one expert
        gate, up = (x @ self.packed.gate_up_proj[self.e]).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.packed.down_proj[self.e]


class NucleusMoEAdapter(MoEAdapter):
    """NucleusMoE-Image's MoE: expert choice -- each expert takes its top-C tokens of each image
    (C = ceil(capacity_factor * N / E)) by router scores over [timestep embedding, unmodulated
    states]; a token's weights are its chosen scores renormalised to sum to one, times
    `route_scale`; plus a shared expert. Slot e holds expert e or -1 (`empty_slots`).

    The choice is split in two (`scores`, then `choose` over every token of each image), so
    that when an image's tokens are split over ranks moedit gathers the scores and chooses
    over the whole image (see [Note: expert choice across a token split] in
    passes/expert_parallel.py)."""

    empty_slots = True

    def scores(self, moe, tokens, unmodulated, timestep=None):
        """[T, E] router scores of this rank's tokens (T = B x n, image-major)."""
        router_input = unmodulated.flatten(0, 1)
        if timestep is not None:
            per_token = timestep.repeat_interleave(unmodulated.shape[1], dim=0)
            router_input = torch.cat([per_token, router_input], dim=-1)
        logits = moe.gate(router_input)
        scores = torch.sigmoid(logits.float()) if moe.use_sigmoid else F.softmax(logits.float(), dim=-1)
        return scores.to(logits.dtype)

    def choose(self, moe, scores):
        """scores [B, N, E] over every token of each image -> (expert ids, weights), each [B, N, E]."""
        capacity = max(1, math.ceil(moe.capacity_factor * scores.shape[1] / moe.num_experts))
        chosen = scores.topk(capacity, dim=1).indices  # [B, C, E]
        picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, chosen, True)
        weights = torch.where(picked, scores, torch.zeros_like(scores))
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-12) * moe.route_scale
        ids = torch.where(picked, torch.arange(scores.shape[-1], device=scores.device), -1)
        return ids, weights

    def route(self, moe, tokens, unmodulated, timestep=None):
        scores = self.scores(moe, tokens, unmodulated, timestep).unflatten(0, (unmodulated.shape[0], -1))
        ids, weights = self.choose(moe, scores)
        return ids.flatten(0, 1), weights.flatten(0, 1)

    def experts(self, moe):
        return [_PackedSwiGLU(moe.experts, e) for e in range(moe.num_experts)]

    def shared_expert(self, moe):
        return moe.shared_expert

    def combine(self, moe, routed, shared, *extra, **extra_kwargs):
        return routed + shared

    def top_k(self, moe):
        return moe.num_experts

    def hidden_size(self, moe):
        return moe.hidden_size


if NucleusMoELayer is not None:
    register_adapter(NucleusMoELayer, NucleusMoEAdapter())
