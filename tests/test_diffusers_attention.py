"""A third-party attention class, diffusers' `Attention`, split by sequence parallelism
through its registered adapter (moedit/models/diffusers_adapters.py)."""

import pytest
import torch

import moedit
from _models import tiny_model

pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install -e '.[test]'")
from diffusers.models.attention_processor import Attention  # noqa: E402

import moedit.models.diffusers_adapters  # noqa: E402,F401  (registers the adapter)

PLANS = {"ulysses 2": dict(sequence_parallel={"ulysses": 2}, expert_parallel={"degree": 2}),
         "ring 2": dict(sequence_parallel={"ring": 2}, expert_parallel={"degree": 2})}


@torch.no_grad()
def _model(**attention):
    """The tiny DiT-MoE with every block's attention replaced by a diffusers Attention (q/k
    RMS norms, random weights)."""
    model = tiny_model()
    hidden, heads = model.config.hidden_size, model.config.num_heads
    gen = torch.Generator().manual_seed(3)
    for block in model.blocks:
        block.attn = Attention(hidden, heads=heads, dim_head=hidden // heads, bias=True, qk_norm="rms_norm",
                               **attention).eval()
        for param in block.attn.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (param.shape[-1] ** -0.5 if param.dim() > 1 else 1))
    return model


def _inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(3, 4, 8, 8, generator=gen), torch.rand(3, generator=gen), torch.tensor([0, 3, 9])


def _worker(rank, world):
    import moedit.models.diffusers_adapters  # noqa: F401  (each spawned rank registers it too)

    out = {}
    for name, plan in PLANS.items():
        with moedit.compile(_model(), moedit.Plan(**plan)).to_runtime() as runtime:
            out[name] = runtime.denoise(*_inputs())
    return out


def test_diffusers_attention_under_sequence_parallelism_equals_the_model(spawn):
    with torch.no_grad():
        expected = _model()(*_inputs())
    for results in spawn(2, _worker):
        for name, got in results.items():
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_a_configuration_the_adapter_does_not_cover_is_refused_by_name():
    with pytest.raises(moedit.PlanError, match="residual_connection is not supported"):
        moedit.compile(_model(residual_connection=True), moedit.Plan(**PLANS["ring 2"]))
