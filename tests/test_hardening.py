"""Bad input fails early in one line that names what to change; outputs are whole or absent;
no worker outlives its launcher."""

import os
import signal
import subprocess
import sys
import time

import pytest

from moedit.runtime import launch

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]

PLANS = {  # file name, content -> what the one error line says
    "dup.yaml": ("expert_parallel:\n  degree: 2\nexpert_parallel:\n  degree: 4\n",
                 "dup.yaml, line 3, column 1: not valid YAML: key 'expert_parallel' given twice (first on line 1)"),
    "empty.yaml": ("", "empty.yaml is empty; write at least one section"),
    "comments.yaml": ("# nothing but a comment\n", "comments.yaml is empty"),
    "intkey.yaml": ("expert_parallel:\n  1: 2\n", "intkey.yaml: key 1 at expert_parallel is not a name"),
    "bool.yaml": ("expert_parallel:\n  degree: true\n", "expert_parallel.degree: Input should be a valid integer "
                  "(got True)"),
    "float.yaml": ("expert_parallel:\n  degree: 2.5\n", "expert_parallel.degree: Input should be a valid integer"),
    "inf.yaml": ("runtime:\n  timeout_s: .inf\n", "runtime.timeout_s: Input should be a finite number"),
    "huge.yaml": ("runtime:\n  timeout_s: 1.0e+30\n", "runtime.timeout_s: Input should be less than or equal to 86400"),
    "nan.yaml": ("conditional_comm:\n  interval: 2\n  threshold: .nan\n", "conditional_comm.threshold: Input should "
                 "be a finite number"),
    "union.yaml": ("selective_sync:\n  strategy: deeep\n", "selective_sync.strategy: Input should be 'none', "
                   "'deep', 'shallow', 'staggered' or 'auto', or a valid list (got 'deeep')"),
    "chunks_word.yaml": ("expert_parallel:\n  chunks: x\n", "invalid plan: expert_parallel.chunks: Input should be a "
                         "valid integer, or 'auto' (got 'x')"),
    "chunks.yaml": ("expert_parallel:\n  chunks: 1000000\n", "chunks must be 'auto' or a number from 1 to 64"),
    "calibration.yaml": ("staleness:\n  mode: interweaved\nselective_sync:\n  strategy: auto\n  calibration_steps: "
                         "100000000\n", "selective_sync.calibration_steps: Input should be less than or equal to 1000"),
    "broken.yaml": ("expert_parallel: [1\n", "broken.yaml, line 2, column 1: not valid YAML"),
    "dup.json": ('{"expert_parallel": {"degree": 2, "degree": 3}}', "dup.json is not valid JSON: key(s) 'degree' "
                 "given twice"),
    "list.yaml": ("- 1\n- 2\n", "list.yaml must hold a mapping of plan sections, got list"),
    "profile.yaml": ("schedule:\n  profile: examples/plans/single.yaml\n", "schedule.profile: only schedule.policy "
                     "'overlap', expert_parallel.chunks 'auto' and the shortcut schedule read it"),
    "deep.yaml": ("junk: " + "[" * 20000 + "]" * 20000 + "\n", "deep.yaml: values nested too deeply to read"),
    "alias.yaml": ("base: &b {degree: 2}\nexpert_parallel:\n  <<: *b\n", "alias.yaml, line 3, column 7: not valid "
                   "YAML: alias *b: a plan has no aliases or merge keys"),
    "listkey.yaml": ("expert_parallel:\n  ? [degree, chunks]\n  : 1\n", "key ['degree', 'chunks'] is not a name"),
    # settings nothing would read: refused, not silently run without
    "drop.yaml": ("conditional_comm:\n  drop: threshold\n", "conditional_comm.drop: has no effect because "
                  "conditional communication is off (no interval)"),
    "resident.yaml": ("offload:\n  resident_experts: 2\n", "offload.resident_experts: has no effect because offload "
                      "is not enabled"),
    "patches.yaml": ("pipefusion:\n  patches: 4\n", "pipefusion.patches: has no effect because pipefusion.degree "
                     "is 1"),
    "sync_every.yaml": ("staleness:\n  sync_every: 3\n", "staleness.sync_every: has no effect because "
                        "staleness.mode is 'sync'"),
    "fraction.yaml": ("staleness:\n  mode: interweaved\nselective_sync:\n  strategy: deep\n  fraction: 0.9\n",
                      "selective_sync.fraction: has no effect because strategy is 'deep'"),
}


