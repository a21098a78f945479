"""The simulator: a two-rank example computed by hand, token buckets, stale exchanges that
cross steps, and replays of real compiled programs."""

import numpy as np
import pytest

import moedit
from moedit.planner.costs import Hardware, Link
from moedit.runtime.comm import Exchange
from moedit.planner.simulate import Compute, Replayed, SimulationError, Start, Wait, replay, simulate
from moedit.steps import StepKind, StepPlan

from _models import tiny_model

MS = 1e-3
SYNC = StepKind(True)
X = Exchange("dispatch", 0, "ep")


def _ms(n: int) -> Compute:
    """n ms of compute under `_hardware` (each op costs its 1 ms overhead)."""
    return Compute("work", np.zeros((n, 4)), "float32")


def _hardware(**link) -> Hardware:
    return Hardware(name="by hand", source="test", flops_per_s={"float32": 1e12}, memory_bytes_per_s=1e12,
                    op_overhead_s=MS, intra=Link(**{"latency_s": MS, "bytes_per_s": 1e6, **link}))


def _replayed(events: list[dict], stale: bool = False) -> Replayed:
    steps = StepPlan(stale=stale, warmup_steps=1, cooldown_steps=0, sync_every=None, refresh_every=None)
    return Replayed(len(events), steps, events, [0] * len(events), [0] * len(events), [0] * len(events), 1)


def test_two_ranks_by_hand():
    """rank 0: 10 ms, start X (4,000 bytes to rank 1), 5 ms, wait X, 2 ms.
    rank 1: 20 ms, start X (4,000 bytes to rank 0), wait X, 2 ms.
    X is issued by both at 20 ms and lands 1 ms (latency) + 4 ms (4,000 B at 1 MB/s) later,
    at 25 ms: rank 0 waits 25 - 15 = 10 ms, rank 1 5 ms; both finish at 27 ms."""
    rank0 = [_ms(10), Start(X, [0, 4000]), _ms(5), Wait(X, "L0 wait dispatch", 1), _ms(2)]
    rank1 = [_ms(20), Start(X, [4000, 0]), Wait(X, "L0 wait dispatch", 1), _ms(2)]
    predicted = simulate(_replayed([{SYNC: rank0}, {SYNC: rank1}]), _hardware(), steps=1, check_finite=False)
    assert predicted.step_s == [pytest.approx(27 * MS)]
    assert predicted.blocked_s == [pytest.approx(10 * MS)]
    assert predicted.sent_bytes == [4000]
    waits = [s for s in predicted.spans[1] if s.name == "L0 wait dispatch"]
    assert [(w.start, w.end) for w in waits] == [(pytest.approx(20 * MS), pytest.approx(25 * MS))]
    lane = [s for s in predicted.spans[0] if s.lane == "ep"]
    assert [(s.name, s.start, s.end) for s in lane] == [("L0 dispatch", pytest.approx(10 * MS), pytest.approx(25 * MS))]


def test_ranks_that_outnumber_the_cores_wait_the_square_root_of_their_compute_for_their_turns():
    """Both ranks compute 16 ms (or 64), then exchange nothing: latency 1 ms plus the turn-taking,
    0.01 s per square root of the seconds computed since they last met: 1.26 ms after 16 ms,
    2.53 after 64 (four times the compute, twice the wait). At another world size, none."""
    for computed in (16, 64):
        ranks = [[_ms(computed), Start(X, [0, 0]), Wait(X, "w", 1)] for _ in range(2)]
        for turns, extra in (({2: 0.01}, 0.01 * (computed * MS) ** 0.5), ({4: 0.01}, 0.0)):
            hardware = _hardware(turn_taking_s=turns)
            predicted = simulate(_replayed([{SYNC: r} for r in ranks]), hardware, steps=1, check_finite=False)
            assert predicted.step_s == [pytest.approx((computed + 1) * MS + extra)], (computed, turns)


def test_a_communicator_runs_one_exchange_at_a_time_and_a_bucket_lets_a_burst_through():
    """Two exchanges of 2,000 bytes issued together on one communicator: the second starts
    when the first has landed (1 ms latency + 2 ms): 3 and 6 ms. Over a link with a full
    3,000-byte token bucket, the first passes at once (lands at 1 ms); by then the bucket
    has refilled from 1,000 to 2,000 bytes, so the second passes at once too: 2 ms."""
    Y = Exchange("combine", 0, "ep")
    events = [{SYNC: [Start(X, [0, 2000]), Start(Y, [0, 2000]), Wait(X, "w", 0), _ms(0), Wait(Y, "w", 1)]},
              {SYNC: [Start(X, [2000, 0]), Start(Y, [2000, 0]), Wait(X, "w", 0), _ms(0), Wait(Y, "w", 1)]}]
    plain = simulate(_replayed(events), _hardware(), steps=1, check_finite=False)
    assert plain.step_s == [pytest.approx(6 * MS)]
    bucket = _hardware().model_copy(update={"nodes": 2, "inter": Link(latency_s=MS, bytes_per_s=1e6,
                                                                       bucket_bytes=3000)})
    burst = simulate(_replayed(events), bucket, steps=1, check_finite=False)
    assert burst.step_s == [pytest.approx(2 * MS, abs=1e-6)]


