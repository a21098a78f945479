"""Sequence parallelism (Ulysses, Ring, USP) and CFG parallelism equal the single-device model.

Each spawned world runs several plans one after another (runtimes come and go in one
process group), so the suite starts ranks twice, not once per plan.
"""

import pytest
import torch

import moedit
from _models import tiny_model
from moedit.models import dit_moe
from moedit.plan import PlanError
from moedit.runtime.sequence_ops import attend_block, merge_blocks, merged_output
from moedit.runtime.sampling import initial_noise, rectified_flow_sample

LABELS = [1, 2, 3, 4, 5]  # odd: the CFG halves and the data shards are uneven without guidance
STEPS, CFG = 3, 1.5

PLANS = {  # world -> name -> plan
    2: {
        "ulysses 2": dict(sequence_parallel={"ulysses": 2}, expert_parallel={"degree": 2}),
        "ring 2": dict(sequence_parallel={"ring": 2}, expert_parallel={"degree": 2}),
        "cfg 2": dict(cfg_parallel=True, expert_parallel={"degree": 2}),
        "ulysses 2, experts on 1": dict(sequence_parallel={"ulysses": 2}),
        "data parallel 2, every expert on each rank": dict(data_parallel=2),
    },
    4: {
        "ulysses 4": dict(sequence_parallel={"ulysses": 4}, expert_parallel={"degree": 4}),
        "ring 4": dict(sequence_parallel={"ring": 4}, expert_parallel={"degree": 4}),
        "usp 2x2": dict(sequence_parallel={"ulysses": 2, "ring": 2}, expert_parallel={"degree": 4}),
        "usp 2x2, overlap schedule": dict(sequence_parallel={"ulysses": 2, "ring": 2}, expert_parallel={"degree": 4},
                                          schedule={"policy": "overlap"}),
        "cfg 2 x ulysses 2": dict(cfg_parallel=True, sequence_parallel={"ulysses": 2}, expert_parallel={"degree": 4}),
        "cfg 2 x ulysses 2, experts on 2": dict(cfg_parallel=True, sequence_parallel={"ulysses": 2},
                                                expert_parallel={"degree": 2}),
        "cfg 2 x ring 2, chunked": dict(cfg_parallel=True, sequence_parallel={"ring": 2},
                                        expert_parallel={"degree": 4, "chunks": 2}),
        "ulysses 2 x data 2": dict(sequence_parallel={"ulysses": 2}, expert_parallel={"degree": 4}),
        "experts on 2 x data parallel 2": dict(expert_parallel={"degree": 2}, data_parallel=2),
        "experts on 2 x data parallel 2, overlap schedule": dict(expert_parallel={"degree": 2}, data_parallel=2,
                                                                 schedule={"policy": "overlap"}),
        "ulysses 2, experts on 2 x data parallel 2": dict(sequence_parallel={"ulysses": 2},
                                                          expert_parallel={"degree": 2}, data_parallel=2),
        "cfg 2 x data parallel 2, experts on 2": dict(cfg_parallel=True, expert_parallel={"degree": 2},
                                                      data_parallel=2),
    },
}


def _batch():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(5, 4, 8, 8, generator=gen), torch.rand(5, generator=gen), torch.tensor([0, 3, 9, 3, 10])


def _worker(rank, world):
    results = {}
    for name, plan in PLANS[world].items():
        compiled = moedit.compile(tiny_model(), moedit.Plan(**plan))
        with compiled.to_runtime() as runtime:
            results[name] = {"denoise": runtime.denoise(*_batch()),
                             "sample": runtime.sample(LABELS, STEPS, CFG, seed=7)}
    return results


@pytest.fixture(scope="module")
def expected():
    model = tiny_model()
    with torch.no_grad():
        return {"denoise": model(*_batch()),
                "sample": rectified_flow_sample(model, initial_noise(5, 4, 8, seed=7), torch.tensor(LABELS),
                                                steps=STEPS, cfg_scale=CFG, null_class=10)}


@pytest.mark.parametrize("world", [2, 4])
def test_parallel_plans_equal_the_single_device_model(spawn, expected, world):
    for rank, results in enumerate(spawn(world, _worker, timeout_s=240)):
        assert set(results) == set(PLANS[world])
        for name, result in results.items():
            for what in ("denoise", "sample"):
                torch.testing.assert_close(result[what], expected[what], rtol=0, atol=1e-5,
                                           msg=lambda m: f"{name}, {what}, rank {rank}: {m}")


