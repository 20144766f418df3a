"""The shipped model through the worker's path: DICOM series -> Volume -> Findings."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.config import Settings
from service.evaluation import metrics
from service.findings import VERTEBRAE, Findings
from service.imaging.volume import Volume, load_volume
from service.inference.manifest import load_manifest
from service.inference.pipeline import (
    NO_VERTEBRA_IN_VIEW,
    OUT_OF_ORDER,
    SegGrid,
    run_pipeline,
    segment_volume,
)
from service.inference.runtime import CPU, ModelRuntime, load_runtime
from service.outcomes import AnalysisResult
from service.synthetic import (
    FractureSpec,
    FractureType,
    generate_phantom,
    random_options,
    write_series,
)
from tests.unit.inference.conftest import MODEL_DIR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fractured_series(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    options = random_options(90210, matrix=256, mimic_rate=0.0)
    options.fractures = [FractureSpec(FractureType.BODY, "C5", displacement_mm=1.5)]
    options.mimics = 0
    options.metal = False
    phantom = generate_phantom(options)
    directory = tmp_path_factory.mktemp("series")
    write_series(phantom, directory)
    return directory, phantom


@pytest.fixture(scope="module")
def runtime_and_settings() -> tuple[object, Settings]:
    settings = Settings(model_dir=MODEL_DIR, execution_providers=[CPU], ort_intra_op_threads=2)
    return load_runtime(settings), settings


def test_findings_contract_on_a_fractured_phantom(fractured_series: tuple[Path, object],
                                                  runtime_and_settings: tuple[object, Settings],
                                                  ) -> None:
    directory, phantom = fractured_series
    runtime, settings = runtime_and_settings
    volume = load_volume(sorted(directory.glob("*.dcm")))
    findings = run_pipeline(volume, runtime, settings)  # type: ignore[arg-type]
    manifest = runtime.manifest  # type: ignore[attr-defined]

    assert [v.vertebra for v in findings.vertebrae] == list(VERTEBRAE)
    assert findings.series_instance_uid == volume.series_instance_uid
    assert findings.model_name == manifest.name and findings.model_version == manifest.version
    assert findings.execution_provider == CPU
    assert findings.patient_threshold == manifest.thresholds.patient
    assert set(findings.stage_durations) == {"preprocess", "segmentation", "plausibility",
                                             "classification"}
    # A phantom of the generator the model learned on: the anatomy gate passes, every level
    # is vouched for, and the answer follows the classifier.
    assert findings.anatomy["passed"] is True, findings.anatomy
    assert findings.result is (AnalysisResult.FRACTURE_SUSPECTED if findings.patient_suspected
                               else AnalysisResult.NO_FRACTURE_FOUND)
    label_map = findings.label_map
    assert label_map is not None and label_map.shape == volume.shape
    assert label_map.dtype == np.uint8 and int(label_map.max()) <= 7
    nz = volume.shape[0]
    in_view = [v for v in findings.vertebrae if v.in_view]
    assert len(in_view) >= 5
    probabilities = []
    for v in in_view:
        assert v.probability is not None and 0 <= v.probability <= 1
        assert v.plausible is True and v.plausibility_reasons == ()
        assert v.suspected == (v.probability >= findings.vertebra_threshold)
        assert v.slice_range is not None and v.bbox is not None
        z0, z1 = v.slice_range
        assert 0 <= z0 <= z1 < nz
        assert (v.bbox[0], v.bbox[3] - 1) == (z0, z1)
        assert all(0 <= a < b <= n for a, b, n in zip(v.bbox[:3], v.bbox[3:], volume.shape,
                                                        strict=True))
        assert len(v.slice_scores) == z1 - z0 + 1
        assert v.key_slices and all(z0 <= k <= z1 for k in v.key_slices)
        best = max(range(len(v.slice_scores)), key=lambda i: v.slice_scores[i])
        assert v.key_slices[0] == z0 + best
        label = VERTEBRAE.index(v.vertebra) + 1
        assert (label_map[z0:z1 + 1] == label).any()
        probabilities.append(v.probability)
    for v in findings.vertebrae:
        if not v.in_view:
            assert v.probability is None and not v.suspected and v.slice_range is None
    assert findings.patient_probability == pytest.approx(max(probabilities))
    assert findings.patient_suspected == (findings.patient_probability
                                          >= findings.patient_threshold)


_VALIDATION = load_manifest(MODEL_DIR).validation
CLASSIFIER_DISCRIMINATES = float(_VALIDATION.get("patient_auc") or 0.0) >= 0.9  # type: ignore[arg-type]
"""What calibration measured on the shipped model's validation studies (manifest)."""


