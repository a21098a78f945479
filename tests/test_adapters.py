"""Three shapes of MoE layer users bring, each described by an adapter (docs/models.md, "Adding an
adapter for a new MoE layer"): expert-choice routing, experts packed into one parameter,
and a layer that takes the timestep embedding and returns (out, aux_loss). Each compiled
model under sync_ep equals the unmodified eager model at 1 and 2 ranks.

Shape legend: B batch, N tokens per image, T = B*N, H hidden, E experts, C tokens per expert.
"""

import pathlib
import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import moedit
from _dist import run_ranks
from moedit.runtime import expert_ops
from moedit.runtime.kernels import triton_installed


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (param.shape[-1] ** -0.5 if param.dim() > 1 else 0.1))
    return module.eval()


def _mlp(hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(hidden, 32), nn.GELU(), nn.Linear(32, hidden))


# -- 1. expert-choice routing: each expert picks its C best tokens of each image -----------

class ExpertChoiceMoE(nn.Module):
    def __init__(self, hidden=16, experts=4, tokens=6, capacity=2):
        super().__init__()
        self.gate = nn.Linear(hidden, experts, bias=False)
        self.experts = nn.ModuleList(_mlp(hidden) for _ in range(experts))
        self.tokens, self.capacity = tokens, capacity

    def forward(self, x):                                         # x [B, N, H]
        scores = self.gate(x).softmax(-1)                         # [B, N, E]
        weights, chosen = scores.topk(self.capacity, dim=1)       # [B, C, E]
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            index = chosen[..., e, None].expand(-1, -1, x.shape[-1])
            out.scatter_add_(1, index, expert(x.gather(1, index)) * weights[..., e, None])
        return out


class ExpertChoiceAdapter(moedit.MoEAdapter):
    empty_slots = True                                            # slot e holds expert e, or -1

    def route(self, moe, tokens):
        scores = moe.gate(tokens).softmax(-1).unflatten(0, (-1, moe.tokens))          # [B, N, E]
        picked = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, scores.topk(moe.capacity, dim=1).indices, True)
        ids = torch.where(picked, torch.arange(scores.shape[-1]), -1)
        return ids.flatten(0, 1), scores.flatten(0, 1)            # [T, E] each

    def experts(self, moe):
        return list(moe.experts)

    def top_k(self, moe):
        return len(moe.experts)                                   # a token gets up to E experts


moedit.register_adapter(ExpertChoiceMoE, ExpertChoiceAdapter())


# -- 2. experts packed into one parameter per projection ------------------------------

class PackedMoE(nn.Module):
    def __init__(self, hidden=16, experts=4, width=24):
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w_gate = nn.Parameter(torch.empty(experts, hidden, width))
        self.w_up = nn.Parameter(torch.empty(experts, hidden, width))
        self.w_down = nn.Parameter(torch.empty(experts, width, hidden))

    def expert(self, x, e):                                       # SwiGLU expert e: [n, H] -> [n, H]
        return (F.silu(x @ self.w_gate[e]) * (x @ self.w_up[e])) @ self.w_down[e]

    def forward(self, x):
        tokens = x.flatten(0, -2)
        weights, ids = self.router(tokens).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(tokens)
        for e in range(self.w_up.shape[0]):
            token, slot = torch.nonzero(ids == e, as_tuple=True)
            out.index_add_(0, token, self.expert(tokens[token], e) * weights[token, slot, None])
        return out.reshape(x.shape)


class PackedExpert(nn.Module):
    """Expert e of a PackedMoE: reads its rows of the packed weights when called (no copy)."""

    def __init__(self, moe, e):
        super().__init__()
        object.__setattr__(self, "moe", moe)                      # a reference, not a submodule
        self.e = e

    def forward(self, x):
        return self.moe.expert(x, self.e)                         # silu(x @ w_gate[e]) * (x @ w_up[e]) @ w_down[e]


class PackedAdapter(moedit.MoEAdapter):
    def route(self, moe, tokens):
        weights, ids = moe.router(tokens).softmax(-1).topk(2, dim=-1)
        return ids, weights

    def experts(self, moe):
        return [PackedExpert(moe, e) for e in range(moe.w_up.shape[0])]

    def top_k(self, moe):
        return 2

    def hidden_size(self, moe):                                   # the views hold no parameters to read it from
        return moe.w_up.shape[1]


moedit.register_adapter(PackedMoE, PackedAdapter())


# -- 3. extra inputs: a gate conditioned on the timestep embedding; returns (out, aux_loss) --

