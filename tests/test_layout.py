"""The layout keeps the architecture: who may import whom, checked from the source.

    compiler/  (moedit)          the core: plan, step kinds, graph vocabulary, tracer, pipeline, verifier
    passes/    (moedit.passes)   graph passes; read the core and the runtime's ops, never the models
    runtime/   (moedit.runtime)  what programs call and who runs them; knows no pass and no model
    models/    (moedit.models)   reference models; register their adapters through the core's API

Entry points (the CLI, the torchrun entry) may use everything.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).parent.parent
ENTRY_POINTS = {"compiler/cli.py", "compiler/run.py", "runtime/launch.py"}
# What the runtime may read of the compiler: the plan, step kinds, the graph's vocabulary and
# the verifier (it checks the ranks' collective order before the first exchange).
CORE = {"moedit", "moedit.plan", "moedit.steps", "moedit.graph", "moedit.verify"}

RULES = {  # folder -> (allowed predicate over an imported module name, what the rule says)
    "compiler": (lambda m: not m.startswith("moedit.models"), "the core does not import the reference models"),
    "passes": (lambda m: not m.startswith("moedit.models") and m not in ("moedit.compiled", "moedit.cli"),
               "passes see the core and the runtime's ops, not models or the compile driver"),
    "runtime": (lambda m: m.startswith("moedit.runtime") or m in CORE,
                "the runtime knows no pass and no model; of the compiler only the plan, step kinds, graph, verifier"),
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