@pytest.fixture(scope="module")
def shipped_findings(fractured_series: tuple[Path, object],
                     runtime_and_settings: tuple[object, Settings]) -> Findings:
    """The shipped model on the fractured phantom, run once for the accuracy tests."""
    directory, _ = fractured_series
    runtime, settings = runtime_and_settings
    volume = load_volume(sorted(directory.glob("*.dcm")))
    return run_pipeline(volume, runtime, settings)  # type: ignore[arg-type]


def test_shipped_model_segments_the_phantom_levels(
        fractured_series: tuple[Path, object], shipped_findings: Findings) -> None:
    _, phantom = fractured_series
    findings = shipped_findings
    label_map = findings.label_map
    assert label_map is not None
    # Synthetic ground truth on the exact grid; C7 is left out (its Dice is the weakest: 0.46
    # on this phantom; see MODEL_CARD.md).
    truth = np.where(phantom.labels >= 8, 0, phantom.labels)  # type: ignore[attr-defined]
    for level in ("C1", "C2", "C3", "C4", "C5", "C6"):
        d = metrics.dice(truth, label_map, VERTEBRAE.index(level) + 1)
        assert d is not None and d > 0.6, (level, d)


def test_shipped_model_counts_the_levels_in_a_wide_field_of_view(
        runtime_and_settings: tuple[object, Settings]) -> None:
    """A 256 mm reconstruction: shoulders and the whole neck in view.

    Over the whole field of view the network miscounts from C4 down (C6 Dice 0.02 on this
    phantom: it learned on 160 mm patches); the second pass on the manifest's
    ``seg_field_of_view_mm`` around the spine labels every level.
    """
    runtime, _ = runtime_and_settings
    options = random_options(4242, matrix=256, mimic_rate=0.0)
    options.pixel_spacing = 1.0
    phantom = generate_phantom(options)
    pre = runtime.manifest.preprocessing  # type: ignore[attr-defined]
    assert pre.seg_field_of_view_mm is not None
    seg = segment_volume(phantom.hu, phantom.spacing, runtime.seg, pre)  # type: ignore[attr-defined]
    truth = np.where(phantom.labels >= 8, 0, phantom.labels)
    for index, level in enumerate(VERTEBRAE):
        d = metrics.dice(truth, seg.label_map, index + 1)
        assert d is not None and d > 0.7, (level, d)
    assert [label for label, _ in seg.in_view] == list(range(1, 8))
    assert OUT_OF_ORDER not in seg.warnings


def test_the_pipeline_runs_on_a_real_scanners_series(
        real_ct_dir: Path, runtime_and_settings: tuple[object, Settings]) -> None:
    """A real head-and-neck CT (511 mm field of view, 3 mm slices; no labels, so no accuracy).

    The findings keep their contract on real data, and the level-order check speaks for
    what the label map shows.
    """
    runtime, settings = runtime_and_settings
    volume = load_volume(sorted(real_ct_dir.glob("*.dcm")))
    findings = run_pipeline(volume, runtime, settings)  # type: ignore[arg-type]
    assert [v.vertebra for v in findings.vertebrae] == list(VERTEBRAE)
    label_map = findings.label_map
    assert label_map is not None and label_map.shape == volume.shape
    for v in findings.vertebrae:
        assert (v.probability is not None) == v.in_view
        if v.in_view:
            label = VERTEBRAE.index(v.vertebra) + 1
            assert v.bbox is not None and (label_map == label).any()
    # One definition of out of order: the gate's, along the spine's own axis.
    assert (OUT_OF_ORDER in findings.warnings) == (
        "LEVELS_OUT_OF_ORDER" in findings.inconclusive_reasons)
    # No known fracture, and the levels it finds are anatomically impossible (C5 over
    # 117 mm, C2-C4 piled up): never STAT; INCONCLUSIVE with the failed rules.
    assert findings.result is AnalysisResult.INCONCLUSIVE, findings.anatomy
    assert findings.suspected_vertebrae == [] and not findings.patient_suspected
    assert "LEVELS_OVERLAP:C3" in findings.inconclusive_reasons
    assert any(r.startswith("LEVEL_EXTENT_OUT_OF_RANGE") for r in findings.inconclusive_reasons)


