"""Writing sampled images to disk."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B,C,S,S] in [-1, 1] -> [B,S,S,C'] uint8, C' = 1 or 3 (extra latent channels are dropped)."""
    images = images.detach().float().cpu()[:, :3]
    if images.shape[1] == 2:
        images = images[:, :1]
    pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def grid(images: torch.Tensor, columns: int = 10, pad: int = 1, scale: int = 1) -> Image.Image:
    """Tile a batch into one image, `columns` per row, `pad` pixels of black between tiles."""
    pixels = to_uint8(images)
    count, side, _, channels = pixels.shape
    columns = max(1, min(columns, count))
    rows = -(-count // columns)
    canvas = np.zeros((rows * (side + pad) + pad, columns * (side + pad) + pad, channels), np.uint8)
    for i, tile in enumerate(pixels):
        r, c = divmod(i, columns)
        top, left = pad + r * (side + pad), pad + c * (side + pad)
        canvas[top:top + side, left:left + side] = tile
    image = Image.fromarray(canvas[..., 0] if channels == 1 else canvas)
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST) if scale > 1 else image


def labelled_rows(image: Image.Image, labels: list[str], pad: int = 4) -> Image.Image:
    """`image` (a grid of len(labels) equal rows) with each row's label in white on a black
    strip to its left, in PIL's default font, centred on the row."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(image)
    width = int(max(measure.textlength(label, font=font) for label in labels)) + 2 * pad
    canvas = Image.new(image.mode, (image.width + width, image.height))
    canvas.paste(image, (width, 0))
    draw, row_height, text_height = ImageDraw.Draw(canvas), image.height / len(labels), font.getbbox("Ag")[3]
    for i, label in enumerate(labels):
        draw.text((pad, int((i + 0.5) * row_height - text_height / 2)), label, fill="white", font=font)
    return canvas


def captioned(image: Image.Image, caption: str, pad: int = 4) -> Image.Image:
    """`image` above a black strip holding `caption` in white, in PIL's default font, wrapped
    at spaces to the image's width."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(image)
    lines = [""]
    for word in caption.split():
        joined = f"{lines[-1]} {word}".strip()
        if lines[-1] and measure.textlength(joined, font=font) > image.width - 2 * pad:
            lines.append(word)
        else:
            lines[-1] = joined
    line_height = font.getbbox("Ag")[3] + 2
    canvas = Image.new(image.mode, (image.width, image.height + len(lines) * line_height + 2 * pad))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((pad, image.height + pad + i * line_height), line, fill="white", font=font)
    return canvas


def save_grid(images: torch.Tensor, path: str | os.PathLike, columns: int = 10, scale: int = 1,
              caption: str | None = None, row_labels: list[str] | None = None) -> None:
    """Write `grid(images, columns, scale=scale)` to `path`, with `row_labels` (one per row of
    the grid) at the left and `caption` (what made the images: labels, plan, steps, ...) in a
    strip under it if given."""
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    image = grid(images, columns, scale=scale)
    if row_labels:
        image = labelled_rows(image, row_labels)
    (captioned(image, caption) if caption else image).save(path)
