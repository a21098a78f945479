"""The layout keeps the architecture: who may import whom, checked from the source.

    compiler/  (moedit)          the core: plan, step kinds, graph vocabulary, tracer, pipeline, verifier
    passes/    (moedit.passes)   graph passes; read the core and the runtime's ops, never the models
    runtime/   (moedit.runtime)  what programs call and who runs them; knows no pass, no capture and no
                                 model: it runs the `RankProgram` the compiler hands it (moedit/program.py)
    models/    (moedit.models)   reference models; register their adapters through the core's API

Entry points (the CLI, the torchrun entry) may use everything.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent
ENTRY_POINTS = {"compiler/cli.py", "compiler/run.py", "runtime/launch.py"}
# What the runtime may read of the compiler: the artifact it runs (a RankProgram) and what that is
# made of -- the plan, step kinds, call signatures, the graph's vocabulary -- and the verifier (it
# checks the ranks' collective order before the first exchange). Never a pass, the capture or
# tracer, the pass pipeline, or the compile driver.
CORE = {"moedit.program", "moedit.plan", "moedit.steps", "moedit.signature", "moedit.graph", "moedit.verify"}

RULES = {  # folder -> (allowed predicate over an imported module name, what the rule says)
    "compiler": (lambda m: not m.startswith("moedit.models"), "the core does not import the reference models"),
    "passes": (lambda m: not m.startswith("moedit.models") and m not in ("moedit.compiled", "moedit.cli"),
               "passes see the core and the runtime's ops, not models or the compile driver"),
    "runtime": (lambda m: m.startswith("moedit.runtime") or m in CORE,
                "the runtime knows no pass, no capture and no model; of the compiler only the RankProgram it runs "
                "and what that holds (plan, step kinds, signature, graph), and the verifier"),
    "models": (lambda m: m in ("moedit", "moedit.adapters") or m.startswith("moedit.models"),
               "models reach moedit only through the adapter API"),
}


def _imports(path: pathlib.Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and node.module.startswith("moedit"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("moedit")}
    return found


@pytest.mark.parametrize("folder", sorted(RULES))
def test_imports_follow_the_layers(folder):
    allowed, rule = RULES[folder]
    for path in sorted((ROOT / folder).glob("*.py")):
        if str(path.relative_to(ROOT)) in ENTRY_POINTS:
            continue
        bad = sorted(m for m in _imports(path) if not allowed(m))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: {rule}"


def test_the_runtime_runs_a_rank_program_and_imports_no_pass_and_no_capture():
    """The compiler -> runtime artifact: nothing in the runtime's sources imports a pass, the capture,
    the tracer or the pass pipeline, and the modules it may import import none of those either."""
    banned = ("moedit.passes", "moedit.capture", "moedit.tracer", "moedit.pipeline", "moedit.compiled")
    for path in sorted((ROOT / "runtime").rglob("*.py")):
        if str(path.relative_to(ROOT)) in ENTRY_POINTS:
            continue
        bad = sorted(m for m in _imports(path) if m.startswith(banned))
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    for module in sorted(CORE):
        path = ROOT / "compiler" / f"{module.split('.')[-1]}.py"
        bad = sorted(m for m in _imports(path) | _relative_imports(path) if m.startswith(banned))
        assert not bad, f"{path.relative_to(ROOT)}, which the runtime reads, imports {bad}"


def _relative_imports(path: pathlib.Path) -> set[str]:
    """`from .x import y` in compiler/ as the absolute module name moedit.x."""
    return {f"moedit.{node.module}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module}
