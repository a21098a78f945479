"""The layout keeps the architecture: who may import whom, checked from the source.

    compiler/  (moedit)          the core: plan, step kinds, graph vocabulary, tracer, pipeline, verifier
    planner/   (moedit.planner)  cost model, calibration, simulator, planner; read compiled programs, and
                                 nothing outside the entry points imports them
    passes/    (moedit.passes)   graph passes; read the core and the runtime's ops, never the models
    runtime/   (moedit.runtime)  what programs call and who runs them; knows no pass, no capture and no
                                 model: it runs the `RankProgram` the compiler hands it (moedit/program.py)
    models/    (moedit.models)   reference models; register their adapters through the core's API

Entry points (the CLI, the torchrun entry) may use everything. No module imports itself back through
others, counting imports made inside functions too.
"""

import ast
import pathlib
import tomllib

import networkx as nx
import pytest

ROOT = pathlib.Path(__file__).parent.parent
ENTRY_POINTS = {"compiler/cli.py", "compiler/run.py", "runtime/launch.py"}
# What the runtime may read of the compiler: the artifact it runs (a RankProgram) and what that is
# made of -- the plan, step kinds, call signatures, the graph's vocabulary -- and the verifier (it
# checks the ranks' collective order before the first exchange). Never a pass, the capture or
# tracer, the pass pipeline, or the compile driver.
CORE = {"moedit.program", "moedit.plan", "moedit.steps", "moedit.signature", "moedit.graph", "moedit.verify"}

RULES = {  # folder -> (allowed predicate over an imported module name, what the rule says)
    "compiler": (lambda m: not m.startswith(("moedit.models", "moedit.planner")),
                 "the core does not import the reference models or the planner's room"),
    "planner": (lambda m: not m.startswith("moedit.models"), "the planner reads compiled programs, not models"),
    "passes": (lambda m: not m.startswith(("moedit.models", "moedit.planner")) and m not in ("moedit.compiled", "moedit.cli"),
               "passes see the core and the runtime's ops, not models, the planner or the compile driver"),
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


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package, by import name, through pyproject.toml's package-dir mapping."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {}
    for package, folder in setuptools["package-dir"].items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [*path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _edges(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """The project's modules `name` imports, anywhere in its source (a deferred import is still a
    dependency). `from a import b` counts a.b when b is a module, else a."""
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {m for m in found if m in modules and m != name}


def test_no_import_cycle():
    modules = _modules()
    assert {"moedit", "moedit.planner.search", "moedit.runtime.state", "moedit.models.dit_moe"} <= set(modules)
    graph = nx.DiGraph((name, target) for name, path in modules.items() for target in _edges(name, path, modules))
    assert graph.has_edge("moedit.runtime.ops", "moedit.runtime.state")  # the walk sees relative imports
    cycles = sorted(nx.simple_cycles(graph), key=len)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c + c[:1]) for c in cycles[:5])
