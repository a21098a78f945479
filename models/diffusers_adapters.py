"""Adapters for diffusers' modules: import this module to register them.

    import moedit.models.diffusers_adapters   # needs `pip install diffusers`

`diffusers.models.attention_processor.Attention` as self-attention for sequence
parallelism. Only the plain configuration is taken (called with the hidden states alone,
no group or spatial norm, no residual inside, no rescaling, the default processors);
anything else is refused by name at compile time rather than split wrongly.
"""

from __future__ import annotations

from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from diffusers.models.transformers.transformer_hidream_image import MOEFeedForwardSwiGLU

from moedit.adapters import AttentionAdapter, MoEAdapter, register_adapter, register_attention


class DiffusersAttentionAdapter(AttentionAdapter):
    def check(self, attn):
        unsupported = [name for name, bad in (
            ("group_norm", attn.group_norm is not None), ("spatial_norm", attn.spatial_norm is not None),
            ("residual_connection", attn.residual_connection),
            ("rescale_output_factor", attn.rescale_output_factor != 1),
            ("added_kv_proj_dim", attn.added_kv_proj_dim is not None),
            (f"processor {type(attn.processor).__name__}", type(attn.processor) not in (AttnProcessor,
                                                                                        AttnProcessor2_0)),
        ) if bad]
        if unsupported:
            return f"diffusers Attention with {', '.join(unsupported)} is not supported by its moedit adapter"
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
        # AttnProcessor2_0 leaves the scale to scaled_dot_product_attention's default;
        # AttnProcessor uses attn.scale
        return attn.scale if type(attn.processor) is AttnProcessor else None


register_attention(Attention, DiffusersAttentionAdapter())


# HiDream-I1's MoE feed-forward (diffusers' HiDreamImageTransformer2DModel): a DeepSeek-style
# softmax gate over routed SwiGLU experts, top-k weights not renormalised, plus a shared expert.
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


register_adapter(MOEFeedForwardSwiGLU, HiDreamMoEAdapter())
