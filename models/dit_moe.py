"""Reference DiT-MoE: a class-conditional Diffusion Transformer whose every block is MoE.

Module names follow the public DiT-MoE checkpoints (see REFERENCE.md), so their
state dicts load without renaming.

Shape legend:
    B  batch            C  latent channels     S  latent side (S x S)
    p  patch size       N  tokens = (S/p)^2    H  hidden size
    E  routed experts   K  experts per token (top-k)
"""

from __future__ import annotations

import dataclasses
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from moedit.adapters import AttentionAdapter, MoEAdapter, register_adapter, register_attention

# depth, hidden, heads; XL and G use the q/k-normed attention of the released code.
_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "G": (40, 1408, 16),
}
_QK_NORM_SIZES = ("XL", "G")
_NAME = re.compile(r"^(S|B|L|XL|G)/(2|4|8)-(8|16)E2A$")
ALIASES = {
    "dit-moe-s": "S/2-8E2A",
    "dit-moe-b": "B/2-8E2A",
    "dit-moe-l": "L/2-8E2A",
    "dit-moe-xl": "XL/2-8E2A",
    "dit-moe-g": "G/2-16E2A",
}


@dataclasses.dataclass(frozen=True)
class DiTMoEConfig:
    """Constructor arguments, named as in the original DiT / DiT-MoE code."""

    input_size: int = 32
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: int = 4
    class_dropout_prob: float = 0.1
    num_classes: int = 1000
    learn_sigma: bool = True
    num_experts: int = 8
    num_experts_per_tok: int = 2
    qk_norm: bool = False
    num_shared_expert_ratio: int = 2  # the shared expert's width is this many times H

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), type(field.default)
            if type(value) is not kind and not (kind is float and type(value) is int):
                wanted = {bool: "true or false", int: "an integer", float: "a number"}[kind]
                raise ValueError(f"{field.name}: give {wanted}, got {value!r}")
            if kind is int and value < (0 if field.name == "num_shared_expert_ratio" else 1):
                raise ValueError(f"{field.name}: give a positive number, got {value}")
        if not 0 <= self.class_dropout_prob < 1:
            raise ValueError(f"class_dropout_prob: give a probability in [0, 1), got {self.class_dropout_prob}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size ({self.input_size}) must be divisible by patch_size ({self.patch_size})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.hidden_size % 4:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by 4 (the 2-D sin-cos position "
                             "embedding gives a quarter of it to each of sin and cos of each axis)")
        for name, most in (("depth", 512), ("num_experts", 1024), ("num_heads", 1024)):
            if getattr(self, name) > most:  # building the model alone would take minutes
                raise ValueError(f"{name}: at most {most} (the largest reference config has depth 40, 16 experts, "
                                 f"16 heads), got {getattr(self, name)}")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts})"
            )

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels


# A model small enough for multi-rank tests on two CPU cores.
TINY = DiTMoEConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4,
                    num_classes=10, num_experts=8, num_experts_per_tok=2)


# Every name `config_for` accepts, in one line (for help texts and errors).
CONFIG_NAMES = ", ".join([*ALIASES, "tiny", "<S|B|L|XL|G>/<2|4|8>-<8|16>E2A"])


def config_names() -> list[str]:
    """Every name `config_for` accepts: "tiny", each size with each patch and expert count, the aliases."""
    return ["tiny"] + [f"{size}/{patch}-{experts}E2A" for size in _SIZES for patch in (2, 4, 8)
                       for experts in (8, 16)] + list(ALIASES)


