"""The RSNA layout readers, above all the NIfTI -> DICOM-geometry mapping of segmentations."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from service.evaluation import rsna
from service.evaluation.rsna import LPS_FROM_RAS, LayoutError


def _volume_affine(spacing: tuple[float, float, float], origin: tuple[float, float, float],
                   ) -> np.ndarray:
    """Axial series: z runs along LPS +z (head), rows along +y, columns along +x."""
    dz, dy, dx = spacing
    a = np.zeros((4, 4))
    a[0, 2] = dz  # index z -> LPS z
    a[1, 1] = dy  # index y -> LPS y
    a[2, 0] = dx  # index x -> LPS x
    a[:3, 3] = origin
    a[3, 3] = 1
    return a


def _asymmetric_labels(shape: tuple[int, int, int]) -> np.ndarray:
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 20, size=shape).astype(np.uint8)
    labels[0, 0, 0] = 19  # corners marked, so any flip or transpose shows
    labels[-1, 0, 0] = 1
    return labels


def _write_nifti(tmp: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path = tmp / "seg.nii"
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.mark.parametrize("order,flips", [
    ((0, 1, 2), ()),
    ((2, 1, 0), (0, 1)),      # the competition's files: (x, y, z)-like with in-plane flips
    ((2, 1, 0), (2,)),
    ((1, 2, 0), (0, 1, 2)),
])
def test_permuted_flipped_nifti_maps_back_exactly(tmp_path: Path, order: tuple[int, ...],
                                                  flips: tuple[int, ...]) -> None:
    shape = (12, 9, 10)
    truth = _asymmetric_labels(shape)
    vol_aff = _volume_affine((1.25, 0.7, 0.7), (-80.0, -60.0, 110.0))
    # NIfTI array = truth transposed and flipped; its header says where each voxel is.
    data = np.transpose(truth, order)
    for axis in flips:
        data = np.flip(data, axis=axis)
    # Index map nifti (i, j, k) -> volume (z, y, x): undo the flips, then the transpose.
    to_vol = np.eye(4)
    step = np.eye(4)
    for axis in flips:
        f = np.eye(4)
        f[axis, axis] = -1
        f[axis, 3] = data.shape[axis] - 1
        step = f @ step
    perm = np.zeros((4, 4))
    for nifti_axis, vol_axis in enumerate(order):
        perm[vol_axis, nifti_axis] = 1
    perm[3, 3] = 1
    to_vol = perm @ step
    nifti_affine = np.linalg.inv(LPS_FROM_RAS) @ vol_aff @ to_vol
    path = _write_nifti(tmp_path, np.ascontiguousarray(data), nifti_affine)
    mapped = rsna.segmentation_on_volume(path, vol_aff, shape)
    assert mapped.dtype == np.uint8
    np.testing.assert_array_equal(mapped, truth)


def test_offset_subgrid_is_placed_and_rest_is_background(tmp_path: Path) -> None:
    shape = (10, 8, 8)
    vol_aff = _volume_affine((2.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    part = _asymmetric_labels((4, 8, 8))
    # NIfTI covers slices 3..6 only, stored with z reversed.
    shift = np.eye(4)
    shift[0, 3] = 3 + 3  # flipped axis: index 0 is volume slice 6
    shift[0, 0] = -1
    nifti_affine = np.linalg.inv(LPS_FROM_RAS) @ vol_aff @ shift
    path = _write_nifti(tmp_path, np.ascontiguousarray(part[::-1]), nifti_affine)
    mapped = rsna.segmentation_on_volume(path, vol_aff, shape)
    np.testing.assert_array_equal(mapped[3:7], part)
    assert not mapped[:3].any() and not mapped[7:].any()


def test_coarser_nifti_is_resampled_nearest(tmp_path: Path) -> None:
    shape = (8, 8, 8)
    vol_aff = _volume_affine((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    coarse = np.zeros((4, 4, 4), np.uint8)
    coarse[1, 2, 3] = 5
    scale = np.diag([2.0, 2.0, 2.0, 1.0])  # each NIfTI voxel covers 2x2x2 volume voxels
    nifti_affine = np.linalg.inv(LPS_FROM_RAS) @ vol_aff @ scale
    path = _write_nifti(tmp_path, coarse, nifti_affine)
    mapped = rsna.segmentation_on_volume(path, vol_aff, shape)
    # Voxel centres coincide at (2, 4, 6); the coarse voxel spans one fine voxel either side.
    assert mapped[2, 4, 6] == 5
    where = np.argwhere(mapped == 5)
    assert 1 <= len(where) <= 27 and np.abs(where - [2, 4, 6]).max() <= 1
    assert mapped[0, 0, 0] == 0


def test_disjoint_nifti_is_refused(tmp_path: Path) -> None:
    vol_aff = _volume_affine((1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    far = np.eye(4)
    far[:3, 3] = 500.0
    path = _write_nifti(tmp_path, np.ones((4, 4, 4), np.uint8),
                        np.linalg.inv(LPS_FROM_RAS) @ vol_aff @ far)
    with pytest.raises(LayoutError):
        rsna.segmentation_on_volume(path, vol_aff, (4, 4, 4))


def test_thoracic_labels_collapse() -> None:
    labels = np.array([0, 1, 7, 8, 12, 19], np.uint8)
    np.testing.assert_array_equal(rsna.cervical_and_thoracic(labels), [0, 1, 7, 8, 8, 8])


def test_layout_csvs(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text(
        "StudyInstanceUID,patient_overall,C1,C2,C3,C4,C5,C6,C7,mimics\n"
        "1.2.3,1,0,1,0,0,0,0,0,\n"
        "1.2.4,0,0,0,0,0,0,0,0,nutrient_foramen:C4\n")
    (tmp_path / "train_bounding_boxes.csv").write_text(
        "StudyInstanceUID,x,y,width,height,slice_number\n1.2.3,10.5,20,30,40,77\n")
    (tmp_path / "train_images" / "1.2.3").mkdir(parents=True)
    for n in (10, 2, 1):
        (tmp_path / "train_images" / "1.2.3" / f"{n}.dcm").write_bytes(b"")
    ds = rsna.RsnaDataset(tmp_path)
    studies = list(ds)
    assert [s.study_instance_uid for s in studies] == ["1.2.3"]  # 1.2.4 has no images
    s = studies[0]
    assert s.labels is not None and s.labels.as_vector().tolist() == [1, 0, 1, 0, 0, 0, 0, 0]
    assert s.boxes[0].slice_number == 77 and s.boxes[0].x == 10.5
    assert [p.name for p in s.dicom_paths()] == ["1.dcm", "2.dcm", "10.dcm"]
    assert ds.extras["1.2.4"]["mimics"] == "nutrient_foramen:C4"
    (tmp_path / "train.csv").write_text("StudyInstanceUID,patient_overall\n1.2.3,2\n")
    with pytest.raises(LayoutError):
        rsna.RsnaDataset(tmp_path)
