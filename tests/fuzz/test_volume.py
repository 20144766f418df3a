"""The volume loader on hostile series: huge declared matrices, frame counts and bit depths,
pixel data of the wrong length, truncated and corrupt JPEG 2000 / JPEG-LS / RLE frames, and
frames whose own header declares an enormous image (decompression bombs). Each load gives a
volume or a ``SeriesReason``, never another exception, within a memory bound set by the
voxel limit (tracemalloc, numpy included) and 256 MB of untraced decoder memory."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from hypothesis import example, given
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from harness.fuzz import SeriesCase, check_volume, series_cases, write_series_case

from .conftest import fuzz


@fuzz(80)
@given(series_cases())
# What the fuzzing found, tried first on every run.
@example(SeriesCase("frame_corrupt", RLELossless, (0,), (("flips", ((0.945, 1),)),)))
@example(SeriesCase("frame_bomb", JPEG2000Lossless, (0, 1, 2, 3), (("size", 60000),),
                    must_refuse=True, reasons=frozenset({"UNDECODABLE_PIXEL_DATA"})))
@example(SeriesCase("frame_bomb", JPEGLSLossless, (2,), (("size", 65535),),
                    must_refuse=True, reasons=frozenset({"UNDECODABLE_PIXEL_DATA"})))
@example(SeriesCase("wrong_vr", JPEG2000Lossless, (0, 1, 2, 3),
                    (("tag", "Columns"), ("value", "-1"))))
@example(SeriesCase("frame_truncate", JPEGLSLossless, (1,), (("keep_fraction", 0.8053),)))
@example(SeriesCase("huge_matrix", RLELossless, (0, 1, 2, 3),
                    (("rows", 65535), ("columns", 65535)), must_refuse=True,
                    reasons=frozenset({"VOLUME_TOO_LARGE"})))
def test_loader_refuses_with_a_reason_and_bounded_memory(
        tmp_path_factory: pytest.TempPathFactory, case: SeriesCase) -> None:
    directory = tmp_path_factory.getbasetemp() / "series" / uuid.uuid4().hex
    paths = write_series_case(case, Path(directory))
    check_volume(case, paths)
