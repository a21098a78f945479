"""The `moedit` command and the torchrun entry point, as a user runs them."""

import json
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from moedit.cli import main as moedit_main
from moedit.models import load_model
from moedit.models.dit_moe import ALIASES
from moedit.models.images import grid
from moedit.models.pretrained import model_names
from moedit.runtime import launch

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


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
    plain = grid(torch.load(tmp_path / "images.pt"), columns=10, scale=4)
    assert Image.open(tmp_path / "samples.png").height > plain.height  # the caption strip
    assert "rank 1: experts [1, 3, 5, 7]" in (tmp_path / "explain.txt").read_text()
    summary = next(line for line in proc.stderr.splitlines() if "moedit.run: 3 images in" in line)
    for name in ("samples.png", "explain.txt", "images.pt", "timings.json"):
        assert str(tmp_path / name) in summary


def test_torchrun_entry_with_the_wrong_world_size_fails_fast(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "moedit.run",
           "--model", "tiny", "--plan", "examples/plans/sync_ep.yaml", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0
    assert "compiled for 2 ranks but the process group has 1" in proc.stderr


def test_a_multi_rank_plan_without_torchrun_is_one_error_line(tmp_path):
    cmd = [sys.executable, "-m", "moedit.run", "--model", "tiny", "--plan", "examples/plans/sync_ep.yaml", "--out",
           str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "needs 2 ranks but no process group exists; launch with `torchrun --nproc_per_node=2" in proc.stderr


def _no_work(*args, **kwargs):
    raise AssertionError("moedit.run started work before refusing its arguments")


@pytest.fixture
def run_alone(monkeypatch):
    """`python -m moedit.run` in this process as rank 0, failing if it loads a model or compiles."""
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(launch, "load_model", _no_work)
    monkeypatch.setattr(launch.moedit, "compile", _no_work)
    return launch.main


@pytest.mark.parametrize("out", ["a_file", "a_file/sub"])
def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys, run_alone, out):
    (tmp_path / "a_file").write_text("")
    assert run_alone(["--plan", "examples/plans/single.yaml", "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moedit.run: error: --out {tmp_path / out}") and err.count("\n") == 1, err


def test_more_diffusion_steps_than_training_steps_are_refused_before_any_work(tmp_path, capsys, run_alone):
    assert run_alone(["--model", "tiny", "--plan", "examples/plans/single.yaml", "--out", str(tmp_path),
                      "--sampler", "ddim", "--steps", "2000"]) == 2
    assert "moedit.run: error: Gaussian diffusion takes 1..1000 steps" in capsys.readouterr().err


def test_labels_outside_the_model_classes_are_refused_before_compiling(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setattr(launch.moedit, "compile", _no_work)
    assert launch.main(["--model", "tiny", "--plan", "examples/plans/single.yaml", "--out", str(tmp_path),
                        "--labels", "3", "12"]) == 2
    assert "moedit.run: error: --labels [12]: this model's classes are 0..9" in capsys.readouterr().err


def test_an_error_every_rank_hits_is_printed_once_without_a_traceback(tmp_path):
    plan = tmp_path / "typo.yaml"
    plan.write_text("expert_parallel:\n  degre: 2\n")
    proc = subprocess.run(TORCHRUN + ["--nproc_per_node=2", "-m", "moedit.run", "--model", "tiny", "--plan",
                                      str(plan), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.count("expert_parallel.degre: unknown key") == 1, proc.stderr[-3000:]
    # torchrun reports a failed worker with a traceback of its own launcher; none comes from moedit.
    frames = re.findall(r'^  File "([^"]+)"', proc.stderr, re.M)
    assert all("torch" in frame or frame.startswith("<frozen") for frame in frames), proc.stderr[-3000:]


def test_model_help_and_the_unknown_model_error_name_every_model(capsys):
    with pytest.raises(ValueError, match=r"unknown model 'digit'; use one of: digits, digits-scmoe .*tiny, "
                                         r"<S\|B\|L\|XL\|G>/<2\|4\|8>-<8\|16>E2A"):
        load_model("digit")
    for show_help in (lambda: launch.parse_args(["--help"]), lambda: moedit_main(["inspect", "--help"]),
                      lambda: moedit_main(["plan", "--help"])):
        with pytest.raises(SystemExit):
            show_help()
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help
        assert "digits, digits-scmoe" in text and "moedit models" in text


def test_models_lists_every_name_with_its_size(capsys):
    assert moedit_main(["models"]) == 0
    rows = {line.split()[0]: line.split()[1:] for line in capsys.readouterr().out.splitlines()[1:] if line.strip()}
    assert set(model_names()) - set(ALIASES) <= set(rows)
    assert rows["digits"] == ["1.6", "M", "729", "k", "6", "64", "8", "2", "shipped"]
    assert rows["S/2-8E2A"][:4] == ["199.3", "M", "71.9", "M"]  # DiT-MoE's paper: 199 M, 71 M activated
    assert rows["G/2-16E2A"][-1] == "none"


def test_plan_schema_prints_every_plan_field(capsys):
    assert moedit_main(["plan-schema"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("| field | type | default | description |")
    assert "| `expert_parallel.degree` | int; ≥ 1 | `1` |" in out
    assert "| `staleness.mode` | one of `sync`, `displaced`, `interweaved` | `sync` |" in out
