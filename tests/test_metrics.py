import math

import pytest
import torch

from moedit import metrics
from moedit.models import digits_dataset, initial_noise, pretrained, rectified_flow_sample
from moedit.models.pretrained import SAMPLING


def test_identical_batches_have_zero_distance_and_infinite_psnr():
    feats = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    assert metrics.psnr(images, images) == math.inf
    assert metrics.relative_l2(images, images) == 0.0


def test_frechet_distance_grows_with_the_shift():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(500, 8, generator=gen), torch.randn(500, 8, generator=gen)
    near, far = metrics.frechet_distance(a, b + 0.1), metrics.frechet_distance(a, b + 1.0)
    assert near < far
    assert far == pytest.approx(8 * 1.0, rel=0.2)  # the mean term dominates: ||(1,...,1)||^2 = 8


def test_psnr_closed_form():
    a = torch.zeros(2, 1, 4, 4)
    assert metrics.psnr(a + 0.2, a) == pytest.approx(10 * math.log10(4 / 0.04))


def test_summarize_reports_spread():
    assert metrics.summarize([1.0, 2.0, 3.0]) == {"mean": 2.0, "std": 1.0, "n": 3}


def test_shipped_classifier_is_accurate_on_held_out_digits():
    images, labels = digits_dataset("test")
    assert metrics.accuracy(images, labels) >= 0.97


def test_real_digits_are_closer_than_noise():
    train, _ = digits_dataset("train")
    noise = torch.rand(360, 1, 16, 16) * 2 - 1
    assert metrics.fd_digits(train[:360]) < metrics.fd_digits(noise) / 10


def test_pretrained_digits_samples_are_recognisable():
    model = pretrained("digits")
    labels = torch.arange(10)
    settings = SAMPLING["digits"]
    with torch.no_grad():
        images = rectified_flow_sample(model, initial_noise(10, 1, 16, seed=1), labels, steps=settings["steps"],
                                       cfg_scale=settings["cfg_scale"], null_class=10)
    assert metrics.accuracy(images, labels) >= 0.7


def test_unknown_pretrained_name():
    with pytest.raises(ValueError, match=r"no pretrained model 'nope'; available: \['digits'\]"):
        pretrained("nope")