def _exchanges(plan: dict) -> dict:
    compiled = moedit.compile(tiny_model(), moedit.Plan(**plan))
    return {axis: names for (axis, _), names in moedit.verify.collective_order(compiled.graph(0)).items()}


def test_each_technique_exchanges_on_its_axis():
    ulysses = _exchanges(PLANS[4]["usp 2x2"])
    assert ulysses["ulysses"][:2] == ["attention 0 q/k/v", "attention 0 output"]
    assert ulysses["ring"] == ["attention 0 k/v", "attention 1 k/v"]  # one turn each with 2 ring ranks
    assert ulysses["sp"] == ["gather of the tokens"]
    assert ulysses["ep"][:2] == ["layer 0 counts", "layer 0 dispatch"]
    cfg = _exchanges(PLANS[2]["cfg 2"])
    assert cfg["cfg"] == ["gather of the CFG halves"] and "sp" not in cfg


def test_ring_turns_overlap_the_attention_to_the_block_held():
    compiled = moedit.compile(tiny_model(), moedit.Plan(**PLANS[4]["ring 4"]))
    graph = [n for n in compiled.graph(0).graph.nodes if n.name.startswith("a0_")]
    nodes = [n.name for n in graph]
    turns = [nodes.index(f"a0_ring_start{s}") for s in ("", "_1", "_2")]
    waits = [nodes.index(f"a0_ring_wait{s}") for s in ("", "_1", "_2")]
    blocks = [i for i, n in enumerate(graph) if n.target is attend_block]
    assert len(blocks) == 4 and len(turns) == 3
    for turn, wait, block in zip(turns, waits, blocks):
        assert turn < block < wait, "each k/v transfer must be in flight while the block held is attended to"


@pytest.mark.parametrize("size, plan, message", [
    (12, dict(sequence_parallel={"ulysses": 3}, expert_parallel={"degree": 3}), r"head count of blocks.0.attn \(4\)"),
    (8, dict(sequence_parallel={"ring": 3}, expert_parallel={"degree": 3}), r"tokens per image \(16\)"),
    (8, dict(sequence_parallel={"ulysses": 2}, expert_parallel={"degree": 3}), "must divide one another"),
])
def test_degrees_that_do_not_fit_are_clear_errors(size, plan, message):
    with pytest.raises(PlanError, match=message):
        moedit.compile(dit_moe("tiny", num_experts=6, input_size=size), moedit.Plan(**plan))


def test_the_mesh_puts_ulysses_innermost_and_experts_on_consecutive_ranks():
    plan = moedit.Plan(cfg_parallel=True, sequence_parallel={"ulysses": 2, "ring": 2}, expert_parallel={"degree": 4})
    mesh = plan.mesh
    assert mesh.world == 8 and mesh.data == 1
    assert mesh.groups("ulysses") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert mesh.groups("ring") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert mesh.groups("cfg") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert mesh.groups("sp") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert mesh.groups("ep") == [[0, 1, 2, 3], [4, 5, 6, 7]]
    plain = moedit.Plan(expert_parallel={"degree": 4}).mesh
    assert plain.world == 4 and plain.groups("data") == [[0, 1, 2, 3]], "plain EP: the batch is split over every rank"
    replicas = moedit.Plan(expert_parallel={"degree": 2}, data_parallel=2).mesh
    assert replicas.world == 4 and replicas.groups("ep") == [[0, 1], [2, 3]] and replicas.data == 4


def test_ring_blocks_merge_in_float32_so_bfloat16_rounds_once():
    """Eight bfloat16 blocks merged by their log-sum-exps are as close to the float32 result
    as one bfloat16 attention over every key (a merge in bfloat16 rounds at every turn)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 16, generator=gen) for _ in range(3))
    reference = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    low = [t.bfloat16() for t in (q, k, v)]
    whole = torch.nn.functional.scaled_dot_product_attention(*low).float()
    partial = None
    for k_block, v_block in zip(low[1].chunk(8, 2), low[2].chunk(8, 2)):
        block = attend_block(low[0], torch.stack([k_block, v_block]), None)
        partial = block if partial is None else merge_blocks(partial, block)
    ring = merged_output(partial, low[0])
    assert ring.dtype == torch.bfloat16
    assert (ring.float() - reference).abs().max() <= 1.5 * (whole - reference).abs().max()
