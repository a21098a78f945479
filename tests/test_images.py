"""Sample grids on disk: the plain grid, and the caption strip moedit.run writes under it."""

import numpy as np
import torch
from PIL import Image

from moedit.models.images import grid, save_grid


def _images(channels: int = 1) -> torch.Tensor:
    return torch.rand(12, channels, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_save_grid_without_a_caption_writes_the_plain_grid(tmp_path):
    save_grid(_images(), tmp_path / "plain.png", columns=5, scale=2)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "plain.png")),
                                  np.asarray(grid(_images(), columns=5, scale=2)))


def test_a_caption_adds_a_strip_under_the_unchanged_grid(tmp_path):
    caption = "digits, sync_ep.yaml on 2 rank(s), 25 steps, cfg 1.5, seed 0; labels " + " ".join(map(str, range(12)))
    for channels in (1, 3):
        plain = np.asarray(grid(_images(channels), columns=5, scale=2))
        save_grid(_images(channels), tmp_path / "captioned.png", columns=5, scale=2, caption=caption)
        captioned = np.asarray(Image.open(tmp_path / "captioned.png"))
        assert captioned.shape[0] > plain.shape[0] and captioned.shape[1:] == plain.shape[1:]
        np.testing.assert_array_equal(captioned[: plain.shape[0]], plain)
        assert captioned[plain.shape[0]:].max() > 0  # the text is drawn
