"""Montage PNGs: the mask is outlined over the anatomy, in the label's colour."""
import numpy as np
import pytest

from gem3d.montage import LABEL_COLOURS, montage, outline
from gem3d.volume import Geometry, Volume


def test_outline_keeps_only_region_boundaries():
    labels = np.zeros((7, 7), int)
    labels[1:6, 1:6] = 2
    labels[3, 3] = 1
    edge = outline(labels)
    assert edge[1, 1] == edge[5, 3] == 2 and edge[2, 3] == 2          # the square's rim, and around label 1
    assert edge[3, 3] == 1 and edge[0, 0] == edge[2, 2] == 0            # background and interior: nothing
    assert np.count_nonzero(edge == 2) == 16 + 4


def test_contours_are_drawn_over_the_anatomy():
    z, y, x = np.mgrid[:16, :32, :32]
    anatomy = Volume((x * 8).astype(np.float32), Geometry((1.0, 1.0, 1.0)))   # a grey ramp
    mask = np.zeros((16, 32, 32), np.uint8)
    mask[4:12, 8:24, 8:24] = 4
    plain = np.asarray(montage([("image", anatomy, "image")], panel=64))
    drawn = np.asarray(montage([("image", anatomy, "image")], panel=64,
                               contours=Volume(mask, anatomy.geometry)))
    changed = np.any(drawn != plain, axis=2)
    assert changed.sum() > 50                                              # outlines in three planes
    assert np.all(drawn[changed] == LABEL_COLOURS[4])                      # only outline pixels, in colour
    inside = drawn[18 + 32, 120 + 32]                                      # axial panel centre: anatomy
    assert inside[0] == inside[1] == inside[2] and tuple(inside) != LABEL_COLOURS[4]
    with pytest.raises(ValueError, match="contours"):
        montage([("image", anatomy, "image")], contours=Volume(mask[:-1], anatomy.geometry))
