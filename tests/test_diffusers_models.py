"""An unmodified diffusers MoE transformer (HiDream-I1's, tiny, random weights) compiled by
shape-specialised capture (moedit/capture.py), and `Runtime.denoise` taking what the
model's forward takes."""

import pytest
import torch

import moedit
from _dist import run_ranks
from _models import tiny_model

pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install -e '.[test]'")
from _diffusers import BATCH_DIMS, hidream_inputs, tiny_hidream  # noqa: E402

def _hidream_worker(rank, world, plan, batches):
    model = tiny_hidream()
    compiled = moedit.compile(model, moedit.Plan(**plan), example_inputs=hidream_inputs(batches[0]))  # batch_dims:
    assert compiled.batch_dims == BATCH_DIMS  # registered for HiDream by moedit.models.diffusers_adapters
    with compiled.to_runtime() as runner:
        outputs = [runner.denoise(**hidream_inputs(b)) for b in batches]
        outputs.append(runner.denoise(**hidream_inputs(batches[0], return_dict=True)).sample)
    captures, refused = len(runner._captures), None
    forgot = moedit.compile(model, moedit.Plan(**plan), example_inputs=hidream_inputs(batches[0]), batch_dims={})
    with forgot.to_runtime() as runner:
        try:
            runner.denoise(**hidream_inputs(batches[0]))
        except ValueError as err:
            refused = str(err)
    return [out[0] if isinstance(out, tuple) else out for out in outputs], captures, refused


@pytest.mark.parametrize("world,plan", [(1, {}), (2, {"expert_parallel": {"degree": 2}})], ids=["single", "sync_ep 2"])
def test_hidream_matches_the_unmodified_model(world, plan):
    model = tiny_hidream()
    batches = [2, 3, 1]  # 3 over 2 ranks: shards of 2 and 1, captured again; 1: rank 1 stands in with sample 0
    with torch.no_grad():
        reference = [model(**hidream_inputs(b))[0] for b in batches]
        reference.append(model(**hidream_inputs(2, return_dict=True)).sample)
    assert reference[0].std() > 0.1  # outputs that vary, so the comparison means something
    for outputs, captures, refused in run_ranks(world, _hidream_worker, plan, batches):
        for out, ref in zip(outputs, reference, strict=True):
            assert out.shape == ref.shape
            assert (out - ref).abs().max() <= 1e-5
        assert captures >= 2  # programs captured again for another signature
        if world > 1:  # with no batch_dims the Llama states' batch axis (1) is not the first: refused, never merged
            assert refused is not None and "encoder_hidden_states_llama3 [3, 2, 6, 4] (axis 0)" in refused
        else:
            assert refused is None  # one data rank splits nothing


def _stale_worker(rank, world, mode, sequence_parallel):
    model = tiny_hidream()
    plan = moedit.Plan(expert_parallel={"degree": world}, staleness={"mode": mode, "warmup_steps": 1},
                       sequence_parallel=sequence_parallel)
    compiled = moedit.compile(model, plan, example_inputs=hidream_inputs(2), batch_dims=BATCH_DIMS)
    with compiled.to_runtime() as runner:
        runner.reset(steps=4)
        outputs = [runner.denoise(**hidream_inputs(2))[0] for _ in range(3)]
        changed = hidream_inputs(2)
        changed["hidden_states"] = changed["hidden_states"].flip(0)
        outputs.append(runner.denoise(**changed)[0])
        return outputs, [kind.name for kind in runner.step_log]


@pytest.mark.parametrize("sequence_parallel", [{}, {"ulysses": 2}], ids=["ep", "ep+ulysses"])
@pytest.mark.parametrize("mode", ["interweaved", "displaced"])
def test_hidream_stale_plans_wire_the_layers_in_order(mode, sequence_parallel):
    """The cross-layer passes on a captured graph: with the same input at every step, stale steps
    reuse exactly what this step computes, so a layer wired to another layer's cache would show;
    a changed input shows the staleness. Also with HiDream's joint attention split by Ulysses."""
    model = tiny_hidream()
    changed = hidream_inputs(2)
    changed["hidden_states"] = changed["hidden_states"].flip(0)
    with torch.no_grad():
        same, fresh = model(**hidream_inputs(2))[0], model(**changed)[0]
    outputs, kinds = run_ranks(2, _stale_worker, mode, sequence_parallel)[0]
    assert kinds == ["sync", "async", "async", "async"]
    assert all((out - same).abs().max() <= 1e-5 for out in outputs[:3])
    assert (outputs[3] - fresh).abs().max() > 1e-3  # the routed outputs of step 3 are older than its input


def test_hidream_graph_holds_the_blocks_in_order():
    model = tiny_hidream()
    compiled = moedit.compile(model, example_inputs=hidream_inputs(), batch_dims=BATCH_DIMS)
    assert [layer.path for layer in compiled.layers] == ["double_stream_blocks.0.block.ff_i",
                                                         "single_stream_blocks.0.block.ff_i",
                                                         "single_stream_blocks.1.block.ff_i"]
    assert "hidden_states [2, 4, 8, 8] float32" in compiled.signature.describe()


def test_batch_dims_must_name_a_tensor_input():
    with pytest.raises(ValueError, match=r"batch_dims names \['llama3'\].*encoder_hidden_states_llama3"):
        moedit.compile(tiny_hidream(), example_inputs=hidream_inputs(), batch_dims={"llama3": 1})


def test_symbolic_trace_failure_points_at_example_inputs():
    with pytest.raises(moedit.TraceError, match=r"HiDreamImageTransformer2DModel\.forward.*example_inputs"):
        moedit.compile(tiny_hidream())