class ConditionedMoE(nn.Module):
    def __init__(self, hidden=16, experts=4):
        super().__init__()
        self.gate = nn.Linear(hidden, experts)
        self.gate_t = nn.Linear(hidden, experts, bias=False)      # the timestep shifts the routing
        self.scale_t = nn.Linear(hidden, hidden)                  # ... and scales the output
        self.experts = nn.ModuleList(_mlp(hidden) for _ in range(experts))

    def forward(self, x, temb):                                   # x [B, N, H], temb [B, H]
        logits = self.gate(x) + self.gate_t(temb)[:, None]
        weights, ids = logits.softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            b, n, slot = torch.nonzero(ids == e, as_tuple=True)
            out[b, n] += expert(x[b, n]) * weights[b, n, slot, None]
        aux_loss = logits.softmax(-1).mean((0, 1)).square().sum()  # load balancing, for training
        return out * torch.sigmoid(self.scale_t(temb))[:, None], aux_loss


class ConditionedAdapter(moedit.MoEAdapter):
    def route(self, moe, tokens, temb):                           # tokens [T, H], temb [B, H] as called
        temb = temb.repeat_interleave(tokens.shape[0] // temb.shape[0], dim=0)         # per token
        weights, ids = (moe.gate(tokens) + moe.gate_t(temb)).softmax(-1).topk(2, dim=-1)
        return ids, weights

    def combine(self, moe, routed, shared, temb):
        scale = torch.sigmoid(moe.scale_t(temb)).repeat_interleave(routed.shape[0] // temb.shape[0], dim=0)
        return routed * scale

    def output(self, moe, out):                                   # [B, N, H] -> what forward returns
        return out, out.new_zeros(())                             # no aux loss at inference

    def experts(self, moe):
        return list(moe.experts)

    def top_k(self, moe):
        return 2


moedit.register_adapter(ConditionedMoE, ConditionedAdapter())


# -- the models, each with two MoE layers of one kind -----------------------------------

class Model(nn.Module):
    def __init__(self, layer: type):
        super().__init__()
        self.inp, self.t_embed = nn.Linear(8, 16), nn.Linear(1, 16)
        self.moe1, self.moe2 = layer(), layer()

    def forward(self, x, t):
        h, temb = self.inp(x), self.t_embed(t[:, None])
        h = h + self._moe(self.moe1, h, temb)
        return h + self._moe(self.moe2, torch.tanh(h), temb)

    def _moe(self, moe, h, temb):
        return moe(h, temb)[0] if isinstance(moe, ConditionedMoE) else moe(h)


LAYERS = {"expert_choice": ExpertChoiceMoE, "packed": PackedMoE, "conditioned": ConditionedMoE}


def _model(kind: str) -> Model:
    torch.manual_seed(0)
    return _randomize(Model(LAYERS[kind]), seed=1)


def _inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(5, 6, 8, generator=gen), torch.rand(5, generator=gen)  # 5 images: 3+2 on 2 ranks


def _plan(world: int) -> moedit.Plan:
    return moedit.Plan(expert_parallel={"degree": world})


def _worker(rank, world):
    outputs = {}
    for kind in LAYERS:
        with moedit.compile(_model(kind), _plan(world)).to_runtime() as runtime:
            outputs[kind] = runtime.denoise(*_inputs())
    return outputs


@pytest.fixture(scope="module", params=[1, 2], ids=["1rank", "2ranks"])
def compiled_outputs(request):
    """Every rank's outputs of the three models, compiled under sync_ep at 1 or 2 ranks."""
    return run_ranks(request.param, _worker)


def _check_equals_eager(kind: str, per_rank: list[dict]) -> None:
    with torch.no_grad():
        expected = _model(kind)(*_inputs())
    for outputs in per_rank:
        torch.testing.assert_close(outputs[kind], expected, rtol=0, atol=1e-5)


def test_expert_choice_layer_equals_the_eager_model(compiled_outputs):
    with torch.no_grad():  # the routing gives tokens 0 to E experts, not a fixed K
        ids, _ = ExpertChoiceAdapter().route(_model("expert_choice").moe1, torch.randn(30, 16))
    per_token = (ids >= 0).sum(1)
    assert per_token.min() == 0 and per_token.max() > 1
    _check_equals_eager("expert_choice", compiled_outputs)


def test_packed_experts_layer_equals_the_eager_model(compiled_outputs):
    _check_equals_eager("packed", compiled_outputs)


def test_layer_with_timestep_input_and_tuple_output_equals_the_eager_model(compiled_outputs):
    _check_equals_eager("conditioned", compiled_outputs)


# -- what each shape costs and refuses ----------------------------------------------------

def test_empty_slots_are_left_out_of_the_exchange_and_sum_to_zero():
    x = torch.randn(5, 4)
    ids = torch.tensor([[0, -1, 2], [-1, -1, -1], [3, 1, -1], [-1, 2, 0], [1, -1, -1]])
    weights = torch.rand(5, 3)
    rows, order, counts = expert_ops.permute(x, ids, 2, 2, keep=ids >= 0)
    assert counts.sum() == order.numel() == rows.shape[0] == 7
    returned = rows * 2  # every expert doubles its input
    expected = 2 * x * (weights * (ids >= 0)).sum(1, keepdim=True)
    torch.testing.assert_close(expert_ops.unpermute(returned, order, weights), expected)
    if triton_installed():  # the kernels take the same keep mask (under Triton's interpreter on a CPU)
        for a, b in zip(expert_ops.permute(x, ids, 2, 2, keep=ids >= 0, kernels="triton"), (rows, order, counts)):
            assert torch.equal(a, b)
        torch.testing.assert_close(expert_ops.unpermute(returned, order, weights, kernels="triton"), expected)


def test_top_k_layers_get_no_keep_mask_and_expert_choice_layers_do():
    for kind, masked in (("packed", False), ("expert_choice", True)):
        code = moedit.compile(_model(kind), _plan(2)).graph(0).code
        assert ("keep = " in code) is masked, code


def test_an_expert_choice_route_returns_top_k_slots_on_every_call_and_empty_slots_weigh_nothing():
    class Short(ExpertChoiceAdapter):
        def route(self, moe, tokens):
            ids, weights = super().route(moe, tokens)
            return ids[:, :2], weights[:, :2]

    moe, tokens = _model("expert_choice").moe1, torch.randn(12, 16)
    ids, weights = expert_ops.Router(ExpertChoiceAdapter(), moe)(tokens)
    assert ids.shape == (12, 4) and (weights[ids < 0] == 0).all() and (weights[ids >= 0] > 0).all()
    with pytest.raises(ValueError, match="returned 2 slots per token, but its top_k is 4"):
        expert_ops.Router(Short(), moe)(tokens)


@pytest.mark.parametrize("section", [{"conditional_comm": {"interval": 2}}, {"sequence_parallel": {"ulysses": 2}}])
def test_expert_choice_layer_refuses_conditional_communication_and_split_images(section):
    plan = moedit.Plan(expert_parallel={"degree": 2}, **section)
    with pytest.raises(moedit.PlanError, match=f"{next(iter(section))}: layer 0 \\(moe1\\) routes with empty slots"):
        moedit.compile(_model("expert_choice"), plan)


def test_packed_experts_are_not_copied_and_explain_says_they_are_not_sharded():
    model = _model("packed")
    compiled = moedit.compile(model, _plan(2))
    program = compiled.graph(1)
    assert sorted(program.state_dict()) == sorted(model.state_dict()), "views must not add state-dict entries"
    assert program.moe1.w_up is model.moe1.w_up, "every rank keeps the whole packed parameter"
    assert "not sharded: the experts of moe1, moe2 are views of packed parameters" in compiled.explain()


class LooseMoE(ExpertChoiceMoE):
    """Takes a second input that its adapter's route(moe, tokens) does not."""

    def forward(self, x, temb):
        return super().forward(x + temb[:, None])


moedit.register_adapter(LooseMoE, ExpertChoiceAdapter())


def test_an_input_the_adapter_does_not_take_is_an_error_not_dropped():
    model = Model(LooseMoE)
    model._moe = lambda moe, h, temb: moe(h, temb)
    with pytest.raises(TypeError, match=r"moe1 is called with inputs after its tokens \(t_embed\) that "
                                        r"ExpertChoiceAdapter.route does not take"):
        moedit.compile(model, _plan(2))


def test_a_tuple_output_without_an_output_hook_is_an_error():
    class Adapter(ConditionedAdapter):
        output = moedit.MoEAdapter.output

    class Layer(ConditionedMoE):
        pass

    class Net(Model):
        def __init__(self):
            super().__init__(Layer)

        def _moe(self, moe, h, temb):
            return moe(h, temb)[0]

    moedit.register_adapter(Layer, Adapter())
    with pytest.raises(TypeError, match=r"override Adapter.output\(moe, out\)"):
        moedit.compile(Net(), _plan(2))


def test_the_readme_examples_are_the_code_tested_here():
    models_page = (pathlib.Path(__file__).parent.parent / "docs" / "models.md").read_text()
    section = models_page.split("\n## Adding an adapter for a new MoE layer\n")[1].split("\n## ")[0]
    examples = [block for block in re.findall(r"```python\n(.*?)```", section, re.S) if "Choice" in block
                or "Packed" in block or "Conditioned" in block]
    assert len(examples) == 3
    source = pathlib.Path(__file__).read_text()
    for block in examples:
        missing = [line for line in block.splitlines() if line.strip() and line not in source]
        assert not missing, f"docs/models.md lines not in this test: {missing}"
