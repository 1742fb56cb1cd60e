"""Preview PNGs: rows of slices (ground truth, mask, model output) side by side, so a
training run can be judged by eye while it runs. Pillow only."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from gem3d.montage import to_colour, to_grey

TITLE = 64  # px of row titles on the left


def _tile(slices: np.ndarray, kind: str) -> np.ndarray:
    """(n, S, S) -> (S, n*S, 3) uint8; images are in [-1, 1], labels coloured."""
    rgb = to_colour(slices) if kind == "label" else np.repeat(to_grey(slices, (-1.0, 1.0))[..., None], 3, axis=-1)
    return np.concatenate(list(rgb), axis=1)


def save_rows(rows: Sequence[Tuple[str, np.ndarray, str]], path: Path, zoom: int = 2) -> Path:
    """rows: (title, (n, S, S) array, "image" | "label"), all the same shape."""
    tiles = [_tile(np.asarray(array), kind) for _, array, kind in rows]
    height, width = tiles[0].shape[:2]
    sheet = Image.new("RGB", (TITLE + width * zoom, height * zoom * len(rows)))
    draw = ImageDraw.Draw(sheet)
    for r, ((title, _, _), tile) in enumerate(zip(rows, tiles)):
        y = r * height * zoom
        sheet.paste(Image.fromarray(tile).resize((width * zoom, height * zoom), Image.NEAREST), (TITLE, y))
        draw.text((4, y + height * zoom // 2 - 6), title, fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path
