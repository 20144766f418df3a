"""RSNA 2022 layout: file names, CSV columns and values, and the NIfTI orientation quirk."""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from service.synthetic import FractureSpec, FractureType, WriterOptions, write_rsna_layout
from service.synthetic.phantom import Phantom
from tests.unit.synthetic.conftest import small_phantom


def _rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def cases() -> list[Phantom]:
    fractured = small_phantom(n_slices=40, seed=3,
                              fractures=[FractureSpec(FractureType.BODY, "C4"),
                                         FractureSpec(FractureType.LAMINA, "C5")])
    normal = small_phantom(n_slices=40, seed=4)
    return [fractured, normal]


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory, cases: list[Phantom]) -> Path:
    out = tmp_path_factory.mktemp("rsna")
    index = write_rsna_layout(out, cases)
    assert len(index.studies) == 2 and index.fractured == 1
    return out


def test_train_csv(layout: Path, cases: list[Phantom]) -> None:
    header, rows = _rows(layout / "train.csv")
    assert header == ["StudyInstanceUID", "patient_overall", "C1", "C2", "C3", "C4", "C5",
                      "C6", "C7"]
    assert len(rows) == 2
    by_overall = {r["patient_overall"]: r for r in rows}
    assert set(by_overall) == {"0", "1"}
    f = by_overall["1"]
    assert (f["C4"], f["C5"], f["C1"], f["C7"]) == ("1", "1", "0", "0")
    assert all(v == "0" for k, v in by_overall["0"].items() if k != "StudyInstanceUID")


def test_images_are_numbered_head_first(layout: Path, cases: list[Phantom]) -> None:
    _, rows = _rows(layout / "train.csv")
    for row in rows:
        files = sorted((layout / "train_images" / row["StudyInstanceUID"]).glob("*.dcm"),
                       key=lambda f: int(f.stem))
        assert [int(f.stem) for f in files] == list(range(1, len(files) + 1))
        z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
             for f in files]
        assert z == sorted(z, reverse=True)
        assert pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID == \
            row["StudyInstanceUID"]


def test_segmentation_quirk_and_header(layout: Path, cases: list[Phantom]) -> None:
    fractured = cases[0]
    _, rows = _rows(layout / "train.csv")
    uid = next(r["StudyInstanceUID"] for r in rows if r["patient_overall"] == "1")
    img = nib.load(str(layout / "segmentations" / f"{uid}.nii"))
    data = np.asarray(img.dataobj)
    assert data.dtype == np.uint8
    assert set(np.unique(data).tolist()) <= set(range(0, 11))
    assert {4, 5} <= set(np.unique(data).tolist())
    # The competition recipe aligns the array with the files sorted by InstanceNumber.
    aligned = data[:, ::-1, ::-1].transpose(2, 1, 0)
    files = sorted((layout / "train_images" / uid).glob("*.dcm"), key=lambda f: int(f.stem))
    assert aligned.shape[0] == len(files)
    for f in files[::7]:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        k = int(round((float(ds.ImagePositionPatient[2]) - fractured.origin[2])
                      / fractured.spacing[0]))
        assert np.array_equal(aligned[int(f.stem) - 1], fractured.labels[k])
    # The header maps every voxel to the RAS position of the same DICOM pixel.
    assert nib.aff2axcodes(img.affine) == ("L", "A", "S")
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    i, j, kk = (int(v[len(v) // 2]) for v in np.nonzero(data == 4))
    ras = img.affine @ np.array([i, j, kk, 1.0])
    lps = np.array([-ras[0], -ras[1], ras[2]])
    ds = min((pydicom.dcmread(f, stop_before_pixels=True) for f in files),
             key=lambda d: abs(float(d.ImagePositionPatient[2]) - lps[2]))
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    col = int(round((lps[0] - ipp[0]) / float(ds.PixelSpacing[1])))
    row = int(round((lps[1] - ipp[1]) / float(ds.PixelSpacing[0])))
    assert abs(float(ds.ImagePositionPatient[2]) - lps[2]) < 1e-3
    kz = int(round((ipp[2] - fractured.origin[2]) / fractured.spacing[0]))
    assert fractured.labels[kz, row, col] == 4


def test_feet_first_studies_need_only_the_row_flip(tmp_path: Path,
                                                   cases: list[Phantom]) -> None:
    p = cases[0]
    write_rsna_layout(tmp_path, [p], writer_options=WriterOptions(instance_order="feet_first"))
    _, rows = _rows(tmp_path / "train.csv")
    uid = rows[0]["StudyInstanceUID"]
    data = np.asarray(nib.load(str(tmp_path / "segmentations" / f"{uid}.nii")).dataobj)
    aligned = data[:, ::-1].transpose(2, 1, 0)
    one = pydicom.dcmread(tmp_path / "train_images" / uid / "1.dcm", stop_before_pixels=True)
    assert float(one.ImagePositionPatient[2]) == pytest.approx(p.origin[2])
    assert np.array_equal(aligned, p.labels)


def test_bounding_boxes(layout: Path, cases: list[Phantom]) -> None:
    header, rows = _rows(layout / "train_bounding_boxes.csv")
    assert header == ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    fractured = cases[0]
    nz, ny, nx = fractured.shape
    assert rows
    uids = {r["StudyInstanceUID"] for r in rows}
    assert len(uids) == 1
    for r in rows:
        x, y, w, h, n = (int(float(r[k])) for k in ("x", "y", "width", "height",
                                                     "slice_number"))
        assert 1 <= n <= nz and w > 0 and h > 0 and x >= 0 and x + w <= nx and y + h <= ny
        k = nz - n
        box_labels = fractured.labels[k, y:y + h, x:x + w]
        assert ((box_labels == 4) | (box_labels == 5)).any()
    header, lesions = _rows(layout / "synthetic_lesions.csv")
    assert {r["type"] for r in lesions if r["kind"] == "fracture"} == {"body", "lamina"}


def test_rewriting_keeps_other_studies(layout: Path, cases: list[Phantom]) -> None:
    write_rsna_layout(layout, [cases[1]])
    _, rows = _rows(layout / "train.csv")
    assert len(rows) == 2
