"""Every benchmark writes under benchmarks/results/ only with --save and states its run time.

The scripts are imported and asked for --help only: none of them runs here."""

import importlib.util
import pathlib
import sys

import pytest

BENCHMARKS = sorted((pathlib.Path(__file__).parent.parent / "benchmarks").glob("[!_]*.py"))


@pytest.mark.parametrize("path", BENCHMARKS, ids=lambda path: path.name)
def test_benchmark_offers_save_and_states_its_run_time(path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(path.parent))  # for `from _launch import ...`, as when run as a script
    spec = importlib.util.spec_from_file_location(f"benchmark_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [path.name, "--help"])
    with pytest.raises(SystemExit) as exit:
        module.main()
    assert exit.value.code == 0
    assert "--save" in capsys.readouterr().out
    assert "2-core CPU" in module.RUN_TIME or "H100" in module.RUN_TIME, module.RUN_TIME
