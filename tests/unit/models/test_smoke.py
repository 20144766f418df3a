"""Smoke test of the training side: RSNA layout -> cache -> a few steps -> ONNX -> pipeline.

Tiny configurations and a coarse matrix keep it well under a minute; it never trains the
shipped model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from models.arch import (
    FracConfig,
    FractureNet,
    SegConfig,
    SegExport,
    SegUNet3D,
    seg_class_probabilities,
)
from models.config import default_preprocessing
from models.data import case_from_phantom, case_from_rsna, prepare_case
from models.export import export_model_dir
from models.train import Study, TrainOptions, train
from service.config import Settings
from service.evaluation.rsna import RsnaDataset
from service.findings import VERTEBRAE
from service.imaging.volume import load_volume
from service.inference.pipeline import run_pipeline
from service.inference.runtime import load_runtime
from service.synthetic import (
    FractureSpec,
    FractureType,
    generate_phantom,
    random_options,
    write_rsna_layout,
)

pytestmark = pytest.mark.slow


def test_architectures_take_dynamic_shapes() -> None:
    torch.manual_seed(0)
    for head, raw_channels in (("ordinal", 2), ("softmax", 9)):
        seg = SegUNet3D(SegConfig(widths=(4, 8, 16), head=head))
        image = torch.rand(2, 3, 16, 24, 32)
        assert seg(image).shape == (2, raw_channels, 16, 24, 32)
        probs = SegExport(seg)(image)
        assert probs.shape == (2, 9, 16, 24, 32)
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 16, 24, 32))


def test_ordinal_head_maps_levels_to_classes() -> None:
    config = SegConfig()
    raw = torch.zeros(1, 2, 1, 1, 4)
    raw[0, 0] = torch.tensor([-9.0, 9.0, 9.0, 9.0])  # background, then vertebra
    raw[0, 1] = torch.tensor([3.0, 1.0, 4.2, 7.9])  # level values
    labels = seg_class_probabilities(raw, config).argmax(dim=1).flatten().tolist()
    assert labels == [0, 1, 4, 8]
    frac = FractureNet(FracConfig(in_channels=6, widths=(8, 8, 8, 8), feature=16, hidden=8))
    for slices in (5, 16):
        v, s = frac(torch.rand(3, slices, 6, 32, 32))
        assert v.shape == (3,) and s.shape == (3, slices)


@pytest.fixture(scope="module")
def tiny_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rsna")
    fractured = random_options(7, matrix=128)
    fractured.fractures = [FractureSpec(FractureType.BODY, "C5")]
    fractured.mimics = 0
    clean = random_options(8, matrix=128, mimic_rate=0.0)
    clean.fractures = 0
    write_rsna_layout(root, [generate_phantom(fractured), generate_phantom(clean)])
    return root


def test_in_memory_case_equals_layout_round_trip(tiny_layout: Path) -> None:
    """The fast synthetic path gives exactly the arrays of the DICOM/NIfTI path."""
    dataset = RsnaDataset(tiny_layout)
    options = random_options(7, matrix=128)
    options.fractures = [FractureSpec(FractureType.BODY, "C5")]
    options.mimics = 0
    phantom = generate_phantom(options)
    from service.synthetic import study_uid

    uid = study_uid(phantom)
    pre = default_preprocessing(crop_size=32, crop_slices=8)
    from_layout = prepare_case(case_from_rsna(dataset.study(uid)), pre, jitters=1, seed=3)
    from_memory = prepare_case(case_from_phantom(phantom, uid), pre, jitters=1, seed=3)
    for key, value in from_layout.items():
        np.testing.assert_array_equal(value, from_memory[key], err_msg=key)
    # The fractured vertebra has a positive target and some positive slices.
    c5 = from_layout["stack_label"] == 5
    assert (from_layout["stack_target"][c5] == 1).all()
    assert from_layout["slice_target"][c5].max() == 1
    assert (from_layout["stack_target"][~c5] == 0).all()
    # Dense fracture masks: on the fractured vertebra only, on the slices marked positive.
    masks = from_layout["fracture_mask"]
    assert masks[c5].any() and not masks[~c5].any()
    marked = masks[c5].reshape(int(c5.sum()), masks.shape[1], -1).any(axis=2)
    positive_slices = from_layout["slice_target"][c5] > 0
    assert not (marked & ~positive_slices).any()  # a mask only where the slice is positive
    assert marked.sum() >= 0.5 * positive_slices.sum()


def test_tiny_training_export_and_pipeline(tiny_layout: Path, tmp_path: Path) -> None:
    torch.set_num_threads(2)
    pre = default_preprocessing(crop_size=32, crop_slices=8)
    dataset = RsnaDataset(tiny_layout)
    studies = []
    for i, study in enumerate(dataset):
        arrays = prepare_case(case_from_rsna(study), pre, jitters=1, seed=i)
        studies.append(Study(uid=study.study_instance_uid, **arrays))
    opts = TrainOptions(
        out=tmp_path / "ckpt", seg_steps=3, frac_steps=3, seg_batch=1, seg_patch=(16, 32, 32),
        frac_batch=4, eval_every=3, progress=False,
        seg_config=SegConfig(in_channels=3, classes=9, widths=(4, 8, 16, 16)),
        frac_config=FracConfig(in_channels=pre.frac_channels, widths=(8, 8, 16, 16),
                               feature=16, hidden=8))
    history = train(studies[:1] + studies[1:], studies, opts)
    assert (tmp_path / "ckpt" / "seg.pt").exists() and (tmp_path / "ckpt" / "frac.pt").exists()
    assert history["seg"]["log"] and "dice_mean_c1_c7" in history["seg"]["log"][-1]
    assert "vertebra_auc" in history["frac"]["log"][-1]

    seg = SegUNet3D(opts.seg_config)
    seg.load_state_dict(torch.load(tmp_path / "ckpt" / "seg.pt", weights_only=False)["state"])
    frac = FractureNet(opts.frac_config)
    frac.load_state_dict(torch.load(tmp_path / "ckpt" / "frac.pt", weights_only=False)["state"])
    model_dir = tmp_path / "model"
    manifest, check = export_model_dir(seg.eval(), frac.eval(), model_dir, pre=pre,
                                       version="0.0.0-smoke")
    # ONNX Runtime agrees with torch on inputs shaped unlike the export example.
    assert check.seg_max_abs_diff < 1e-4
    assert check.frac_max_abs_diff < 1e-4
    assert manifest.seg.opset >= 17
    assert sum(f.bytes for f in manifest.files()) < 30 * 1024 * 1024

    settings = Settings(model_dir=model_dir, execution_providers=["CPUExecutionProvider"])
    runtime = load_runtime(settings)
    study = next(iter(dataset))
    volume = load_volume(study.dicom_paths())
    findings = run_pipeline(volume, runtime, settings)
    assert [v.vertebra for v in findings.vertebrae] == list(VERTEBRAE)
    assert findings.label_map is not None and findings.label_map.shape == volume.shape
    assert set(findings.stage_durations) == {"preprocess", "segmentation", "plausibility",
                                             "classification"}
    assert 0.0 <= findings.patient_probability <= 1.0


def test_stage_histories_merge_into_one_file(tmp_path: Path) -> None:
    """Two stage runs sharing --out (in parallel, one core each) keep both logs."""
    from models.train import merge_history

    merge_history(tmp_path, {"seg": {"log": [{"step": 1}]}, "seconds": 1.0})
    merged = merge_history(tmp_path, {"frac": {"log": [{"step": 2}]}, "seconds": 2.0})
    assert merged["seg"]["log"] == [{"step": 1}] and merged["frac"]["log"] == [{"step": 2}]
    assert json.loads((tmp_path / "history.json").read_text()) == merged