def test_a_stale_wait_waits_for_the_exchange_started_a_step_earlier():
    """An async step waits for the X that the step before started (carried), then starts its
    own and computes 10 ms. Step 0 is synchronous: 10 ms. Step 1 has nothing to wait for
    (after a synchronous step the runtime's cache holds finished results), starts X at 10 ms
    (lands 1 + 20 ms later, at 31 ms) and ends at 20 ms. Step 2 waits 11 ms for it: 21 ms."""
    stale_x = Exchange("dispatch", 0, "ep", "stale")
    async_events = [Wait(stale_x, "L0 wait dispatch", None), Start(stale_x, [0, 20000]), _ms(10)]
    events = [{SYNC: [_ms(10)], StepKind(False): [_for_rank(e, r) for e in async_events]} for r in range(2)]
    predicted = simulate(_replayed(events, stale=True), _hardware(), steps=3, check_finite=False)
    assert predicted.step_s == [pytest.approx(10 * MS), pytest.approx(10 * MS), pytest.approx(21 * MS)]
    assert predicted.blocked_s == [0, 0, pytest.approx(11 * MS)]


def _for_rank(event, rank: int):
    if isinstance(event, Start):
        return Start(event.exchange, [0.0 if q == rank else 20000.0 for q in range(2)])
    return event


def test_ranks_that_disagree_on_their_exchanges_are_an_error_not_a_hang():
    events = [{SYNC: [Start(X, [0, 10]), Wait(X, "w", 0)]}, {SYNC: [_ms(1)]}]
    with pytest.raises(SimulationError, match="never finished"):
        simulate(_replayed(events), _hardware(), steps=1, check_finite=False)


@pytest.mark.parametrize("plan", ["sync_ep", "dice"])
def test_a_replay_of_compiled_programs_sends_what_uniform_routing_sends(plan):
    model = tiny_model()
    settings = moedit.Plan.from_file(f"examples/plans/{plan}.yaml").to_dict()
    compiled = moedit.compile(model, moedit.Plan(**{**settings, "expert_parallel": {"degree": 2}}))
    replayed = replay(compiled, 8)
    predicted = simulate(replayed, _hardware(latency_s=1e-5, bytes_per_s=1e9), steps=4)
    cfg = model.config
    tokens = 4 * (cfg.input_size // cfg.patch_size) ** 2  # per rank
    full = 2 * tokens * cfg.num_experts_per_tok * cfg.hidden_size * 4 // 2  # dispatch + combine, half off-rank
    layers = cfg.depth
    counts = (cfg.num_experts // 2) * 8  # counts exchange: [P, L] int64, one row to the other rank
    flag = 4  # the runtime's check for non-finite latents
    assert predicted.sent_bytes[0] == layers * (full + counts) + flag
    assert all(s > 0 for s in predicted.step_s)
    assert replayed.weight_bytes[0] < sum(p.numel() * 4 for p in model.parameters())  # half the experts
    if plan == "dice":  # a step that drops the low slot sends half the rows of the interweaved half
        assert predicted.sent_bytes[1] < predicted.sent_bytes[0]


@pytest.mark.parametrize("settings", [
    {"expert_parallel": {"degree": 4}},
    {"expert_parallel": {"degree": 2}, "data_parallel": 2},
    {"expert_parallel": {"degree": 1}, "data_parallel": 4},
    {"expert_parallel": {"degree": 2, "chunks": 2}, "data_parallel": 2, "schedule": {"policy": "overlap"}},
    {**moedit.Plan.from_file("examples/plans/dice.yaml").to_dict(), "expert_parallel": {"degree": 2},
     "data_parallel": 2},
])
def test_replicas_mirror_rank_0_as_a_replay_of_every_rank_sees_them(settings):
    """The planner replays rank 0 only (predict's ranks=[0]); with data-parallel replicas the
    other ranks' exchanges are rank 0's moved to their own expert group, and the prediction is
    the one a replay of all four ranks makes."""
    compiled = moedit.compile(tiny_model(), moedit.Plan(**settings))
    hardware = _hardware(latency_s=1e-5, bytes_per_s=1e8)
    every, mirrored = (simulate(replay(compiled, 8, ranks=ranks), hardware, steps=4) for ranks in (None, [0]))
    assert mirrored.step_s == pytest.approx(every.step_s, rel=1e-9)
    assert mirrored.blocked_s == pytest.approx(every.blocked_s, rel=1e-9)
    assert mirrored.sent_bytes == every.sent_bytes and mirrored.peak_bytes == every.peak_bytes
