import pathlib

import pytest
import torch

from _dist import run_ranks

# The models here are tiny: one intra-op thread is faster than two fighting over the
# cores with the spawned ranks (a 2-thread parent ran the reference checks ~30x slower).
torch.set_num_threads(1)

GOLDEN = pathlib.Path(__file__).parent / "golden"


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", help="rewrite tests/golden/* from the current code")


@pytest.fixture
def spawn():
    """`spawn(world, fn, *args)`: run `fn(rank, world, *args)` on `world` gloo ranks; results in rank order."""
    return run_ranks


@pytest.fixture
def golden(request):
    """`golden(name, text)`: compare `text` with tests/golden/<name>, or rewrite it with --update-golden."""

    def check(name: str, text: str) -> None:
        path = GOLDEN / name
        if request.config.getoption("--update-golden"):
            path.parent.mkdir(exist_ok=True)
            path.write_text(text)
            return
        assert path.exists(), f"no golden file {path}; run pytest --update-golden once and review it"
        assert text == path.read_text(), f"{name} changed; if intended, run pytest --update-golden and review the diff"

    return check
