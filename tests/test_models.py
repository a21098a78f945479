import argparse
import functools
import io
import os
import pickle
import re

import pytest
import torch

from moedit.models import CheckpointError, config_for, dit_moe, load_checkpoint
from moedit.tracer import trace

# The key layout of the public DiT-MoE checkpoints (feizc/DiT-MoE), written out by hand for
# one block with two experts, so a renamed module in models/dit_moe.py fails here.
PUBLIC_KEYS = """
pos_embed x_embedder.proj.weight x_embedder.proj.bias
t_embedder.mlp.0.weight t_embedder.mlp.0.bias t_embedder.mlp.2.weight t_embedder.mlp.2.bias
y_embedder.embedding_table.weight
blocks.0.attn.qkv.weight blocks.0.attn.qkv.bias blocks.0.attn.proj.weight blocks.0.attn.proj.bias
blocks.0.moe.gate.weight
blocks.0.moe.experts.0.gate_proj.weight blocks.0.moe.experts.0.up_proj.weight blocks.0.moe.experts.0.down_proj.weight
blocks.0.moe.experts.1.gate_proj.weight blocks.0.moe.experts.1.up_proj.weight blocks.0.moe.experts.1.down_proj.weight
blocks.0.moe.shared_experts.gate_proj.weight blocks.0.moe.shared_experts.up_proj.weight
blocks.0.moe.shared_experts.down_proj.weight
blocks.0.adaLN_modulation.1.weight blocks.0.adaLN_modulation.1.bias
final_layer.linear.weight final_layer.linear.bias
final_layer.adaLN_modulation.1.weight final_layer.adaLN_modulation.1.bias
""".split()
QK_NORM_ATTENTION_KEYS = """
blocks.0.attn.Wqkv.weight blocks.0.attn.Wqkv.bias blocks.0.attn.q_norm.weight blocks.0.attn.q_norm.bias
blocks.0.attn.k_norm.weight blocks.0.attn.k_norm.bias blocks.0.attn.out_proj.weight blocks.0.attn.out_proj.bias
""".split()


def _one_block(**overrides):
    return dit_moe("tiny", depth=1, num_experts=2, **overrides)


def test_state_dict_keys_match_the_public_layout():
    assert sorted(_one_block().state_dict()) == sorted(PUBLIC_KEYS)
    expected = [k for k in PUBLIC_KEYS if ".attn." not in k] + QK_NORM_ATTENTION_KEYS
    assert sorted(_one_block(qk_norm=True).state_dict()) == sorted(expected)


def _public_checkpoint(model, path, dtype=torch.float16):
    """A file as DiT-MoE's training script writes it: {"ema": ..., "opt": ...}, DDP's "module." prefix."""
    gen = torch.Generator().manual_seed(0)
    state = {f"module.{k}": torch.randn(v.shape, generator=gen).to(dtype) for k, v in model.state_dict().items()}
    torch.save({"model": {}, "ema": state, "opt": {}, "args": None}, path)
    return {k.removeprefix("module."): v for k, v in state.items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_checkpoint_round_trip_in_the_public_layout(tmp_path, dtype):
    model = _one_block()
    state = _public_checkpoint(model, tmp_path / "ckpt.pt", dtype)
    load_checkpoint(model, tmp_path / "ckpt.pt")
    for key, value in model.state_dict().items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(value, state[key].float(), rtol=0, atol=0)


def test_checkpoint_errors_name_the_problem(tmp_path):
    model = _one_block()
    state = _public_checkpoint(model, tmp_path / "ok.pt")
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_checkpoint(model, tmp_path / "absent.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_checkpoint(model, tmp_path / "text.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="holds a list, not a state dict"):
        load_checkpoint(model, tmp_path / "list.pt")
    missing = dict(state)
    del missing["blocks.0.moe.gate.weight"]
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match=r"missing 1 key\(s\): blocks.0.moe.gate.weight"):
        load_checkpoint(model, tmp_path / "missing.pt")
    torch.save({**state, "blocks.0.moe.experts.2.up_proj.weight": torch.zeros(1)}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): blocks.0.moe.experts.2"):
        load_checkpoint(model, tmp_path / "extra.pt")
    torch.save({**state, "pos_embed": torch.zeros(1, 3, 32)}, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match=r"pos_embed: checkpoint \(1, 3, 32\) vs model \(1, 16, 32\)"):
        load_checkpoint(model, tmp_path / "shape.pt")


