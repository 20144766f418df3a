"""Small phantoms shared by the synthetic tests (cached: generating is the slow part)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import pytest

from harness.dcmtk import dcmtk
from service.synthetic import Phantom, PhantomOptions, generate_phantom

SMALL = PhantomOptions(seed=1, matrix=160, pixel_spacing=0.5, n_slices=64)
"""80 mm FOV around C4, 40 mm of slices: the cervical bodies C3-C6 at 0.5 mm."""


_CACHE: dict[str, Phantom] = {}


def small_phantom(**changes: object) -> Phantom:
    """A cached small phantom; ``changes`` override fields of ``SMALL``."""
    options = replace(SMALL, **changes)  # type: ignore[arg-type]
    key = repr(options)
    if key not in _CACHE:
        _CACHE[key] = generate_phantom(options)
    return _CACHE[key]


@pytest.fixture
def dciodvfy() -> str:
    path = shutil.which("dciodvfy")
    if path is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) not installed")
    return path


@pytest.fixture
def dcmdump() -> str:
    path = dcmtk("dcmdump")
    if path is None:
        pytest.skip("dcmdump (Debian package dcmtk) not installed")
    return path
