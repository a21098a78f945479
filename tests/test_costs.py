"""The cost model: op counting, the roofline per op, profiles on disk, and `moedit calibrate`."""

import numpy as np
import pytest
import torch

from moedit.planner.calibrate import calibrate
from moedit.planner.costs import BYTES, ELEMENTS, FAMILY, FLOPS, Hardware, HardwareError, Link, OpCounter, known_profiles


def _hardware(**changes) -> Hardware:
    fields = dict(name="test", source="by hand", flops_per_s={"float32": 1e9, "bfloat16": 4e9},
                  memory_bytes_per_s=1e8, op_overhead_s=1e-6, intra=Link(latency_s=1e-3, bytes_per_s=1e6))
    return Hardware(**{**fields, **changes})


def test_the_counter_sees_matmul_flops_and_bytes_but_not_views():
    a, b = torch.randn(4, 8), torch.randn(8, 16)
    counter = OpCounter()
    with counter:
        a.t().t() @ b
        a.reshape(8, 4).view(32)
    ops = counter.take()
    assert ops.shape == (1, 4)
    assert ops[0, FLOPS] == 2 * 4 * 8 * 16
    assert ops[0, BYTES] == 4 * (4 * 8 + 8 * 16 + 4 * 16)
    assert ops[0, ELEMENTS] == 8 * 16


def test_the_counter_prices_cpu_attention_and_files_router_ops_by_family():
    q = torch.randn(1, 2, 16, 8)
    counter = OpCounter()
    with counter:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
        torch.randn(32, 8).softmax(-1).topk(2, dim=-1)
    ops = counter.take()
    assert ops[:, FLOPS].max() == 4 * 2 * 16 * 16 * 8
    assert {1, 2} <= set(ops[:, FAMILY].astype(int))  # softmax, sort


def test_seconds_is_a_roofline_per_op_plus_overhead():
    hw = _hardware(per_element_s={"sort": 1e-6})
    ops = np.array([[2e9, 1e6, 0, 0],  # compute-bound: 2 s
                    [0, 3e8, 0, 0],  # memory-bound: 3 s
                    [0, 10, 1e6, 2]])  # a top-k over a million elements: 1 s
    assert hw.seconds(ops, "float32") == pytest.approx(2 + 3 + 1 + 3e-6)
    assert hw.seconds(ops[:1], "bfloat16") == pytest.approx(0.5 + 1e-6)
    slower = _hardware(compute_slowdown={2: 1.5}, efficiency=0.5)
    assert slower.seconds(ops[:1], "float32", ranks_here=2) == pytest.approx((2 + 1e-6) / 0.5 * 1.5)
    assert slower.seconds(ops[:1], "float32", ranks_here=4) == pytest.approx((2 + 1e-6) / 0.5 * 3.0)


def test_published_profiles_load_and_say_where_their_figures_come_from():
    for name in ("a100-nvlink-8", "h100-nvlink-8", "l40-pcie-8", "rtx4090-pcie-8", "ethernet-2x8"):
        hw = Hardware.load(name)
        assert hw.name == name
        assert any(where in hw.source for where in ("datasheet", "whitepaper", "NIC")), hw.source
        assert hw.flops_per_s["bfloat16"] > 1e13
    two_nodes = Hardware.load("ethernet-2x8")
    assert [two_nodes.node_of(r, 16) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]


def test_unknown_or_uncalibrated_profiles_say_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path))
    with pytest.raises(HardwareError, match="moedit calibrate"):
        Hardware.load("cpu-local")
    with pytest.raises(HardwareError, match="l40-pcie-8"):
        Hardware.load("l40-pcie-9")
    assert "cpu-local" in known_profiles()


def test_a_profile_round_trips_through_its_file(tmp_path):
    hw = _hardware(per_element_s={"softmax": 2e-8}, compute_slowdown={1: 0.7, 2: 1.1},
                   inter=Link(latency_s=1e-4, bytes_per_s=5e7, bucket_bytes=262144))
    hw.save(tmp_path / "mine.yaml")
    assert Hardware.load(tmp_path / "mine.yaml") == hw


def test_calibrate_measures_this_machine_and_caches_the_profile(tmp_path, monkeypatch):
    monkeypatch.setenv("MOEDIT_CACHE", str(tmp_path))
    measured = calibrate(verbose=False)
    assert (tmp_path / "hardware" / "cpu-local.yaml").exists()
    assert Hardware.load("cpu-local") == measured
    assert 1e8 < measured.flops_per_s["float32"] < 1e13  # a CPU core: 0.1 GFLOP/s to 10 TFLOP/s
    assert 1e-7 < measured.op_overhead_s < 1e-3
    assert 0.1 < measured.efficiency < 3
    assert measured.intra.latency_by_world.keys() == {2, 4}
    assert measured.intra.bytes_per_s > 1e6 and measured.intra.cpu_bytes_per_s == 2 * measured.intra.bytes_per_s
    assert set(measured.compute_slowdown) == {1, 2, 4}