def _train_py_checkpoint(path):
    """A file written as DiT-MoE's train.py writes it: the DDP-unwrapped model, an EMA copy that
    differs from it, the optimizer's state after one AdamW step and the argparse.Namespace."""
    model, ema = _one_block(), _one_block()
    with torch.no_grad():
        for param in ema.parameters():
            param.add_(1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0)
    model(torch.randn(2, 4, 8, 8), torch.rand(2) * 999, torch.tensor([1, 2])).square().mean().backward()
    opt.step()
    args = argparse.Namespace(model="DiT-S/2", image_size=256, num_classes=1000, epochs=1400, global_batch_size=256,
                              global_seed=0, vae="ema", num_experts=8, num_experts_per_tok=2, rf=False,
                              results_dir="results", ckpt=None)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args}, path)
    return model.state_dict(), ema.state_dict()


def test_a_train_py_checkpoint_loads_its_ema_weights(tmp_path):
    trained, ema = _train_py_checkpoint(tmp_path / "0050000.pt")
    for weights, expected in ((None, ema), ("ema", ema), ("model", trained)):
        model = load_checkpoint(_one_block(), tmp_path / "0050000.pt", weights=weights)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    with pytest.raises(CheckpointError, match=r"no 'state_dict' weights; its wrappers: \['ema', 'model', 'opt'\]"):
        load_checkpoint(_one_block(), tmp_path / "0050000.pt", weights="state_dict")


class _Payload:
    """Stands for any class a pickle could instantiate (and run code with)."""


