"""Property tests: the volume depends on the set of slices, not on how they arrived."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from service.imaging.qc import QcWarning
from service.imaging.volume import Volume, load_volume

from .conftest import SeriesSpec, make_slice, save

N = 12


@dataclass
class Written:
    originals: list[Path]
    original_uids: list[str]
    copies: dict[str, list[Path]]
    """Byte-identical copies of every slice, under names that sort before ("a") and after
    ("z") the original."""
    resent: list[Path]
    """Every slice again with a new SOP Instance UID and identical pixels."""
    resent_uids: list[str]
    reference: Volume


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Written:
    directory = tmp_path_factory.mktemp("arrival")
    spec = SeriesSpec(n_slices=N)
    originals, uids, resent, resent_uids = [], [], [], []
    copies: dict[str, list[Path]] = {"a": [], "z": []}
    for k in range(N):
        ds = make_slice(spec, k)
        path = save(ds, directory / f"m_{k:03d}.dcm", ExplicitVRLittleEndian)
        originals.append(path)
        uids.append(ds.SOPInstanceUID)
        for prefix in copies:
            target = directory / f"{prefix}_copy_{k:03d}.dcm"
            shutil.copy(path, target)
            copies[prefix].append(target)
        again = make_slice(spec, k, sop_uid=generate_uid())
        resent.append(save(again, directory / f"r_{k:03d}.dcm", ExplicitVRLittleEndian))
        resent_uids.append(again.SOPInstanceUID)
    reference = load_volume(originals, min_slices=5)
    return Written(originals, uids, copies, resent, resent_uids, reference)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_volume_is_independent_of_arrival_and_duplicates(written: Written,
                                                          data: st.DataObject) -> None:
    copied = data.draw(st.sets(st.integers(0, N - 1)), label="copied slices")
    copy_name = data.draw(st.lists(st.sampled_from("az"), min_size=N, max_size=N), label="names")
    resent = data.draw(st.sets(st.integers(0, N - 1)), label="re-sent slices")
    paths = list(written.originals)
    paths += [written.copies[copy_name[k]][k] for k in sorted(copied)]
    paths += [written.resent[k] for k in sorted(resent)]
    order = data.draw(st.permutations(range(len(paths))), label="arrival order")
    arrived = [paths[i] for i in order]

    volume = load_volume(arrived, min_slices=5)

    np.testing.assert_array_equal(volume.hu, written.reference.hu)
    np.testing.assert_array_equal(volume.affine, written.reference.affine)
    expected_uids = [min(written.original_uids[k], written.resent_uids[k]) if k in resent
                     else written.original_uids[k] for k in range(N)]
    assert volume.sop_instance_uids == expected_uids
    assert [h.SOPInstanceUID for h in volume.headers] == expected_uids
    duplicates = bool(copied or resent)
    assert volume.warnings == ([QcWarning.DUPLICATE_SLICES_DROPPED] if duplicates else [])


@settings(max_examples=15, deadline=None)
@given(order=st.permutations(range(N)))
def test_enhanced_ct_frame_order_does_not_matter(tmp_path_factory: pytest.TempPathFactory,
                                                 written: Written, order: list[int]) -> None:
    from .conftest import write_enhanced_ct

    directory = tmp_path_factory.mktemp("enhanced")
    reference_spec = pydicom.dcmread(written.originals[0], stop_before_pixels=True)
    spec = SeriesSpec(n_slices=N, study_uid=reference_spec.StudyInstanceUID,
                      series_uid=reference_spec.SeriesInstanceUID,
                      frame_of_reference_uid=reference_spec.FrameOfReferenceUID)
    volume = load_volume([write_enhanced_ct(directory, spec, frame_order=order)], min_slices=5)
    np.testing.assert_array_equal(volume.hu, written.reference.hu)
    np.testing.assert_allclose(volume.affine, written.reference.affine)
    assert volume.frame_numbers == [order.index(k) + 1 for k in range(N)]
