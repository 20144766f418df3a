"""Classifier crops cut with the served segmentation (``prepare --crops served|both``).

The classifier must learn on the masks and boxes the runtime hands it: one trained only on
ground-truth crops outputs ~1.0 everywhere on the served ones
(``models/experiments/2026-11-26-frac-more-positives``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from models.config import default_preprocessing
from models.data import Case, case_from_phantom, prepare_case
from models.prepare import CaseWriter, main
from service.inference.crops import vertebra_box, vertebra_stack
from service.inference.pipeline import Segmentation, segment_volume
from service.synthetic import FractureSpec, FractureType, generate_phantom, random_options
from service.synthetic import study_uid as phantom_study_uid

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "cspine-v1"


@pytest.fixture(scope="module")
def c5_case() -> Case:
    options = random_options(7, matrix=128)
    options.fractures = [FractureSpec(FractureType.BODY, "C5")]
    options.mimics = 0
    phantom = generate_phantom(options)
    return case_from_phantom(phantom, phantom_study_uid(phantom))


def _shifted(case: Case) -> Segmentation:
    """A segmentation that calls every level from C4 down one level too high (C5 -> "C4")."""
    assert case.labels is not None
    served = np.where((case.labels >= 4) & (case.labels <= 7), case.labels - 1, case.labels)
    served[case.labels == 8] = 0
    in_view = []
    for index, obj in enumerate(ndimage.find_objects(served, max_label=7)):
        if obj is not None:
            in_view.append((index + 1, (obj[0].start, obj[1].start, obj[2].start,
                                        obj[0].stop, obj[1].stop, obj[2].stop)))
    return Segmentation(label_map=served.astype(np.uint8), in_view=in_view, warnings=[])


def test_served_crops_use_the_served_mask_and_the_true_level(c5_case: Case) -> None:
    pre = default_preprocessing(crop_size=32, crop_slices=8)
    served = _shifted(c5_case)
    arrays = prepare_case(c5_case, pre, jitters=0, seed=1, served=served, crops="served")
    # Each served level is judged by the true level under most of its mask.
    spec = pre.stack_spec()
    labels = arrays["stack_label"].tolist()
    assert len(labels) == len(served.in_view)
    for (label, bbox), truth, stack, target in zip(served.in_view, labels, arrays["stacks"],
                                                   arrays["stack_target"], strict=True):
        under = c5_case.labels[served.label_map == label]  # type: ignore[index]
        assert truth == np.bincount(under[(under >= 1) & (under <= 7)]).argmax()
        assert target == (1.0 if truth == 5 else 0.0)
        # The mask channel is the served level's mask, not the ground truth's.
        expected, _ = vertebra_stack(c5_case.hu, served.label_map, label,
                                     vertebra_box(bbox, c5_case.spacing, spec), spec)
        np.testing.assert_array_equal(stack[:, -1], np.rint(expected[:, -1] * 255))
    assert 5 in labels  # the fractured level is found under a mislabelled served level
    positive = arrays["stack_label"] == 5
    assert arrays["fracture_mask"][positive].any()
    assert not arrays["fracture_mask"][~positive].any()


def test_both_keeps_ground_truth_and_served_crops(c5_case: Case) -> None:
    pre = default_preprocessing(crop_size=32, crop_slices=8)
    served = _shifted(c5_case)
    gt = prepare_case(c5_case, pre, jitters=1, seed=1)
    only = prepare_case(c5_case, pre, jitters=1, seed=1, served=served, crops="served")
    both = prepare_case(c5_case, pre, jitters=1, seed=1, served=served, crops="both")
    assert len(both["stacks"]) == len(gt["stacks"]) + len(only["stacks"])
    np.testing.assert_array_equal(both["stacks"][:len(gt["stacks"])], gt["stacks"])


def test_no_crops_keeps_the_segmentation_arrays_only(c5_case: Case) -> None:
    pre = default_preprocessing(crop_size=32, crop_slices=8)
    gt = prepare_case(c5_case, pre, jitters=1, seed=1)
    none = prepare_case(c5_case, pre, jitters=1, seed=1, crops="none")
    assert len(gt["stacks"]) > 0 and len(none["stacks"]) == 0
    assert none["stacks"].shape[1:] == gt["stacks"].shape[1:]
    np.testing.assert_array_equal(none["seg_labels"], gt["seg_labels"])
    np.testing.assert_array_equal(none["seg_image"], gt["seg_image"])


def test_served_crops_need_a_segmentation(c5_case: Case) -> None:
    pre = default_preprocessing(crop_size=32, crop_slices=8)
    with pytest.raises(ValueError, match="served segmentation"):
        prepare_case(c5_case, pre, jitters=0, seed=1, crops="served")
    with pytest.raises(ValueError, match="crops must be one of"):
        prepare_case(c5_case, pre, jitters=0, seed=1, crops="predicted")
    with pytest.raises(ValueError, match="--model-dir"):
        CaseWriter(jitters=0, crops="served")


def test_case_writer_cuts_crops_with_the_shipped_segmentation(tmp_path: Path) -> None:
    """End to end through ``python -m models.prepare``: the runtime's own stage 1 cuts them."""
    assert main(["synthetic", "--seeds", "7", "--matrix", "128", "--via-memory",
                 "--crops", "served", "--jitters", "0", "--model-dir", str(SHIPPED),
                 "--cache", str(tmp_path), "--no-progress"]) == 0
    (written,) = tmp_path.glob("*.npz")
    with np.load(written) as data:
        served_labels = data["stack_label"]
        stacks = data["stacks"]
    writer = CaseWriter(jitters=0, crops="served", model_dir=SHIPPED)
    phantom = generate_phantom(random_options(7, 0.5, matrix=128))
    segmentation = segment_volume(phantom.hu, phantom.spacing, writer.seg, writer.pre)
    assert writer.seg is not None and segmentation.in_view
    assert len(served_labels) == len(segmentation.in_view)
    spec = writer.pre.stack_spec()
    label, bbox = segmentation.in_view[0]
    expected, _ = vertebra_stack(phantom.hu, segmentation.label_map, label,
                                 vertebra_box(bbox, phantom.spacing, spec), spec)
    np.testing.assert_array_equal(stacks[0], np.clip(np.rint(expected * 255), 0, 255))