def _one_error_line(err: str, expected: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("moedit.run: error: "), err
    assert expected in err, err
    assert "Traceback" not in err and "Error:" not in err.replace("moedit.run: error:", ""), err


@pytest.fixture
def refuse(monkeypatch, tmp_path, capsys):
    """`refuse(argv, expected)`: moedit.run (in this process, rank 0) exits 2 with one error line
    saying `expected`, before it builds a model with weights or compiles."""
    monkeypatch.delenv("RANK", raising=False)

    def no_work(*args, **kwargs):
        raise AssertionError("moedit.run started work before refusing its arguments")

    real_load = launch.load_model
    monkeypatch.setattr(launch, "load_model", lambda *a, device="cpu", **k: (
        real_load(*a, device=device, **k) if device == "meta" else no_work()))
    monkeypatch.setattr(launch.moedit, "compile", no_work)

    def check(argv, expected):
        assert launch.main([*argv, "--out", str(tmp_path / "out")]) == 2
        _one_error_line(capsys.readouterr().err, expected)
        assert not (tmp_path / "out").exists(), "a refused run left the --out folder it created"
        assert launch.main([*argv, "--out", str(tmp_path / "new" / "deeper" / "out")]) == 2
        capsys.readouterr()
        assert not (tmp_path / "new").exists(), "a refused run left the parents of --out it created"

    return check


@pytest.mark.parametrize("name", PLANS)
def test_a_malformed_plan_is_one_line_naming_the_file_and_the_field(refuse, tmp_path, name):
    content, expected = PLANS[name]
    (tmp_path / name).write_text(content)
    refuse(["--plan", str(tmp_path / name)], expected)


def test_a_profile_that_is_not_a_timeline_is_named(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    plan = tmp_path / "plan.yaml"
    plan.write_text("schedule:\n  policy: overlap\n  profile: examples/plans/single.yaml\n")
    assert launch.main(["--model", "tiny", "--plan", str(plan), "--out", str(tmp_path / "out")]) == 2
    _one_error_line(capsys.readouterr().err, "schedule.profile examples/plans/single.yaml is not a timeline")


def test_a_binary_plan_file_is_named(refuse, tmp_path):
    (tmp_path / "plan.yaml").write_bytes(bytes(range(128, 256)))
    refuse(["--plan", str(tmp_path / "plan.yaml")], "plan.yaml is not a text file")


def test_a_pipe_or_a_device_as_the_plan_is_refused_without_reading_it(refuse, tmp_path):
    os.mkfifo(tmp_path / "fifo.yaml")  # opening it would wait for a writer forever
    refuse(["--plan", str(tmp_path / "fifo.yaml")], "fifo.yaml is not a regular file (a pipe or a device)")
    refuse(["--plan", "/dev/zero"], "/dev/zero is not a regular file")


@pytest.mark.parametrize("argv,expected", [
    (["--seed", str(2**70)], "--seed 1180591620717411303424: give 0 to 2**63 - 1"),
    (["--seed", "-1"], "--seed -1: give 0 to 2**63 - 1"),
    (["--cfg-scale", "nan"], "--cfg-scale nan: give a finite scale"),
    (["--cfg-scale", "inf"], "--cfg-scale inf: give a finite scale"),
    (["--steps", "100000000"], "--steps 100000000: give 1 to 10000"),
    (["--num-images", "0"], "--num-images 0: give at least 1"),
    (["--num-images", "100000000"], "100000000 images of 16x16 with a 0.01 GiB model need about"),
    (["--model", "tiny", "--set", "depth=abc"], "--set depth=abc: depth: give an integer, got 'abc'"),
    (["--model", "tiny", "--set", "depth=-1"], "--set depth=-1: depth: give a positive number, got -1"),
    (["--model", "tiny", "--set", "qk_norm=3"], "--set qk_norm=3: qk_norm: give true or false, got 3"),
    (["--model", "tiny", "--set", "hidden_size=1000000"], "GiB model need about"),
    (["--model", "tiny", "--set", "depth=[1"], "--set depth=[1: the value is not a YAML number, boolean or string"),
    (["--model", "tiny", "--set", "depth=!!python/object/apply:os.system [true]"], "the value is not a YAML number"),
    (["--model", "tiny", "--set", "hidden_size=6", "--set", "num_heads=2"], "hidden_size (6) must be divisible by 4"),
    (["--model", "tiny", "--set", "depth=100000000"], "depth: at most 512"),
])
def test_an_argument_out_of_range_is_one_line_naming_it(refuse, argv, expected):
    refuse(["--plan", "examples/plans/single.yaml", *argv], expected)


def test_outputs_are_whole_or_absent_and_a_failed_run_leaves_no_earlier_files(tmp_path, capsys, monkeypatch):
    """A refused command (a typo in the plan) leaves the earlier run's files as they were; a run
    that starts removes them, and a write that fails (a full disk) ends it with one line,
    nothing partial left under a final name or beside it."""
    monkeypatch.delenv("RANK", raising=False)
    out = tmp_path / "out"
    argv = ["--model", "tiny", "--plan", "examples/plans/single.yaml", "--out", str(out), "--steps", "2",
            "--num-images", "2"]
    assert launch.main(argv) == 0
    written = {p.name: p.read_bytes() for p in out.iterdir()}
    assert set(written) == {"samples.png", "explain.txt", "images.pt", "timings.json"}
    typo = tmp_path / "typo.yaml"
    typo.write_text("expert_paralel:\n  degree: 1\n")
    capsys.readouterr()
    assert launch.main([*argv[:3], str(typo), *argv[4:]]) == 2  # a refused command touches nothing
    assert "expert_paralel: unknown key" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written

    def full_disk(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(launch.torch, "save", full_disk)
    capsys.readouterr()
    assert launch.main(argv) == 1
    err = capsys.readouterr().err
    assert "moedit.run: error: could not write the outputs" in err and "No space left" in err, err
    assert "Traceback" not in err
    assert {p.name for p in out.iterdir()} == {"samples.png", "explain.txt"}  # written before images.pt; this run's


def _workers(marker: str) -> list[int]:
    """Pids of moedit.run workers whose command line holds `marker`."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True).stdout  # -ww: whole lines
    return [int(line.split()[0]) for line in ps.splitlines() if "moedit.run" in line and marker in line
            and "torch.distributed.run" not in line]


@pytest.mark.skipif(sys.platform != "linux", reason="the launcher-death signal is Linux's prctl")
def test_no_worker_outlives_a_killed_torchrun(tmp_path):
    out = str(tmp_path / "orphans")
    launcher = subprocess.Popen(TORCHRUN + ["--nproc_per_node=2", "-m", "moedit.run", "--model", "tiny", "--plan",
                                            "examples/plans/sync_ep.yaml", "--out", out, "--steps", "10000"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while len(_workers(out)) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(_workers(out)) == 2, "the workers did not start"
        time.sleep(3)  # into sampling
        launcher.send_signal(signal.SIGKILL)
        launcher.wait()
        deadline = time.monotonic() + 30
        while _workers(out) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _workers(out), "workers outlived their launcher"
    finally:
        for pid in _workers(out):
            os.kill(pid, signal.SIGKILL)


STARTUP_STALL = """
import os, sys, time
if os.environ["RANK"] == "1":
    time.sleep(60)  # never reaches the rendezvous
from moedit.runtime import launch
sys.exit(launch.main(["--model", "tiny", "--plan", {plan!r}, "--out", {out!r}]))
"""


def test_a_rank_that_never_joins_is_named_within_the_timeout(tmp_path):
    (tmp_path / "plan.yaml").write_text("expert_parallel:\n  degree: 2\nruntime:\n  timeout_s: 5\n")
    script = tmp_path / "stall.py"
    script.write_text(STARTUP_STALL.format(plan=str(tmp_path / "plan.yaml"), out=str(tmp_path / "out")))
    start = time.monotonic()
    proc = subprocess.run(TORCHRUN + ["--nproc_per_node=2", str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and time.monotonic() - start < 45
    assert ("moedit.run: error: rank 0: the process group of 2 ranks did not form within runtime.timeout_s = 5 s: "
            "rank 1 did not join") in proc.stderr, proc.stderr[-3000:]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU, run benchmarks/gpu_check.py itself")
def test_the_gpu_check_runs_its_cpu_side_and_skips_the_cuda_checks():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in proc.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| check")}
    assert rows == {"kernels": "SKIP", "compiled step": "PASS", "offload": "PASS", "copy stream": "SKIP",
                    "nccl timeline": "SKIP"}, proc.stdout
