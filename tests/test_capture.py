"""Capture is sound for new values of the same shapes: a captured program computes from the
call's inputs, never from the example it was captured with (moedit/capture.py, [Note: writes
into constants]).

Each test captures a model on example inputs, then writes new values into every one of
those same input tensors and compares the program's output with the unmodified model's.
"""

import pytest
import torch

import moedit
from _models import tiny_model, tiny_scmoe

pytest.importorskip("diffusers", reason="diffusers is a test dependency: pip install -e '.[test]'")

from _diffusers import BATCH_DIMS, tiny_hidream  # noqa: E402  (needs diffusers)


def _hidream_inputs(height: int, width: int) -> dict:
    gen = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(2, 4, height, width, generator=gen), timesteps=torch.tensor([50, 350]),
                encoder_hidden_states_t5=torch.randn(2, 5, 8, generator=gen),
                encoder_hidden_states_llama3=torch.randn(3, 2, 6, 4, generator=gen),
                pooled_embeds=torch.randn(2, 8, generator=gen), return_dict=False)


def _dit_inputs() -> tuple:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.rand(2, generator=gen), torch.tensor([1, 2])


def _rewrite_every_tensor(inputs, seed: int = 1) -> None:
    """New values, in place, in every tensor of `inputs` (the example tensors themselves)."""
    gen = torch.Generator().manual_seed(seed)
    for tensor in (inputs.values() if isinstance(inputs, dict) else inputs):
        if not isinstance(tensor, torch.Tensor):
            continue
        if tensor.is_floating_point():
            tensor.copy_(torch.randn(tensor.shape, generator=gen) * tensor.std().clamp(min=0.1))
        else:
            tensor.copy_(torch.randint(0, 10, tensor.shape, generator=gen) * (1 + tensor.max() // 10))


def _call(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def _first(out):
    return out[0] if isinstance(out, tuple) else out


CASES = {
    "hidream square": (tiny_hidream, lambda: _hidream_inputs(8, 8), BATCH_DIMS),
    "hidream non-square": (tiny_hidream, lambda: _hidream_inputs(8, 12), BATCH_DIMS),
    "dit-moe": (tiny_model, _dit_inputs, None),
    "scmoe": (tiny_scmoe, _dit_inputs, None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_captured_program_reads_new_input_values(case):
    build, make_inputs, batch_dims = CASES[case]
    model, inputs = build(), make_inputs()
    compiled = moedit.compile(model, example_inputs=inputs, batch_dims=batch_dims)
    with torch.no_grad():
        before = _first(_call(model, inputs))
    _rewrite_every_tensor(inputs)
    with torch.no_grad():
        reference = _first(_call(model, inputs))
    assert (reference - before).abs().max() > 1e-2  # new inputs, a new output: the comparison means something
    with compiled.to_runtime() as runner:
        out = _first(runner.denoise(**inputs) if isinstance(inputs, dict) else runner.denoise(*inputs))
    assert (out - reference).abs().max() <= 1e-5


class _Scatter(torch.nn.Module):
    """Writes its input into a tensor made from shapes alone, then reads it back through the
    tensor itself, a view taken before the write, and a view taken after it."""

    def __init__(self):
        super().__init__()
        self.inner = tiny_model()

    def forward(self, x, t, y):
        canvas = torch.zeros(x.shape[0], x.shape[1], x.shape[2] + 2, x.shape[3])
        early_view = canvas[:, :, 1:-1]  # aliases the canvas before anything is written
        canvas[:, :, 1:-1] = x
        early_view.mul_(2.0)  # a write through the early view, with no traced value in it
        late_view = canvas.narrow(2, 1, x.shape[2])
        return self.inner(late_view + canvas[:, :, :-2] * 0.5 + early_view, t, y)


def _assert_reads_new_values(model) -> moedit.CompiledModel:
    """Capture `model` on DiT inputs, write new values into them, compare with the model."""
    inputs = _dit_inputs()
    compiled = moedit.compile(model, example_inputs=inputs)
    _rewrite_every_tensor(inputs)
    with torch.no_grad():
        reference = model(*inputs)
    with compiled.to_runtime() as runner:
        assert (runner.denoise(*inputs) - reference).abs().max() <= 1e-5
    return compiled


def test_writes_into_a_shape_made_tensor_stay_in_the_graph():
    compiled = _assert_reads_new_values(_Scatter())
    assert "clone" in compiled.graph(0).code  # the canvas is the graph's copy, not a constant


class _Chain(torch.nn.Module):
    """Writes traced values into shape-made tensors in ways that reach them only through other
    such tensors: a copy of a copy, an `out=` from a copy, a mask built from the input, a
    channels-last canvas."""

    def __init__(self, write):
        super().__init__()
        self.inner, self.write = tiny_model(), write

    def forward(self, x, t, y):
        return self.inner(self.write(x), t, y)


def _copy_of_a_copy(x):
    a = torch.zeros(x.shape)
    a[:] = x
    b = torch.zeros(x.shape)
    b[:] = a  # no proxy in this call: `a` is the graph's copy
    return b * 1.0


def _out_from_a_copy(x):
    a = torch.zeros(x.shape)
    a.copy_(x)
    b = torch.empty(x.shape)
    torch.mul(a, 2.0, out=b)
    return b / 2


def _masked_fill(x):
    mask = torch.zeros(x.shape, dtype=torch.bool)
    mask[x > 0] = True
    filled = torch.zeros(x.shape)
    filled.masked_fill_(mask, 1.0)
    return x + filled


def _channels_last(x):
    canvas = torch.zeros(x.shape).to(memory_format=torch.channels_last)
    canvas[:] = x
    return canvas * 1.0


@pytest.mark.parametrize("write", [_copy_of_a_copy, _out_from_a_copy, _masked_fill, _channels_last],
                         ids=lambda f: f.__name__.strip("_"))
def test_traced_values_reach_shape_made_tensors_through_other_copies(write):
    _assert_reads_new_values(_Chain(write))


class _WritesAParameter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner, self.scale = tiny_model(), torch.nn.Parameter(torch.ones(1))

    def forward(self, x, t, y):
        self.scale.mul_(x.mean().abs() + 1)
        return self.inner(x * self.scale, t, y)


def test_capture_refuses_writing_into_a_parameter_and_leaves_it_as_it_was():
    model = _WritesAParameter()
    with pytest.raises(moedit.TraceError, match="writes into 'scale', one of the model's parameters or buffers"):
        moedit.compile(model, example_inputs=_dit_inputs())
    assert model.scale.item() == 1.0  # refused before the write ran on the real weights


class _WritesABuffer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = tiny_model()
        self.register_buffer("last", torch.zeros(2, 4, 8, 8))

    def forward(self, x, t, y):
        self.last.copy_(x)
        return self.inner(x, t, y)


def test_capture_refuses_writing_input_values_into_module_state():
    with pytest.raises(moedit.TraceError, match="parameters or buffers"):
        moedit.compile(_WritesABuffer(), example_inputs=_dit_inputs())


def test_prepare_captures_a_new_signature_before_any_step():
    model, inputs = tiny_model(), _dit_inputs()
    doubled = tuple(torch.cat([t, t]) for t in inputs)
    with moedit.compile(model, example_inputs=inputs).to_runtime() as runner:
        runner.prepare(*doubled)
        assert len(runner._captures) == 1 and runner.state.step == 0  # captured, no step run
        out = runner.denoise(*doubled)
        assert len(runner._captures) == 1  # the step found it ready
    with torch.no_grad():
        assert (out - model(*doubled)).abs().max() <= 1e-5