def config_for(name: str, **overrides) -> DiTMoEConfig:
    """`"S/2-8E2A"`, `"dit-moe-s"` or `"tiny"`, with constructor-argument overrides."""
    fields = {f.name for f in dataclasses.fields(DiTMoEConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown DiT-MoE argument(s) {unknown}; accepted: {sorted(fields)}")
    canonical = ALIASES.get(name.lower(), name)
    if canonical.lower() == "tiny":
        return dataclasses.replace(TINY, **overrides)
    match = _NAME.match(canonical)
    if match is None:
        raise ValueError(f"unknown DiT-MoE config {name!r}; use one of: {CONFIG_NAMES}")
    size, patch, experts = match.group(1), int(match.group(2)), int(match.group(3))
    depth, hidden, heads = _SIZES[size]
    base = DiTMoEConfig(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads,
                        num_experts=experts, qk_norm=size in _QK_NORM_SIZES)
    return dataclasses.replace(base, **overrides)


def dit_moe(name: str = "S/2-8E2A", **overrides) -> "DiTMoE":
    """Build a reference DiT-MoE in eval mode (on the current default device; use
    `with torch.device("meta"):` to build XL/G without allocating memory)."""
    return DiTMoE(config_for(name, **overrides)).eval()


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """timm-compatible patch embedding: `proj` is a stride-p convolution. [B,C,S,S] -> [B,N,H]."""

    def __init__(self, cfg: DiTMoEConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.num_patches = (cfg.input_size // cfg.patch_size) ** 2

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_size = frequency_size

    def forward(self, t):
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # float32, then the weights' dtype
        return self.mlp(embedding.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding; row `num_classes` is the null class used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels):
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """timm-style self-attention (`qkv`, `proj`), used by DiT-MoE S and B. [B,N,H] -> [B,N,H]."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def project(self, x):
        """[B,N,H] -> q, k, v [B, heads, N, H/heads]."""
        B, N, H = x.shape
        return self.qkv(x).reshape(B, N, 3, self.num_heads, H // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def output(self, out):
        """[B, heads, N, H/heads] -> [B,N,H]."""
        return self.proj(out.transpose(1, 2).flatten(2))

    def forward(self, x):
        return self.output(F.scaled_dot_product_attention(*self.project(x)))


class QKNormAttention(nn.Module):
    """Self-attention with LayerNorm on per-head q and k (`Wqkv`, `q_norm`, `k_norm`,
    `out_proj`), the layout of the released XL and G checkpoints."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        head_dim = hidden_size // num_heads
        self.num_heads = num_heads
        self.Wqkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def project(self, x):
        """[B,N,H] -> q, k, v [B, heads, N, H/heads], q and k normalised."""
        B, N, H = x.shape
        q, k, v = self.Wqkv(x).reshape(B, N, 3, self.num_heads, H // self.num_heads).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def output(self, out):
        """[B, heads, N, H/heads] -> [B,N,H]."""
        return self.out_proj(out.transpose(1, 2).flatten(2))

    def forward(self, x):
        return self.output(F.scaled_dot_product_attention(*self.project(x)))


class MoeMLP(nn.Module):
    """SwiGLU expert without bias: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEGate(nn.Module):
    """Softmax over all E experts, then top-K without renormalisation. [T,H] -> ([T,K], [T,K])."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, tokens):
        scores = F.linear(tokens, self.weight).softmax(dim=-1)
        weights, expert_ids = torch.topk(scores, self.top_k, dim=-1)
        return expert_ids, weights


class RoutedMoE(nn.Module):
    """Top-K routed SwiGLU experts. [B,N,H] -> [B,N,H] (ScMoE's routed branch, models/scmoe.py)."""

    def __init__(self, cfg: DiTMoEConfig):
        super().__init__()
        H = cfg.hidden_size
        self.num_experts_per_tok = cfg.num_experts_per_tok
        self.gate = MoEGate(H, cfg.num_experts, cfg.num_experts_per_tok)
        self.experts = nn.ModuleList(MoeMLP(H, cfg.mlp_ratio * H) for _ in range(cfg.num_experts))

    def routed(self, tokens):
        """[T,H] -> the router-weighted sum of each token's K experts, [T,H]."""
        expert_ids, weights = self.gate(tokens)
        routed = torch.zeros_like(tokens)
        for e, expert in enumerate(self.experts):
            token_idx, slot = torch.nonzero(expert_ids == e, as_tuple=True)
            if token_idx.numel():
                out = expert(tokens[token_idx]) * weights[token_idx, slot, None]
                routed.index_add_(0, token_idx, out)
        return routed

    def forward(self, x):
        return self.routed(x.flatten(0, -2)).reshape(x.shape)


class SparseMoeBlock(RoutedMoE):
    """Top-K routed SwiGLU experts plus one always-on shared expert. [B,N,H] -> [B,N,H].

    The forward pass here is the single-device reference that expert parallelism
    must reproduce; moedit never calls it on a parallel rank.
    """

    def __init__(self, cfg: DiTMoEConfig):
        super().__init__(cfg)
        self.shared_experts = MoeMLP(cfg.hidden_size, cfg.num_shared_expert_ratio * cfg.hidden_size)

    def forward(self, x):
        tokens = x.flatten(0, -2)
        return (self.routed(tokens) + self.shared_experts(tokens)).reshape(x.shape)


class DiTBlock(nn.Module):
    """adaLN-Zero block: x += gate_msa * attn(mod(norm1 x)); x += gate_mlp * moe(mod(norm2 x))."""

    def __init__(self, cfg: DiTMoEConfig):
        super().__init__()
        H = cfg.hidden_size
        self.norm1 = nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
        self.attn = (QKNormAttention if cfg.qk_norm else Attention)(H, cfg.num_heads)
        self.norm2 = nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
        self.moe = SparseMoeBlock(cfg)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(H, 6 * H))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.moe(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTMoEConfig):
        super().__init__()
        H = cfg.hidden_size
        self.norm_final = nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(H, cfg.patch_size**2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(H, 2 * H))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiTMoE(nn.Module):
    """x [B,C,S,S], t [B] in [0, 1] (rectified flow), y [B] -> [B, out_channels, S, S]."""

    def __init__(self, cfg: DiTMoEConfig):
        super().__init__()
        self._build(cfg, DiTBlock)

    def _build(self, cfg: DiTMoEConfig, block: type[nn.Module]):
        self.config = cfg
        self.x_embedder = PatchEmbed(cfg)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, cfg.hidden_size),
                                      requires_grad=False)
        self.blocks = nn.ModuleList(block(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        return self.config.num_classes

    def initialize_weights(self):
        """DiT's initialisation: xavier linears, fixed sin-cos positions, adaLN-Zero."""
        if self.pos_embed.is_meta:
            return
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        grid = self.config.input_size // self.config.patch_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.config.hidden_size, grid).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.blocks]
        zeroed += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
        for linear in zeroed:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def example_inputs(self, batch: int = 1):
        """Inputs of the right shapes (moedit reads activation sizes from them, on fake tensors)."""
        cfg, weight = self.config, self.x_embedder.proj.weight
        return (torch.zeros(batch, cfg.in_channels, cfg.input_size, cfg.input_size, device=weight.device,
                            dtype=weight.dtype),
                torch.zeros(batch, device=weight.device, dtype=weight.dtype),
                torch.zeros(batch, dtype=torch.long, device=weight.device))

    def unpatchify(self, x):
        """[B, N, p*p*C] -> [B, C, S, S]; sizes come from the config so fx can trace it."""
        p, c = self.config.patch_size, self.config.out_channels
        g = self.config.input_size // p
        x = x.reshape(x.shape[0], g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, g * p, g * p)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            x = block(x, c)
        return self.unpatchify(self.final_layer(x, c))


class DiTMoEAdapter(MoEAdapter):
    """How moedit sees `SparseMoeBlock`: softmax top-k gate, SwiGLU experts, one shared expert."""

    def route(self, moe, tokens):
        return moe.gate(tokens)

    def experts(self, moe):
        return list(moe.experts)

    def shared_expert(self, moe):
        return moe.shared_experts

    def top_k(self, moe):
        return moe.num_experts_per_tok


class DiTAttentionAdapter(AttentionAdapter):
    """How moedit sees both attention flavours: their own projection and output methods."""

    def heads(self, attn):
        return attn.num_heads

    def qkv(self, attn, x):
        return attn.project(x)

    def out(self, attn, o):
        return attn.output(o)


register_adapter(SparseMoeBlock, DiTMoEAdapter())
register_attention(Attention, DiTAttentionAdapter())
register_attention(QKNormAttention, DiTAttentionAdapter())


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim] (MAE / DiT layout: w varies fastest)."""
    assert dim % 4 == 0, "the 2-D sin-cos embedding needs a hidden size divisible by 4"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    gh, gw = torch.meshgrid(coords, coords, indexing="ij")

    def embed(pos):
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    # The original code's meshgrid puts w first, so its "h" half encodes the column.
    return torch.cat([embed(gw), embed(gh)], dim=1).float()
