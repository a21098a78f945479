"""What README.md shows a newcomer runs as shown, docs/plans.md's plan reference is the generated one,
and every relative link in README.md and docs/ reaches an existing file and heading."""

import pathlib
import re
import shlex
import subprocess
import sys

import pytest

from moedit.plan import reference_table

ROOT = pathlib.Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
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
    plans = (ROOT / "docs" / "plans.md").read_text()
    begin, end = "<!-- plan-schema:begin -->\n", "\n<!-- plan-schema:end -->"
    assert begin in plans and end in plans, "docs/plans.md lacks the plan-schema markers"
    table = plans.split(begin)[1].split(end)[0]
    assert table == reference_table(), ("docs/plans.md's plan reference differs from the plan's fields; regenerate it: "
                                        "paste the output of `moedit plan-schema` between the plan-schema markers")


def test_readme_is_a_front_page_that_links_every_docs_page():
    assert len(README.splitlines()) <= 300, "README.md should stay a front page; move detail to docs/"
    assert len(DOCS) >= 5, DOCS
    linked = {(ROOT / target).resolve() for target, _ in _links(README)}
    assert not [page.name for page in DOCS if page.resolve() not in linked], "README.md must link every docs page"


_FENCE = re.compile(r"^```.*?^```", re.S | re.M)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target) and ![alt](target)


def _prose(markdown: str) -> str:
    """The Markdown without fenced code blocks and inline code, where brackets are not links."""
    return re.sub(r"`[^`]*`", "", _FENCE.sub("", markdown))  # inline code may wrap a line


def _links(markdown: str) -> list[tuple[str, str]]:
    """(path, anchor) of every relative link; same-page links have an empty path."""
    found = []
    for target in _LINK.findall(_prose(markdown)):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        found.append((path, anchor))
    return found


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, backticks and punctuation dropped, spaces to hyphens."""
    text = heading.replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(markdown: str) -> set[str]:
    anchors, seen = set(), {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", _FENCE.sub("", markdown), re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")  # GitHub numbers repeats
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_slug_is_githubs():
    assert _slug("Fewer bytes on the wire: compressed expert exchanges") == "fewer-bytes-on-the-wire-compressed-expert-exchanges"
    assert _slug("diffusers pipelines: `moedit.parallelize(pipe, plan)`") == "diffusers-pipelines-moeditparallelizepipe-plan"
    assert _slug("Flux beside diffusers' context parallelism") == "flux-beside-diffusers-context-parallelism"


@pytest.mark.parametrize("page", [ROOT / "README.md", *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_link_resolves(page):
    broken = []
    for path, anchor in _links(page.read_text()):
        target = (page.parent / path).resolve() if path else page
        if not target.exists():
            broken.append(f"{path}: no such file")
        elif anchor and anchor not in _anchors(target.read_text()):
            broken.append(f"{path}#{anchor}: no such heading in {target.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_the_readme_adapter_example_is_the_one_the_models_page_explains():
    block = next(b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "class MyMoEAdapter" in b)
    assert f"```python\n{block}```" in (ROOT / "docs" / "models.md").read_text()
