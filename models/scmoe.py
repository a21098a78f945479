"""ScMoE: a DiT-MoE whose routed experts read an earlier representation through a shortcut.

Block l of a standard DiT-MoE feeds its MoE from its own post-attention residual h_l, so
the MoE's all-to-alls can only overlap the shared expert. ScMoE (REFERENCE.md, "ScMoE")
feeds a top-1 routed MoE from the previous block instead and keeps a shared expert on the
current representation:

    h_l   = x_l + gate_msa * attn(mod(norm1 x_l))
    out_l = h_l + gate_mlp * (moe(mod(norm2 s_l)) + c_l * shared(mod(norm2 h_l)))

where s_l is the shortcut, taken from block l-1 at one of three positions (block 0 reads
its own input x_0, having no predecessor):

    Pos-1  s_l = out_{l-1} = x_l    the window for the MoE's exchanges: block l's attention
    Pos-2  s_l = h_{l-1}            adds block l-1's shared expert (the paper's choice)
    Pos-3  s_l = x_{l-1}            adds block l-1's attention too

and c_l = sigmoid(coef(mod(norm2 h_l))), the paper's CG-1 gate on the shared expert (or 1
with `shared_gate=False`). The model is an ordinary nn.Module: its forward is the
single-device reference, and the routed MoE is the reference `SparseMoeBlock` without its
shared expert (`RoutedMoE`), which moves out to the block, so moedit's expert parallelism
applies unchanged;
`moedit.passes.shortcut` then schedules the exchanges over the window.

Shape legend as in dit_moe.py.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from moedit.adapters import register_adapter

from .dit_moe import (Attention, DiTMoE, DiTMoEAdapter, DiTMoEConfig, MoeMLP, QKNormAttention, RoutedMoE, config_for,
                      modulate)


@dataclasses.dataclass(frozen=True)
class ScMoEConfig(DiTMoEConfig):
    num_experts_per_tok: int = 1  # ScMoE's routed MoE is top-1
    shortcut_position: int = 2  # Pos-1, Pos-2 or Pos-3 (see the module docstring)
    shared_gate: bool = True  # CG-1: a sigmoid coefficient on the shared expert

    def __post_init__(self):
        super().__post_init__()
        if self.shortcut_position not in (1, 2, 3):
            raise ValueError(f"shortcut_position must be 1, 2 or 3, got {self.shortcut_position}")


class ScMoEBlock(nn.Module):
    """One ScMoE block: (x_l, c, s_l) -> (out_l, s_{l+1})."""

    def __init__(self, cfg: ScMoEConfig):
        super().__init__()
        H = cfg.hidden_size
        self.position = cfg.shortcut_position
        self.norm1 = nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
        self.attn = (QKNormAttention if cfg.qk_norm else Attention)(H, cfg.num_heads)
        self.norm2 = nn.LayerNorm(H, elementwise_affine=False, eps=1e-6)
        self.moe = RoutedMoE(cfg)
        self.shared_experts = MoeMLP(H, cfg.num_shared_expert_ratio * H)
        self.shared_coef = nn.Linear(H, 1) if cfg.shared_gate else None
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(H, 6 * H))

    def forward(self, x, c, s):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        h = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        routed = self.moe(modulate(self.norm2(s), shift_mlp, scale_mlp))
        current = modulate(self.norm2(h), shift_mlp, scale_mlp)
        shared = self.shared_experts(current)
        if self.shared_coef is not None:
            shared = torch.sigmoid(self.shared_coef(current)) * shared
        out = h + gate_mlp.unsqueeze(1) * (routed + shared)
        return out, {1: out, 2: h, 3: x}[self.position]


class ScMoEDiT(DiTMoE):
    """x [B,C,S,S], t [B], y [B] -> [B, out_channels, S, S], as DiTMoE."""

    def __init__(self, cfg: ScMoEConfig):
        if not isinstance(cfg, ScMoEConfig):
            raise TypeError(f"ScMoEDiT needs an ScMoEConfig, got {type(cfg).__name__}")
        nn.Module.__init__(self)
        self._build(cfg, ScMoEBlock)

    def forward(self, x, t, y):
        x = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        s = x  # block 0 has no predecessor: its MoE reads its own input
        for block in self.blocks:
            x, s = block(x, c, s)
        return self.unpatchify(self.final_layer(x, c))


class ScMoEAdapter(DiTMoEAdapter):
    """`RoutedMoE`: the reference gate and experts; the shared expert lives in the block."""

    def shared_expert(self, moe):
        return None


register_adapter(RoutedMoE, ScMoEAdapter())


def scmoe(name: str = "S/2-8E2A", **overrides) -> ScMoEDiT:
    """An ScMoE of a reference size (`"tiny"`, `"S/2-8E2A"`, ... as `dit_moe`), top-1 at
    Pos-2 with the CG-1 gate unless `overrides` say otherwise, in eval mode."""
    own = {f.name for f in dataclasses.fields(ScMoEConfig)} - {f.name for f in dataclasses.fields(DiTMoEConfig)}
    base = config_for(name, **{k: v for k, v in overrides.items() if k not in own})
    fields = {**dataclasses.asdict(base), "num_experts_per_tok": 1,
              **{k: v for k, v in overrides.items() if k in own or k == "num_experts_per_tok"}}
    return ScMoEDiT(ScMoEConfig(**fields)).eval()