class _ValueBranch(torch.nn.Module):
    """A model whose forward branches on a tensor's values: capture must refuse, not specialise."""

    def __init__(self, test):
        super().__init__()
        self.inner, self.test = tiny_model(), test

    def forward(self, x, t, y):
        if self.test(x):
            x = x * 2
        return self.inner(x, t, y)


@pytest.mark.parametrize("test", [lambda x: (x > 0).any(), lambda x: x.abs().max().item() > 3,
                                  lambda x: x.flatten().tolist()[0] > 0], ids=["tensor", "item", "tolist"])
def test_capture_refuses_a_branch_on_values(test):
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with pytest.raises(moedit.TraceError, match="reads the values"):
        moedit.compile(_ValueBranch(test), example_inputs=(x, t, y))


def _dit_worker(rank, world):
    model = tiny_model()
    gen = torch.Generator().manual_seed(5)
    x, t, y = torch.randn(3, 4, 8, 8, generator=gen), torch.rand(3, generator=gen), torch.tensor([0, 3, 9])
    with moedit.compile(model, moedit.Plan(expert_parallel={"degree": world})).to_runtime() as runner:
        return runner.denoise(x, t, y), runner.denoise(x=x, t=t, y=y), runner.denoise(x, y=y, t=t)


def test_denoise_takes_the_forward_arguments_by_keyword():
    model = tiny_model()
    gen = torch.Generator().manual_seed(5)
    x, t, y = torch.randn(3, 4, 8, 8, generator=gen), torch.rand(3, generator=gen), torch.tensor([0, 3, 9])
    with torch.no_grad():
        reference = model(x, t, y)
    for outputs in run_ranks(2, _dit_worker):
        for out in outputs:
            assert (out - reference).abs().max() <= 1e-5


def test_the_readme_hidream_adapter_is_the_shipped_one():
    """docs/models.md's 11-line HiDream adapter is models/diffusers_adapters.py's, line for line."""
    import pathlib
    import re

    root = pathlib.Path(__file__).parent.parent
    block = next(b for b in re.findall(r"```python\n(.*?)```", (root / "docs" / "models.md").read_text(), re.S)
                 if "class HiDreamMoEAdapter" in b)
    shipped = {line.strip() for line in (root / "models" / "diffusers_adapters.py").read_text().splitlines()}
    lines = [line.strip().replace("moedit.", "") for line in block.splitlines() if line.strip()]
    assert len(lines) == 11 and [line for line in lines if line not in shipped] == []


def test_cfg_parallel_is_refused_for_a_captured_model():
    with pytest.raises(moedit.PlanError, match="remove cfg_parallel"):
        moedit.compile(tiny_hidream(), moedit.Plan(cfg_parallel=True, expert_parallel={"degree": 2}),
                       example_inputs=hidream_inputs(), batch_dims=BATCH_DIMS)


class _WithLoss(torch.nn.Module):
    """A model that also returns a 0-dim tensor (an auxiliary loss, say)."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model()

    def forward(self, x, t, y):
        out = self.inner(x, t, y)
        return out, out.pow(2).mean()


def test_denoise_returns_0_dim_outputs_as_they_are():
    model = _WithLoss()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        out, loss = model(x, t, y)
    with moedit.compile(model, example_inputs=(x, t, y)).to_runtime() as runner:
        got, got_loss = runner.denoise(x, t, y)
    assert (got - out).abs().max() <= 1e-5 and got_loss.dim() == 0 and abs(got_loss - loss) <= 1e-5


class _LearnedPositions(torch.nn.Module):
    """A learned embedding of position ids made from shapes alone (constants at capture)."""

    def __init__(self):
        super().__init__()
        self.inner, self.positions = tiny_model(), torch.nn.Embedding(64, 4)

    def forward(self, x, t, y):
        ids = torch.arange(x.shape[-2] * x.shape[-1]).reshape(x.shape[-2], x.shape[-1])
        return self.inner(x + self.positions(ids).permute(2, 0, 1), t, y)


def test_weights_loaded_after_compiling_count_even_on_constant_inputs():
    model = _LearnedPositions()
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    compiled = moedit.compile(model, example_inputs=(x, t, y))
    with torch.no_grad():
        model.positions.weight.add_(1.0)  # as a checkpoint loaded after compiling would
        reference = model(x, t, y)
    with compiled.to_runtime() as runner:
        assert (runner.denoise(x, t, y) - reference).abs().max() <= 1e-5


def test_explain_counts_the_bytes_of_a_captured_call():
    """A captured model has no DiT config to count tokens by: explain() reads each MoE layer's rows
    from the shapes it was captured for (16 image tokens in the double-stream block, 33 image and
    text tokens in the single-stream ones, per image)."""
    batch = 64
    compiled = moedit.compile(tiny_hidream(), moedit.Plan(expert_parallel={"degree": 2}),
                              example_inputs=hidream_inputs(batch), batch_dims=BATCH_DIMS)
    text = compiled.explain()
    assert "bytes: one call as captured (hidden_states [64, " in text, text
    rows = {layer.index: batch * (16 if layer.path.startswith("double") else 33) for layer in compiled.layers}
    for layer in compiled.layers:  # dispatch and combine, every slot, half of them to the other rank
        sent = 2 * rows[layer.index] * layer.top_k * layer.row_bytes / 2
        line = next(line for line in text.splitlines() if line.startswith(f"{layer.index}     {layer.path}"))
        assert line.split()[-4] == f"{sent / 2**20:.2f}", (line, sent)