def test_the_real_chest_ct_is_not_stat(
        real_chest_ct_dir: Path, runtime_and_settings: tuple[object, Settings]) -> None:
    """The chest CT (C2-C3 to L1, raised arms, invalid Study Date): the classifier alone
    says 0.996; the model's "C2" sits at the bottom of the scan. INCONCLUSIVE, never STAT."""
    runtime, settings = runtime_and_settings
    volume = load_volume(sorted(real_chest_ct_dir.iterdir()))
    findings = run_pipeline(volume, runtime, settings)  # type: ignore[arg-type]
    assert findings.result is AnalysisResult.INCONCLUSIVE, findings.anatomy
    assert findings.suspected_vertebrae == [] and not findings.patient_suspected
    assert "LEVELS_OUT_OF_ORDER" in findings.inconclusive_reasons


@pytest.mark.xfail(not CLASSIFIER_DISCRIMINATES, strict=True,
                   reason="the shipped classifier separates fractured from intact vertebrae "
                          "only weakly (validation patient AUC below 0.9 in manifest.json; "
                          "see MODEL_CARD.md)")
def test_shipped_model_flags_a_displaced_body_fracture(shipped_findings: Findings) -> None:
    findings = shipped_findings
    c5 = findings.vertebrae[VERTEBRAE.index("C5")]
    assert c5.suspected and findings.patient_suspected


def test_shipped_model_localizes_a_displaced_body_fracture(shipped_findings: Findings) -> None:
    # Found means localized: the fractured level scores highest, not merely above a
    # sensitivity-first threshold that flags several levels.
    findings = shipped_findings
    c5 = findings.vertebrae[VERTEBRAE.index("C5")]
    others = [v.probability for v in findings.vertebrae
              if v.vertebra != "C5" and v.probability is not None]
    assert c5.probability is not None and c5.probability > max(others)


class _RecordingStage:
    """The real classifier session, keeping a copy of every input it is given."""

    def __init__(self, stage: object) -> None:
        self.stage = stage
        self.inputs: list[np.ndarray] = []

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        self.inputs.append(x.copy())
        return self.stage.run(x)  # type: ignore[attr-defined, no-any-return]


def test_flip_average_scores_each_crop_and_its_mirror(
        fractured_series: tuple[Path, object],
        runtime_and_settings: tuple[object, Settings]) -> None:
    directory, _ = fractured_series
    runtime, settings = runtime_and_settings
    volume = load_volume(sorted(directory.glob("*.dcm")))
    manifest = runtime.manifest  # type: ignore[attr-defined]
    findings = {}
    recorders = {}
    for flip in (False, True):
        pre = manifest.preprocessing.model_copy(update={"crop_flip_average": flip})
        recorders[flip] = _RecordingStage(runtime.frac)  # type: ignore[attr-defined]
        variant = ModelRuntime(model_dir=MODEL_DIR,
                               manifest=manifest.model_copy(update={"preprocessing": pre}),
                               seg=runtime.seg,  # type: ignore[attr-defined]
                               frac=recorders[flip])  # type: ignore[arg-type]
        findings[flip] = run_pipeline(volume, variant, settings)
    plain, mirrored = recorders[False].inputs, recorders[True].inputs
    assert len(mirrored) == 2 * len(plain)
    np.testing.assert_array_equal(mirrored[0], plain[0])
    np.testing.assert_array_equal(mirrored[1], plain[0][..., ::-1])
    mirror_p = runtime.frac.run(np.ascontiguousarray(plain[0][..., ::-1]))[0]  # type: ignore[attr-defined]
    plain_p = [v.probability for v in findings[False].vertebrae if v.in_view]
    averaged = [v.probability for v in findings[True].vertebrae if v.in_view]
    np.testing.assert_allclose(averaged, (np.array(plain_p) + mirror_p.reshape(-1)) / 2,
                               rtol=1e-5, atol=1e-6)


