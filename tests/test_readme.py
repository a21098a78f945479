"""What README.md shows a newcomer runs as shown, and its plan reference is the generated one."""

import pathlib
import re
import shlex
import subprocess
import sys

from moedit.plan import reference_table

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]  # --standalone: a free port


def _first_block(language: str) -> str:
    match = re.search(rf"```{language}\n(.*?)```", README, re.S)
    assert match, f"README.md has no ```{language} block"
    return match.group(1)


def _run_in(tmp_path, cmd):
    """Run `cmd` from a scratch folder that sees the repository's examples/, so that the
    README's relative paths work and out/ lands in the scratch folder."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240)


def test_readme_first_command_samples_on_two_ranks(tmp_path):
    first_line = _first_block("bash").splitlines()[0]
    torchrun = next(part for part in first_line.split("&&") if part.strip().startswith("torchrun"))
    args = shlex.split(torchrun)[1:]
    assert "--plan" in args and "--out" in args, torchrun
    proc = _run_in(tmp_path, TORCHRUN + args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / args[args.index("--out") + 1]
    assert (out / "samples.png").exists() and (out / "timings.json").exists()


def test_readme_python_snippet_runs_under_torchrun_and_exits_cleanly(tmp_path):
    # Regression: without closing the runtime, rank 1 ended with SIGABRT ("terminate called
    # without an active exception") after the snippet had printed its results.
    (tmp_path / "snippet.py").write_text(_first_block("python"))
    proc = _run_in(tmp_path, TORCHRUN + ["--nproc_per_node=2", "snippet.py"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "terminate called" not in proc.stderr
    assert "step kinds of a 25-step sample" in proc.stdout
    assert (tmp_path / "out" / "graphs" / "rank1.py").exists()


def test_readme_plan_reference_is_the_generated_table():
    begin, end = "<!-- plan-schema:begin -->\n", "\n<!-- plan-schema:end -->"
    assert begin in README and end in README, "README.md lacks the plan-schema markers"
    table = README.split(begin)[1].split(end)[0]
    assert table == reference_table(), ("README.md's plan reference differs from the plan's fields; regenerate it: "
                                        "paste the output of `moedit plan-schema` between the plan-schema markers")
