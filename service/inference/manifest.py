"""The model manifest (``<model_dir>/manifest.json``): what the runtime needs to trust a model.

The file itself is read by :mod:`service.model_manifest` (the one reader, also used by the
edge and the health check for the model's name and version); this module validates it.
It names each ONNX file with its sha256 and size (checked on load, see ``runtime``), the
tensors each one takes, the preprocessing the model was trained with (the pipeline applies
exactly these values, so training and serving cannot drift apart), and the decision thresholds
chosen on the validation split. It is written by ``models.export`` and only read here.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from service.findings import VERTEBRAE
from service.imaging.preprocess import Window as PreWindow
from service.inference.crops import StackSpec
from service.model_manifest import MANIFEST_NAME, ManifestError, read_manifest

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST_NAME", "ManifestError", "ModelManifest", "dump_manifest", "load_manifest"]

FORMAT_VERSION: Literal[1] = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TensorSpec(_Strict):
    name: str
    dtype: Literal["float32", "float16", "int64", "uint8"] = "float32"
    shape: list[int | str]
    """Fixed sizes as integers, dynamic axes by name (e.g. ``"batch"``)."""


class ModelFile(_Strict):
    file: str
    """File name relative to the model directory."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(gt=0)

    @field_validator("file")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value in ("", ".", ".."):
            raise ValueError("model file must be a plain file name inside the model directory")
        return value


class OnnxModel(_Strict):
    model: ModelFile
    fp16: ModelFile | None = None
    """Optional half-precision variant, used on GPU providers when settings ask for it."""
    opset: int = Field(ge=17)
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class Window(_Strict):
    """A CT display window in HU, mapped linearly onto [0, 1] and clipped."""

    name: str
    width: float = Field(gt=0)
    level: float


class Preprocessing(_Strict):
    windows: list[Window] = Field(min_length=1)
    """Window channels, in channel order, for both stages."""
    seg_spacing_mm: float = Field(gt=0)
    """Isotropic grid spacing of the segmentation input."""
    seg_divisor: int = Field(ge=1)
    """Each spatial size of the segmentation input is padded to a multiple of this."""
    seg_field_of_view_mm: float | None = Field(default=None, gt=0)
    """In-plane side (mm) of the square around the spine that a second segmentation pass
    sees; None: one pass over the whole volume. The net learns on patches of about this size
    around the spine; over a wider field of view (shoulders, the whole neck in a 250 mm
    reconstruction) its instance-normalised features drift and it miscounts the lower levels
    (cspine-v1 1.2.0 on 16 validation phantoms: C6 Dice 0.46 over the whole field of view,
    0.80 in a 180 mm square)."""
    seg_antialias: bool = False
    """Average the HU over each segmentation voxel's width when shrinking to the grid
    (``service.imaging.preprocess.area_downsample``) instead of sampling one point. False
    reproduces the models trained before it. With point sampling, cspine-v1 1.5.0 read T1 as
    C7 on 11 of 200 held-out phantoms at matrix 512 (0.3-0.5 mm pixels: one in six to eight
    kept) and on none at matrix 256; averaged, the coarse grid looks alike at both matrices
    and like a real scan's, whose pixels are not the generator's."""
    seg_classes: list[str]
    """Class names by output channel: background, C1..C7, then any extra classes."""
    min_vertebra_volume_mm3: float = Field(ge=0)
    """A vertebra with less segmented volume than this is 'not in view'."""
    min_bone_hu: float = 150.0
    """Voxels at or above this HU count as bone for the plausibility check."""
    min_bone_fraction: float = Field(default=0.25, ge=0, le=1)
    """A segmented level needs at least this fraction of ``min_vertebra_volume_mm3`` of bone
    (on the segmentation grid) to be in view."""
    crop_slices: int = Field(ge=2)
    """Axial slices sampled evenly through each vertebra for the classifier."""
    crop_size: int = Field(ge=16)
    """Height and width in pixels of each classifier slice."""
    crop_margin: float = Field(ge=0)
    """Fractional margin around the vertebra's in-plane extent."""
    crop_min_extent_mm: float = Field(gt=0)
    """Smallest in-plane side of a crop in mm (keeps tiny C1 arches in context)."""
    crop_z_margin_slices: int = Field(default=0, ge=0)
    """Extra source slices above and below the vertebra's segmented range."""
    crop_subsamples: int = Field(default=1, ge=1)
    """Sub-bins per slice bin (odd): the neighbour window is added at each off-centre one."""
    crop_neighbour_window: int = Field(default=0, ge=0)
    """Index into ``windows`` of the window sampled at the off-centre sub-bins."""
    mask_channel: bool = True
    """The classifier gets the vertebra's mask as a last channel."""
    crop_flip_average: bool = False
    """Classify each crop and its left-right mirror and average the two (probabilities and
    slice scores). The classifier learned on randomly mirrored crops; the average is a
    second look at every vertebra for the price of one more classifier call."""

    @property
    def frac_channels(self) -> int:
        return len(self.windows) + self.crop_subsamples - 1 + int(self.mask_channel)

    def preprocess_windows(self) -> tuple[PreWindow, ...]:
        """The windows as ``service.imaging.preprocess.Window`` values, in channel order."""
        return tuple(PreWindow(w.name, width=w.width, level=w.level) for w in self.windows)

    def stack_spec(self) -> StackSpec:
        """The classifier crop parameters for ``service.inference.crops``."""
        return StackSpec(
            windows=self.preprocess_windows(), slices=self.crop_slices, size=self.crop_size,
            subsamples=self.crop_subsamples, neighbour_window=self.crop_neighbour_window,
            mask_channel=self.mask_channel, margin=self.crop_margin,
            min_extent_mm=self.crop_min_extent_mm, z_margin_slices=self.crop_z_margin_slices)

    @field_validator("seg_classes")
    @classmethod
    def _classes_start_with_vertebrae(cls, value: list[str]) -> list[str]:
        expected = ["background", *VERTEBRAE]
        if value[: len(expected)] != expected:
            raise ValueError(f"seg_classes must start with {expected}")
        return value


