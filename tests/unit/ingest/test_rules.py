"""Qualification rules: one test per reason code, keyword variants, YAML overrides, choice."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage

from harness.data.ctdata import SeriesSpec, ct_dataset
from service.config import Settings
from service.ingest.rules import (
    Decision,
    evaluate,
    load_rules,
    metrics_from_detail,
    preference_key,
)
from service.outcomes import SeriesReason


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, min_slices=20, max_slice_thickness_mm=3.0)


def series(spec: SeriesSpec) -> list[Dataset]:
    return [ct_dataset(spec, i, with_pixels=False) for i in range(spec.slices)
            if i not in spec.skip_positions]


def decide(spec: SeriesSpec, settings: Settings) -> Decision:
    return evaluate(series(spec), load_rules(settings))


def test_cervical_axial_ct_qualifies(settings: Settings) -> None:
    decision = decide(SeriesSpec(slices=40), settings)
    assert decision.qualified, decision.detail
    assert decision.reason is SeriesReason.QUALIFIED
    assert decision.metrics["slices"] == 40
    assert decision.metrics["thickness_mm"] == 1.0
    assert decision.metrics["bone_kernel"] is True
    assert metrics_from_detail(decision.detail_json()) == \
        {k: v for k, v in decision.metrics.items()}


@pytest.mark.parametrize("field,value", [
    ("body_part", "NECK"), ("description", "HWS knochen 1mm"), ("description", "c-spine bone"),
    ("description", "Cervical Spine"), ("description", "RACHIS CERVICAL OS"),
    ("study_description", "CT Halswirbelsäule"), ("body_part", "CSPINE"),
])
def test_keyword_variants(settings: Settings, field: str, value: str) -> None:
    spec = SeriesSpec(slices=30, body_part=None, description="AXIAL 1.0",
                      study_description="CT TRAUMA")
    setattr(spec, field, value)
    assert decide(spec, settings).qualified, value


def test_reason_codes(settings: Settings) -> None:
    cases: list[tuple[SeriesSpec, SeriesReason]] = [
        (SeriesSpec(modality="MR"), SeriesReason.NOT_CT),
        (SeriesSpec(sop_class_uid=SecondaryCaptureImageStorage),
         SeriesReason.UNSUPPORTED_SOP_CLASS),
        (SeriesSpec(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), SeriesReason.LOCALIZER),
        (SeriesSpec(image_type=("DERIVED", "SECONDARY", "AXIAL")), SeriesReason.DERIVED_IMAGE),
        (SeriesSpec(image_type=("DERIVED", "PRIMARY", "MPR")), SeriesReason.DERIVED_IMAGE),
        (SeriesSpec(description="TOPOGRAM 0.6 T20f"), SeriesReason.EXCLUDED_DESCRIPTION),
        (SeriesSpec(body_part="HEAD", description="BRAIN 5mm", study_description="CT HEAD"),
         SeriesReason.NOT_CERVICAL),
        (SeriesSpec(orientation=(0, 1, 0, 0, 0, -1)), SeriesReason.NOT_AXIAL),
        (SeriesSpec(gantry_tilt_deg=12.0), SeriesReason.GANTRY_TILT),
        (SeriesSpec(thickness_mm=5.0), SeriesReason.SLICE_TOO_THICK),
        (SeriesSpec(slices=10), SeriesReason.TOO_FEW_SLICES),
        (SeriesSpec(slices=40, skip_positions=(20, 21, 22)), SeriesReason.MISSING_SLICES),
    ]
    for spec, expected in cases:
        decision = decide(spec, settings)
        assert not decision.qualified
        assert decision.reason is expected, (expected, decision.detail)
        assert decision.detail


def test_mixed_orientation_and_missing_geometry(settings: Settings) -> None:
    spec = SeriesSpec(slices=30)
    datasets = series(spec)
    datasets[5].ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43589]
    assert evaluate(datasets, load_rules(settings)).reason is SeriesReason.MIXED_ORIENTATION
    datasets = series(spec)
    del datasets[3].ImagePositionPatient
    assert evaluate(datasets, load_rules(settings)).reason is SeriesReason.MISSING_GEOMETRY


def test_duplicate_positions_and_mixed_matrix_are_inconsistent(settings: Settings) -> None:
    spec = SeriesSpec(slices=30)
    datasets = series(spec)
    datasets[4].ImagePositionPatient = datasets[3].ImagePositionPatient
    decision = evaluate(datasets, load_rules(settings))
    assert decision.reason is SeriesReason.INCONSISTENT_GEOMETRY
    datasets = series(spec)
    datasets[2].Rows = 32
    assert evaluate(datasets, load_rules(settings)).reason is SeriesReason.INCONSISTENT_GEOMETRY


def test_localizers_inside_a_series_are_skipped_not_fatal(settings: Settings) -> None:
    spec = SeriesSpec(slices=30)
    datasets = series(spec)
    scout = ct_dataset(SeriesSpec(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
                                  orientation=(0, 1, 0, 0, 0, -1)), 0, with_pixels=False)
    decision = evaluate([*datasets, scout], load_rules(settings))
    assert decision.qualified, decision.detail
    assert decision.metrics["localizers_skipped"] == 1


def test_conflicting_duplicates_are_not_analyzable(settings: Settings) -> None:
    decision = evaluate(series(SeriesSpec(slices=30)), load_rules(settings), conflicting=2)
    assert decision.reason is SeriesReason.CONFLICTING_DUPLICATES
    assert decision.metrics["conflicting_duplicates"] == 2


def test_no_images_at_all(settings: Settings) -> None:
    decision = evaluate([], load_rules(settings), unreadable=3)
    assert decision.reason is SeriesReason.NO_READABLE_IMAGES
    assert decision.metrics["unreadable"] == 3


def test_settings_thresholds_apply_and_yaml_overrides_them(tmp_path: Path) -> None:
    thick = SeriesSpec(slices=30, thickness_mm=2.5)
    assert not decide(thick, Settings(data_dir=tmp_path, max_slice_thickness_mm=2.0)).qualified
    assert decide(thick, Settings(data_dir=tmp_path, max_slice_thickness_mm=3.0)).qualified
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("modalities: [CT]\nsop_classes: [1.2.840.10008.5.1.4.1.1.2]\n"
                          "keyword_fields: [SeriesDescription]\ncervical_keywords: [SPECIAL]\n"
                          "max_slice_thickness_mm: 2.0\nmin_slices: 5\n")
    settings = Settings(data_dir=tmp_path, rules_file=rules_file, max_slice_thickness_mm=9.0)
    rules = load_rules(settings)
    assert rules.max_slice_thickness_mm == 2.0 and rules.min_slices == 5
    assert rules.source == str(rules_file)
    assert decide(SeriesSpec(slices=6, description="special protocol"), settings).qualified
    assert decide(thick, settings).reason is SeriesReason.NOT_CERVICAL


def test_enhanced_ct_frames_count_as_slices(settings: Settings) -> None:
    from pydicom.sequence import Sequence as Seq
    from pydicom.uid import EnhancedCTImageStorage

    ds = ct_dataset(SeriesSpec(sop_class_uid=EnhancedCTImageStorage), 0, with_pixels=False)
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceThickness",
                    "PixelSpacing"):
        delattr(ds, keyword)
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    measures.SliceThickness = 0.8
    measures.PixelSpacing = [0.4, 0.4]
    shared.PlaneOrientationSequence = Seq([orientation])
    shared.PixelMeasuresSequence = Seq([measures])
    ds.SharedFunctionalGroupsSequence = Seq([shared])
    frames = []
    for k in range(50):
        frame, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, -0.8 * k]
        frame.PlanePositionSequence = Seq([position])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Seq(frames)
    ds.NumberOfFrames = 50
    decision = evaluate([ds], load_rules(settings))
    assert decision.qualified, decision.detail
    assert decision.metrics["slices"] == 50
    assert decision.metrics["thickness_mm"] == 0.8


def test_preference_bone_kernel_then_thin_then_many() -> None:
    soft_thin = {"bone_kernel": False, "thickness_mm": 0.6, "slices": 400}
    bone_thick = {"bone_kernel": True, "thickness_mm": 2.0, "slices": 100}
    bone_thin = {"bone_kernel": True, "thickness_mm": 1.0, "slices": 200}
    bone_thin_more = {"bone_kernel": True, "thickness_mm": 1.0, "slices": 250}
    ranked = sorted([soft_thin, bone_thick, bone_thin, bone_thin_more], key=preference_key)
    assert ranked == [bone_thin_more, bone_thin, bone_thick, soft_thin]


def test_real_scanner_series_is_decided_with_a_reason(real_ct_dir: Path,
                                                      settings: Settings) -> None:
    from pydicom import dcmread

    datasets = [dcmread(p, stop_before_pixels=True) for p in sorted(real_ct_dir.glob("*.dcm"))]
    decision = evaluate(datasets, load_rules(settings))
    # A head-and-neck planning CT with no descriptions at all: analyzed, the anatomy decides
    # (a missing header is not a missing neck); with the option off, refused with a reason.
    assert decision.qualified, decision.detail
    assert decision.metrics["undescribed"] is True and decision.metrics["modality"] == "CT"
    assert "the anatomy decides" in decision.detail
    strict = dataclasses.replace(load_rules(settings), analyze_undescribed=False)
    assert evaluate(datasets, strict).reason is SeriesReason.NOT_CERVICAL


def test_the_real_chest_ct_is_decided_by_the_anatomy(real_chest_ct_dir: Path,
                                                    settings: Settings) -> None:
    """Body Part CHEST, 'RT^RT_Thorax (Adult)', 4 mm slices: a field of view that holds the
    lower neck. It qualifies on its description where slices of 4 mm are allowed; with the
    default 3 mm limit it is refused for its slices, not for its words."""
    from pydicom import dcmread

    datasets = [dcmread(p, stop_before_pixels=True) for p in sorted(real_chest_ct_dir.iterdir())]
    decision = evaluate(datasets, load_rules(settings))
    assert decision.reason is SeriesReason.SLICE_TOO_THICK
    assert decision.metrics["partial_coverage_keyword"] == "CHEST"
    wide = Settings(data_dir=settings.data_dir, min_slices=20, max_slice_thickness_mm=5.0)
    decision = evaluate(datasets, load_rules(wide))
    assert decision.qualified, decision.detail
    assert decision.metrics["thickness_mm"] == 4.0


def test_a_derived_primary_axial_reconstruction_is_an_axial_stack(settings: Settings) -> None:
    spec = SeriesSpec(slices=30, image_type=("DERIVED", "PRIMARY", "AXIAL", "CT_SOM5 SPI"))
    decision = decide(spec, settings)
    assert decision.qualified, decision.detail
    assert decision.metrics["derived_skipped"] == 0


def test_partial_coverage_descriptions_qualify_and_can_be_switched_off(
        settings: Settings) -> None:
    chest = SeriesSpec(slices=30, body_part="CHEST", description="Thorax 1.0 B60f",
                       study_description="CT THORAX")
    decision = decide(chest, settings)
    assert decision.qualified and decision.metrics["partial_coverage_keyword"] == "CHEST"
    strict = dataclasses.replace(load_rules(settings), partial_coverage_keywords=())
    assert evaluate(series(chest), strict).reason is SeriesReason.NOT_CERVICAL


@pytest.mark.parametrize("variant", range(7))
def test_every_synthetic_description_variant_qualifies(variant: int, settings: Settings,
                                                       tmp_path: Path) -> None:
    """The description/protocol/body-part variants the phantom writer draws from practice."""
    from pydicom import dcmread

    from service.synthetic.dicom_writer import (
        DESCRIPTION_VARIANTS,
        WriterOptions,
        write_series,
    )
    from service.synthetic.options import PhantomOptions
    from service.synthetic.phantom import generate_phantom

    assert len(DESCRIPTION_VARIANTS) == 7
    phantom = generate_phantom(PhantomOptions(seed=variant, n_slices=24, matrix=64,
                                              pixel_spacing=3.0, slice_spacing=2.0))
    paths = write_series(phantom, tmp_path, WriterOptions(description_variant=variant))
    decision = evaluate([dcmread(p, stop_before_pixels=True) for p in paths],
                        load_rules(settings))
    assert decision.qualified, (DESCRIPTION_VARIANTS[variant], decision.detail)