class _Exploit:
    """A pickle that, if unpickled, runs a shell command (writes `marker`)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_with_other_objects_is_refused_for_safety_and_runs_nothing(tmp_path):
    model = _one_block()
    torch.save({"ema": model.state_dict(), "extra": _Payload()}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match=r"refused for safety: it contains a pickled test_models\._Payload"):
        load_checkpoint(model, tmp_path / "ckpt.pt")
    marker = tmp_path / "ran"
    torch.save({"ema": model.state_dict(), "extra": _Exploit(marker)}, tmp_path / "exploit.pt")
    with open(tmp_path / "raw.pkl", "wb") as f:  # a bare pickle, not torch.save's zip
        pickle.dump({"extra": _Exploit(marker)}, f)
    with open(tmp_path / "old.pkl", "wb") as f:  # protocol 0: no header, the global spelt out
        pickle.dump({"extra": _Exploit(marker)}, f, protocol=0)
    for name in ("exploit.pt", "raw.pkl", "old.pkl"):
        with pytest.raises(CheckpointError, match="refused for safety") as refused:
            load_checkpoint(model, tmp_path / name)
        assert "weights_only" not in str(refused.value) and not marker.exists()
    # The Namespace is allowed only while a checkpoint loads, not in torch's global allow-list.
    assert argparse.Namespace not in torch.serialization.get_safe_globals()


@pytest.mark.parametrize("name, write, expected", [
    ("empty", lambda p: p.write_bytes(b""), "is empty"),
    ("text", lambda p: p.write_text("this is not a checkpoint\nweights: 1 2 3\n"), "neither a zip nor a pickle"),
    ("text starting as a protocol-0 global", lambda p: p.write_text("checkpoint of my model\n"),
     "neither a zip nor a pickle"),
    ("cut short", lambda p: p.write_bytes(_saved(_one_block().state_dict())[:4000]), "or one cut short"),
    ("int keys", lambda p: torch.save({0: torch.zeros(1)}, p), "not a state dict of parameter names to tensors"),
    ("mixed keys", lambda p: torch.save({1: "a", "b": 2}, p), "not a state dict of parameter names to tensors"),
    ("complex", lambda p: torch.save({k: v.to(torch.complex64) for k, v in _one_block().state_dict().items()}, p),
     "complex64 tensor; a checkpoint holds real-valued tensors"),
    ("meta", lambda p: torch.save({k: v.to("meta") for k, v in _one_block().state_dict().items()}, p),
     "a tensor without data (meta device)"),
    ("wrapped 9 deep", lambda p: torch.save(functools.reduce(lambda d, _: {"ema": d}, range(9),
                                                             _one_block().state_dict()), p), "more than 4 deep"),
])
def test_a_file_that_is_not_a_checkpoint_is_named_in_our_words(tmp_path, name, write, expected):
    path = tmp_path / "ckpt.pt"
    write(path)
    with pytest.raises(CheckpointError, match=re.escape(expected)) as refused:
        load_checkpoint(_one_block(), path)
    assert "weights_only" not in str(refused.value) and "Error" not in str(refused.value)


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_a_safetensors_file_loads(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    model = _one_block()
    gen = torch.Generator().manual_seed(3)
    state = {f"module.{k}": torch.randn(v.shape, generator=gen).half() for k, v in model.state_dict().items()}
    safetensors.save_file(state, tmp_path / "ckpt.safetensors")
    load_checkpoint(model, tmp_path / "ckpt.safetensors")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[f"module.{key}"].float(), rtol=0, atol=0)
    (tmp_path / "bad.safetensors").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a safetensors file"):
        load_checkpoint(model, tmp_path / "bad.safetensors")


@pytest.mark.parametrize("name, depth, hidden, experts, qk_norm", [
    ("S/2-8E2A", 12, 384, 8, False), ("B/4-8E2A", 12, 768, 8, False), ("L/8-16E2A", 24, 1024, 16, False),
    ("dit-moe-xl", 28, 1152, 8, True), ("G/2-16E2A", 40, 1408, 16, True),
])
def test_named_configs(name, depth, hidden, experts, qk_norm):
    cfg = config_for(name)
    assert (cfg.depth, cfg.hidden_size, cfg.num_experts, cfg.qk_norm) == (depth, hidden, experts, qk_norm)


def test_overrides_use_the_dit_argument_names():
    cfg = config_for("S/2-8E2A", input_size=16, num_experts=16, num_experts_per_tok=4, learn_sigma=False)
    assert (cfg.input_size, cfg.num_experts, cfg.num_experts_per_tok, cfg.out_channels) == (16, 16, 4, 4)
    with pytest.raises(TypeError, match=r"unknown DiT-MoE argument\(s\) \['n_experts'\]"):
        config_for("S/2-8E2A", n_experts=4)
    with pytest.raises(ValueError, match="unknown DiT-MoE config 'S/3-8E2A'"):
        config_for("S/3-8E2A")


@pytest.mark.parametrize("name", ["XL/2-8E2A", "G/2-16E2A"])
def test_large_configs_trace_on_the_meta_device(name):
    with torch.device("meta"):
        model = dit_moe(name)
    gm = trace(model)
    moe = [n for n in gm.graph.nodes if n.meta.get("moedit", {}).get("kind") == "moe"]
    attention = [n for n in gm.graph.nodes if n.meta.get("moedit", {}).get("kind") == "attention"]
    assert len(moe) == len(attention) == model.config.depth
    assert [n.meta["moedit"]["layer"] for n in moe] == list(range(model.config.depth))
    # The un-patchify step is part of the graph: the output is the reshape after its einsum.
    (result,) = gm.graph.output_node().args
    assert result.target == "reshape" and result.args[0].target is torch.functional.einsum


def test_eval_mode_and_label_dropout_off():
    model = dit_moe("tiny")
    assert not model.training
    y = torch.arange(4)
    emb = model.y_embedder(y)
    torch.testing.assert_close(emb, model.y_embedder.embedding_table.weight[y])