class Thresholds(_Strict):
    vertebra: float = Field(ge=0, le=1)
    """A vertebra is 'suspected' when its probability is at least this."""
    patient: float = Field(ge=0, le=1)
    """The study is flagged when the patient probability is at least this."""
    selection: str = ""
    """How the thresholds were chosen (e.g. the validation operating point)."""


class ModelManifest(_Strict):
    format_version: Literal[1] = FORMAT_VERSION
    name: str
    version: str
    created: str
    synthetic_only: bool
    """True when the weights never saw real patient data: findings are not clinical."""
    seg: OnnxModel
    frac: OnnxModel
    preprocessing: Preprocessing
    thresholds: Thresholds
    patient_aggregation: Literal["max", "noisy_or"] = "max"
    training: dict[str, object] = Field(default_factory=dict)
    validation: dict[str, object] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _shapes_agree(self) -> ModelManifest:
        channels = len(self.preprocessing.windows)
        seg_in = self.seg.inputs[0].shape
        if len(seg_in) != 5 or seg_in[1] != channels:
            raise ValueError(f"seg input must be (batch, {channels}, z, y, x), got {seg_in}")
        frac_in = self.frac.inputs[0].shape
        frac_channels = self.preprocessing.frac_channels
        if len(frac_in) != 5 or frac_in[2] != frac_channels:
            raise ValueError(
                f"frac input must be (batch, slices, {frac_channels}, h, w), got {frac_in}")
        try:
            self.preprocessing.stack_spec()
        except ValueError as exc:
            raise ValueError(f"inconsistent crop parameters: {exc}") from exc
        size = self.preprocessing.crop_size
        if frac_in[3] not in (size, "height") or frac_in[4] not in (size, "width"):
            raise ValueError(f"frac input size {frac_in[3:]} disagrees with crop_size {size}")
        return self

    def files(self) -> list[ModelFile]:
        """Every file the manifest vouches for."""
        out = [self.seg.model, self.frac.model]
        out += [m for m in (self.seg.fp16, self.frac.fp16) if m is not None]
        return out


def load_manifest(model_dir: Path) -> ModelManifest:
    """Read and validate ``model_dir/manifest.json``; raise :class:`ManifestError` if unusable."""
    path = Path(model_dir) / MANIFEST_NAME
    raw = read_manifest(model_dir)
    try:
        manifest = ModelManifest.model_validate(raw)
    except ValidationError as exc:
        raise ManifestError(f"invalid model manifest {path}: {exc}") from exc
    logger.info("model manifest %s %s (synthetic_only=%s)", manifest.name, manifest.version,
                manifest.synthetic_only)
    return manifest


def dump_manifest(manifest: ModelManifest, model_dir: Path) -> Path:
    """Write the manifest (used by ``models.export``); keys in a stable order for diffs."""
    path = Path(model_dir) / MANIFEST_NAME
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n",
                    encoding="utf-8")
    return path
