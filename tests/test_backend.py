"""The process group in use decides the backend, and the backend decides the kernels: a gloo
world never selects NCCL or the Triton kernels, even on a machine with CUDA (patched here)."""

import logging

import pytest
import torch
import torch.distributed as dist

import moedit
from _models import tiny_model
from moedit.runtime.comm import pick_backend


@pytest.fixture
def gloo_world():
    """A one-rank gloo default group (the one an earlier test's runtime left, if any)."""
    if dist.is_initialized():
        assert dist.get_backend() == "gloo", "an earlier test left a non-gloo default group"
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture
def no_group():
    if dist.is_initialized():
        pytest.skip("an earlier test left a default process group in this process")


@pytest.fixture
def cuda(monkeypatch):
    """This machine claims CUDA: what 'auto' would pick on a GPU node."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def test_a_gloo_world_never_selects_nccl(gloo_world, cuda):
    assert pick_backend("auto") == "gloo"
    assert pick_backend("gloo") == "gloo"
    with pytest.raises(ValueError, match="runtime.backend is 'nccl' but the default process group already exists "
                                         "with gloo"):
        pick_backend("nccl")


def test_without_a_group_auto_is_nccl_on_cuda(no_group, cuda):
    assert pick_backend("auto") == "nccl"


def test_a_gloo_plan_runs_the_torch_kernels_on_cuda_and_says_why(cuda, caplog):
    with caplog.at_level(logging.WARNING, logger="moedit.compiled"):
        compiled = moedit.compile(tiny_model(), moedit.Plan(runtime={"backend": "gloo"}))
    assert compiled.kernels == "torch"
    assert "kernels: auto chose the torch kernels although CUDA is available" in caplog.text
    assert "runtime.backend 'gloo' runs on gloo" in caplog.text


def test_auto_kernels_follow_an_existing_gloo_group(gloo_world, cuda, caplog):
    with caplog.at_level(logging.WARNING, logger="moedit.compiled"):
        assert moedit.compile(tiny_model(), moedit.Plan()).kernels == "torch"
    assert "runtime.backend 'auto' runs on gloo" in caplog.text


def test_auto_without_triton_on_cuda_says_so(no_group, cuda, monkeypatch, caplog):
    monkeypatch.setattr("moedit.runtime.kernels.triton_installed", lambda: False)
    with caplog.at_level(logging.WARNING, logger="moedit.compiled"):
        assert moedit.compile(tiny_model(), moedit.Plan()).kernels == "torch"
    assert "Triton is not installed" in caplog.text


def test_auto_on_a_cpu_picks_torch_quietly(no_group, caplog):
    with caplog.at_level(logging.WARNING, logger="moedit.compiled"):
        assert moedit.compile(tiny_model(), moedit.Plan()).kernels == "torch"
    assert "kernels" not in caplog.text


@pytest.mark.parametrize("on_cuda", [True, False])
def test_triton_kernels_under_gloo_are_refused(monkeypatch, on_cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: on_cuda)
    monkeypatch.setattr("moedit.runtime.kernels.triton_installed", lambda: True)
    with pytest.raises(moedit.PlanError, match="use runtime.backend: nccl, or kernels: torch"):
        moedit.compile(tiny_model(), moedit.Plan(kernels="triton", runtime={"backend": "gloo"}))


def test_auto_picks_triton_for_an_nccl_plan_on_cuda(no_group, cuda, monkeypatch):
    monkeypatch.setattr("moedit.runtime.kernels.triton_installed", lambda: True)
    assert moedit.compile(tiny_model(), moedit.Plan(runtime={"backend": "nccl"})).kernels == "triton"
    assert moedit.compile(tiny_model(), moedit.Plan()).kernels == "triton"
