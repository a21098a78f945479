"""The `moedit` command and the torchrun entry point, as a user runs them."""

import json
import subprocess
import sys

from PIL import Image

from moedit.cli import main as moedit_main


def test_inspect_prints_the_plan_table_without_processes(capsys, tmp_path):
    assert moedit_main(["inspect", "--model", "S/2-8E2A", "--plan", "examples/plans/sync_ep.yaml",
                        "--world-size", "4", "--dump", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "expert_parallel.degree=4" in out and "rank 3: experts [3, 7]" in out
    assert out.count("blocks.") == 12
    assert (tmp_path / "rank3.py").exists()


def test_inspect_reports_bad_plans_as_errors(capsys, tmp_path):
    assert moedit_main(["inspect", "--model", "tiny", "--plan", "examples/plans/sync_ep.yaml",
                        "--world-size", "3"]) == 2
    assert "divisible by the expert-parallel degree (3)" in capsys.readouterr().err


def test_torchrun_entry_writes_images_and_timings(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "moedit.run",
           "--model", "tiny", "--plan", "examples/plans/sync_ep.yaml", "--out", str(tmp_path), "--steps", "2",
           "--num-images", "3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    timings = json.loads((tmp_path / "timings.json").read_text())
    assert timings["world_size"] == 2 and len(timings["step_s"]) == 2 and timings["backend"] == "gloo"
    assert Image.open(tmp_path / "samples.png").size[0] > 0
    assert "rank 1: experts [1, 3, 5, 7]" in (tmp_path / "explain.txt").read_text()


def test_torchrun_entry_with_the_wrong_world_size_fails_fast(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "moedit.run",
           "--model", "tiny", "--plan", "examples/plans/sync_ep.yaml", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "compiled for 2 ranks but the process group has 1" in proc.stderr
