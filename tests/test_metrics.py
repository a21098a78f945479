"""Quality metrics (moedit.metrics) and the shipped digits model and classifier."""

import importlib
import math
import os

import pytest
import torch

from moedit.models import metrics
from moedit.models import pretrained
from moedit.runtime.sampling import initial_noise, rectified_flow_sample
from moedit.models.pretrained import PRETRAINED, SAMPLING

# `moedit.models.pretrained` is also the name of the function that package exports.
pretrained_module = importlib.import_module("moedit.models.pretrained")


def test_identical_batches_have_zero_distance_and_infinite_psnr():
    feats = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    assert metrics.psnr(images, images) == math.inf
    assert metrics.relative_l2(images, images) == 0.0


def test_frechet_distance_of_singular_features_is_finite_and_zero_for_identical_sets():
    # ReLU features with dead units have singular covariances (where sqrtm-based FID warns).
    feats = torch.relu(torch.randn(100, 32, generator=torch.Generator().manual_seed(1)))
    feats[:, :12] = 0.0
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)
    assert math.isfinite(metrics.frechet_distance(feats, feats.flip(0) * 1.5))


def test_frechet_distance_grows_with_the_shift():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 8, generator=gen), torch.randn(500, 8, generator=gen)
    near, far = metrics.frechet_distance(a, b + 0.1), metrics.frechet_distance(a, b + 1.0)
    assert near < far
    assert far == pytest.approx(8 * 1.0, rel=0.2)  # the mean term dominates: ||(1,...,1)||^2 = 8


def test_noised_digits_are_farther_than_mildly_perturbed_ones():
    real, _ = metrics.real_digits("test")
    gen = torch.Generator().manual_seed(0)
    mild = real + 0.02 * torch.randn(real.shape, generator=gen)
    noised = torch.roll(real, shifts=3, dims=3) + 0.5 * torch.randn(real.shape, generator=gen)
    assert metrics.fd_digits(mild) < metrics.fd_digits(noised)


def test_psnr_and_relative_l2_closed_forms():
    a = torch.zeros(2, 1, 4, 4)
    assert metrics.psnr(a + 0.2, a) == pytest.approx(10 * math.log10(2.0**2 / 0.2**2))
    assert metrics.psnr(a + 0.1, a, data_range=1.0) == pytest.approx(20.0)
    b = torch.randn(3, 5)
    assert metrics.relative_l2(1.1 * b, b) == pytest.approx(0.1)


def test_summarize_reports_spread():
    assert metrics.summarize([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert metrics.summarize([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}


def test_shipped_classifier_is_accurate_on_held_out_digits():
    images, labels = metrics.real_digits("test")
    assert images.shape == (360, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    assert metrics.accuracy(images, labels) >= 0.97


def test_real_digits_are_closer_than_noise():
    train, _ = metrics.real_digits("train")
    noise = torch.rand(360, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert metrics.fd_digits(train[:360]) < metrics.fd_digits(noise) / 10


@pytest.mark.parametrize("name", ["digits", "digits-scmoe"])
def test_shipped_checkpoint_is_float16_and_matches_the_model(name):
    state = torch.load(pretrained_module.checkpoint_path(name), weights_only=True)
    model = pretrained(name, load=False)
    assert state.keys() == model.state_dict().keys()
    assert {v.dtype for v in state.values()} == {torch.float16}
    assert os.path.getsize(pretrained_module.checkpoint_path(name)) <= 4 * 2**20


@pytest.mark.parametrize("name", ["digits", "digits-scmoe"])
def test_pretrained_digits_samples_are_recognisable(name):
    model = pretrained(name)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    labels = torch.arange(10)
    images = rectified_flow_sample(model, initial_noise(10, 1, 16, seed=1), labels, steps=10,
                                   cfg_scale=SAMPLING[name]["cfg_scale"], null_class=model.null_class)
    assert metrics.accuracy(images, labels) >= 0.7


def test_unknown_pretrained_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"no pretrained model 'nope'; available: \['digits', 'digits-scmoe'\]"):
        pretrained("nope")
    assert "digits" in PRETRAINED


def test_missing_checkpoint_says_how_to_create_it(monkeypatch, tmp_path):
    monkeypatch.setattr(pretrained_module, "CHECKPOINTS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"python examples/train_digits\.py"):
        pretrained("digits")
    with pytest.raises(FileNotFoundError, match=r"python examples/train_digits\.py"):
        metrics.classifier()