def test_threshold_overrides_from_settings(fractured_series: tuple[Path, object],
                                           runtime_and_settings: tuple[object, Settings]) -> None:
    directory, _ = fractured_series
    runtime, settings = runtime_and_settings
    volume = load_volume(sorted(directory.glob("*.dcm")))
    strict = settings.model_copy(update={"fracture_threshold": 1.0, "patient_threshold": 1.0})
    f = run_pipeline(volume, runtime, strict)  # type: ignore[arg-type]
    assert f.vertebra_threshold == 1.0 and f.patient_threshold == 1.0
    assert all(v.suspected == (v.probability is not None and v.probability >= 1.0)
               for v in f.vertebrae)
    lax = settings.model_copy(update={"fracture_threshold": 0.0, "patient_threshold": 0.0})
    f = run_pipeline(volume, runtime, lax)  # type: ignore[arg-type]
    assert f.patient_suspected and all(v.suspected for v in f.vertebrae if v.in_view)


def test_no_spine_in_view(runtime_and_settings: tuple[object, Settings]) -> None:
    """A water cylinder: nothing segmented, nothing suspected, a warning, no crash."""
    runtime, settings = runtime_and_settings
    z, y, x = 60, 128, 128
    yy, xx = np.mgrid[0:y, 0:x]
    body = ((yy - 64) ** 2 + (xx - 64) ** 2) < 50 ** 2
    hu = np.where(body, 0, -1000).astype(np.int16)[None].repeat(z, axis=0)
    affine = np.diag([1.0, 1.0, 1.0, 1.0])[[2, 1, 0, 3]]
    volume = Volume(hu=hu, spacing=(1.0, 1.0, 1.0), affine=affine,
                    sop_instance_uids=[f"1.2.{i}" for i in range(z)],
                    frame_numbers=[None] * z, headers=[], study_instance_uid="1.2",
                    series_instance_uid="1.2.3", frame_of_reference_uid=None, acquired_at=None)
    f = run_pipeline(volume, runtime, settings)  # type: ignore[arg-type]
    assert not f.in_view and not f.patient_suspected and f.patient_probability == 0.0
    assert NO_VERTEBRA_IN_VIEW in f.warnings
    assert f.label_map is not None
    # Whatever the network labelled (too small, or without bone density), none of it is
    # reported in view, and the label map (what the SEG shows) agrees.
    assert not f.label_map.any()


def test_seg_grid_maps_coarse_boxes_back() -> None:
    grid = SegGrid.for_volume((300, 512, 512), (0.625, 0.4, 0.4), 2.5, 8)
    assert grid.shape == (75, 82, 82) and grid.padded_shape == (80, 88, 88)
    # Coarse voxel c sits at source index c * 4 along z: it owns source indices 4c-2..4c+1.
    assert grid.source_box((10, 0, 0, 12, 1, 1))[0::3] == (38, 46)
    # ... exactly as the label map is resampled back (the box and the map agree).
    from service.imaging.preprocess import resample_to_original

    coarse = np.zeros(grid.shape, np.uint8)
    coarse[10:12, 40:45, 30:33] = 1
    fine = resample_to_original(coarse, grid.spacing, (0.625, 0.4, 0.4), (300, 512, 512),
                                order=0)
    where = np.argwhere(fine)
    box = grid.source_box((10, 40, 30, 12, 45, 33))
    assert tuple(where.min(axis=0)) == box[:3]
    assert tuple(where.max(axis=0) + 1) == box[3:]
    full = grid.source_box((0, 0, 0, 75, 82, 82))
    assert full == (0, 0, 0, 300, 512, 512)


def test_runtime_modules_do_not_import_torch() -> None:
    code = ("import sys; import service.inference.pipeline, service.inference.runtime, "
            "service.evaluation.report, service.evaluation.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
