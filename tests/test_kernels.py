"""The Triton kernels (moedit/runtime/kernels) against their torch references, on the CPU under
Triton's interpreter, and `kernels: triton` against `kernels: torch` at 2 ranks.

Skipped where Triton is not installed (it is in the test extra on Linux x86_64)."""

import inspect

import pytest
import torch

import moedit
from _models import tiny_model
from moedit.runtime import expert_ops
from moedit.runtime.kernels import load, triton_installed

pytestmark = pytest.mark.skipif(not triton_installed(), reason="Triton is not installed")


@pytest.fixture(scope="module")
def kernels():
    return load()


def _routing(tokens=37, top_k=2, experts=8, hidden=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    ids = torch.randint(0, experts, (tokens, top_k), generator=gen)
    weights = torch.rand(tokens, top_k, generator=gen)
    return x, ids, weights


@pytest.mark.parametrize("keep_some", [False, True])
def test_permute_gathers_the_reference_rows(kernels, keep_some):
    x, ids, weights = _routing()
    keep = weights > 0.3 if keep_some else None
    reference = expert_ops.permute(x, ids, 2, 4, keep)
    triton = expert_ops.permute(x, ids, 2, 4, keep, kernels="triton")
    for a, b in zip(reference, triton):
        assert torch.equal(a, b)


@pytest.mark.parametrize("keep_some", [False, True])
def test_unpermute_sums_the_reference_slots(kernels, keep_some):
    x, ids, weights = _routing(tokens=41, top_k=2)
    keep = weights > 0.3 if keep_some else None
    _, order, _ = expert_ops.permute(x, ids, 2, 4, keep)
    returned = torch.randn(order.numel(), x.shape[1])
    torch.testing.assert_close(expert_ops.unpermute(returned, order, weights, kernels="triton"),
                               expert_ops.unpermute(returned, order, weights), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sizes", [[5, 0, 17, 3], [0, 0], [40], [16, 16, 1]])
def test_grouped_swiglu_equals_each_expert_run_alone(kernels, sizes):
    gen = torch.Generator().manual_seed(sum(sizes))
    experts = [tiny_model().blocks[0].moe.experts[i] for i in range(len(sizes))]
    x = torch.randn(sum(sizes), experts[0].gate_proj.in_features, generator=gen)
    gate, up, down = (torch.stack(w) for w in zip(*map(expert_ops.swiglu_weights, experts)))
    expected = [expert(rows) for expert, rows in zip(experts, x.split(sizes))]
    with torch.no_grad():
        torch.testing.assert_close(kernels.grouped_swiglu(x, sizes, gate, up, down), torch.cat(expected), rtol=0,
                                   atol=1e-5)


@pytest.mark.parametrize("dtype, precision", [(torch.float32, "ieee"), (torch.bfloat16, "tf32"),
                                              (torch.float16, "tf32")])
def test_float32_expert_matmuls_are_ieee_and_half_ones_keep_the_tensor_cores(kernels, monkeypatch, dtype, precision):
    """On a GPU `tl.dot` on float32 defaults to TF32 (drift ~1e-3 against torch); Triton's
    interpreter ignores the precision (numpy matmul), so no CPU result can show it: this
    checks the argument every launch passes and that every `tl.dot` in the kernel takes it."""
    launched = []

    class Launcher:
        def __getitem__(self, grid):
            return lambda *args: launched.append(args[-1])

    monkeypatch.setattr(kernels, "_grouped_matmul", Launcher())
    x, w = torch.randn(5, 8).to(dtype), torch.randn(2, 4, 8).to(dtype)
    kernels.grouped_swiglu(x, [2, 3], w, w, w.transpose(1, 2).contiguous())
    assert launched == [precision, precision]  # the gate/up launch and the down launch
    source = inspect.getsource(kernels)
    assert source.count("tl.dot(") == source.count("input_precision=PRECISION)") == 2


@pytest.mark.parametrize("policy", ["low", "high", "threshold"])
def test_drop_slots_keeps_the_reference_slots(kernels, policy):
    _, ids, weights = _routing(tokens=33, top_k=4)
    weights = weights.sort(dim=1, descending=True).values
    drop = expert_ops.DropSlots(policy, count=2, threshold=0.4)
    assert torch.equal(expert_ops.DropSlots(policy, 2, 0.4, kernels="triton")(None, ids, weights),
                       drop(None, ids, weights))


def _worker(rank, world, kernels_name):
    plan = moedit.Plan(expert_parallel={"degree": world}, kernels=kernels_name,
                       staleness={"mode": "interweaved"}, conditional_comm={"interval": 2})
    compiled = moedit.compile(tiny_model(), plan)
    assert compiled.kernels == kernels_name
    with compiled.to_runtime() as runtime:
        return runtime.sample([1, 2, 3, 4, 5], 4, 1.5, seed=3)


def test_triton_kernels_give_the_images_torch_gives_at_2_ranks(spawn):
    """Interweaved DICE with conditional communication runs every kernel: permute, unpermute
    (the stale layers'), the grouped experts and slot dropping."""
    torch_images = spawn(2, _worker, "torch")
    triton_images = spawn(2, _worker, "triton", timeout_s=300)
    for a, b in zip(torch_images, triton_images):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_auto_picks_torch_on_a_cpu_and_triton_without_triton_is_refused(monkeypatch):
    assert moedit.compile(tiny_model(), moedit.Plan(kernels="auto")).kernels == "torch"
    monkeypatch.setattr("moedit.runtime.kernels.triton_installed", lambda: False)
    with pytest.raises(moedit.PlanError, match="needs Triton; install it"):
        moedit.compile(tiny_model(), moedit.Plan(kernels="triton"))
