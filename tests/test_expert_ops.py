"""The local pieces of expert parallelism, with the all-to-alls done by hand in one process."""

import pytest
import torch

import moedit
from _models import tiny_model
from moedit.models import dit_moe
from moedit.passes.expert_parallel import local_experts
from moedit.runtime.expert_ops import LocalExperts, permute, splits, unpermute


def _exchange(per_rank_rows, per_rank_splits):
    """What all_to_all_single delivers: rank d receives, from every rank s in order, the
    `per_rank_splits[s][d]` rows that s cut out for d."""
    world = len(per_rank_rows)
    chunks = [rows.split(sizes) for rows, sizes in zip(per_rank_rows, per_rank_splits)]
    return [torch.cat([chunks[s][d] for s in range(world)]) for d in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_permute_exchange_experts_unpermute_equals_the_reference_layer(world):
    torch.manual_seed(0)
    moe = dit_moe("tiny").blocks[0].moe
    experts = list(moe.experts)
    num_local = len(experts) // world
    tokens = [torch.randn(n, 32) for n in (5, 0, 7, 3)[:world]]  # rank 1 has no tokens at all
    # Route by hand: experts 6 and 7 get nothing, expert 0 gets every token's first slot.
    ids = [torch.stack([torch.zeros(len(t), dtype=torch.long), torch.randint(1, 6, (len(t),))], 1) for t in tokens]
    weights = [torch.rand(len(t), 2) for t in tokens]

    perms = [permute(t, i, world, num_local) for t, i in zip(tokens, ids)]
    send_counts = [p[2] for p in perms]
    recv_counts = [torch.stack([send_counts[s][d] for s in range(world)]) for d in range(world)]
    received = _exchange([p[0] for p in perms], [splits(c) for c in send_counts])
    outputs = []
    for rank in range(world):
        held = local_experts(len(experts), world, rank)
        outputs.append(LocalExperts([experts[e] for e in held], held)(received[rank], recv_counts[rank]))
    returned = _exchange(outputs, [splits(c) for c in recv_counts])

    for rank in range(world):
        routed = unpermute(returned[rank], perms[rank][1], weights[rank])
        expected = torch.zeros_like(tokens[rank])
        for slot in range(2):
            for i, e in enumerate(ids[rank][:, slot].tolist()):
                expected[i] += weights[rank][i, slot] * experts[e](tokens[rank][i:i + 1])[0]
        torch.testing.assert_close(routed, expected, rtol=1e-5, atol=1e-6)


def test_permute_orders_rows_by_rank_then_local_expert():
    ids = torch.tensor([[3, 0], [2, 1], [0, 3]])
    rows, order, counts = permute(torch.arange(3.0)[:, None], ids, world_size=2, num_local=2)
    # expert e -> rank e % 2, local e // 2; keys: 0->0, 2->1 on rank 0; 1->2, 3->3 on rank 1
    assert counts.tolist() == [[2, 1], [1, 2]]
    assert rows[:, 0].tolist() == [0.0, 2.0, 1.0, 1.0, 0.0, 2.0]
    assert sorted(order.tolist()) == list(range(6))


class _HostSyncs(torch.overrides.TorchFunctionMode):
    """Counts the calls that copy a device tensor's values to the host (a stall on CUDA)."""

    SYNCING = {torch.Tensor.tolist, torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__bool__,
               torch.Tensor.__index__, torch.Tensor.__float__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.cpu,
               torch.bincount, torch.Tensor.bincount}  # bincount reads its input's min and max on the host

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        implicit = (getattr(func, "__name__", "") == "repeat_interleave" and isinstance(repeats, torch.Tensor)
                    and kwargs.get("output_size") is None)  # sizes its output from the values
        self.count += func in self.SYNCING or implicit
        return func(*args, **kwargs)


@pytest.mark.parametrize("plan", [{}, {"staleness": {"mode": "interweaved", "warmup_steps": 1}},
                                  {"offload": {"enabled": True, "resident_experts": 8}},
                                  {"expert_parallel": {"degree": 1, "chunks": 2}}],
                         ids=["sync", "interweaved", "offload", "chunks"])
def test_a_moe_layer_costs_at_most_one_host_sync_per_step(plan):
    """Counts, splits, the experts' group sizes: one device->host copy per layer (see splits)."""
    import warnings

    model = tiny_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a stale plan on one rank warns that it hides nothing
        compiled = moedit.compile(model, moedit.Plan(**plan))
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with compiled.to_runtime() as runner:
        runner.reset(steps=3)
        for _ in range(3):
            with _HostSyncs() as syncs:
                runner._run(x, t, y)
            assert syncs.count <= len(compiled.layers)


def test_release_drops_the_stacked_weights_and_the_kernels_stack_them_again():
    experts = list(tiny_model().blocks[0].moe.experts[:2])
    local = LocalExperts(experts, [0, 1])
    like = torch.zeros(1, experts[0].gate_proj.in_features)
    first = local._weights(like)
    local.release()
    assert local._stacked is None
    assert all(torch.equal(a, b) for a, b in zip(local._weights(like), first))
