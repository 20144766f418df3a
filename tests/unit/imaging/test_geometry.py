"""The one slice-normal function, as the loader and the ingest rules use it."""

from __future__ import annotations

import math

import numpy as np
import pytest

from service.imaging.geometry import slice_normal
from service.ingest.rules import _normal


@pytest.mark.parametrize("iop,expected", [
    ((1, 0, 0, 0, 1, 0), (0, 0, 1)),  # axial
    ((0, 1, 0, 0, 0, -1), (-1, 0, 0)),  # sagittal
    ((1, 0, 0, 0, 0, -1), (0, 1, 0)),  # coronal
])
def test_normal_is_row_cross_column(iop: tuple[float, ...], expected: tuple[float, ...]) -> None:
    normal = slice_normal(iop)
    assert normal is not None
    assert np.allclose(normal, expected)
    assert np.allclose(_normal(iop), expected)


def test_rounded_cosines_give_a_unit_normal_both_ways() -> None:
    iop = (0.99999, 0.00001, 0.0, 0.0, 0.98481, -0.17365)  # 10 degree tilt, rounded
    normal = slice_normal(iop)
    assert normal is not None and math.isclose(float(np.linalg.norm(normal)), 1.0)
    assert np.allclose(_normal(iop), normal)


def test_degenerate_orientation() -> None:
    assert slice_normal((0, 0, 0, 0, 1, 0)) is None
    assert slice_normal((1, 0, 0, 1, 0, 0)) is None
    assert _normal((0, 0, 0, 0, 1, 0)) == (0.0, 0.0, 0.0)  # refused by the rules as mixed
