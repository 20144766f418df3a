"""What a caller can ask of the phantom generator, and the ground truth it hands back.

Coordinate conventions used throughout ``service.synthetic``:

* Arrays are indexed ``(z, y, x)``. ``x`` is the image column and runs towards the
  patient's left (DICOM LPS +x), ``y`` is the image row and runs towards the patient's
  back (LPS +y), ``z`` is the slice index and runs towards the head (LPS +z). So index
  ``z = 0`` is the most *inferior* slice: the same order as ``service.imaging.volume``
  (ascending projection of ImagePositionPatient on the slice normal).
* Physical positions are DICOM patient coordinates (LPS) in millimetres.
* Voxel bounding boxes are ``(z0, y0, x0, z1, y1, x1)`` with the end *exclusive*.
* Hounsfield units (HU): water 0, air -1000.
"""

from __future__ import annotations

import random as _random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from service.findings import VERTEBRAE

VERTEBRA_NAMES: tuple[str, ...] = VERTEBRAE
"""Cervical levels (:data:`service.findings.VERTEBRAE`); label value ``i + 1`` is
``VERTEBRA_NAMES[i]``."""
THORACIC_NAMES: tuple[str, ...] = ("T1", "T2", "T3")
"""Thoracic levels that may be partly in view; label value ``8 + i``."""
LABEL_OF: dict[str, int] = {name: i + 1 for i, name in enumerate(VERTEBRA_NAMES + THORACIC_NAMES)}
"""Label value of each vertebra name (C1 = 1 ... C7 = 7, T1 = 8, T2 = 9, T3 = 10)."""


class Kernel(StrEnum):
    """Reconstruction kernel: sets image sharpness and noise texture/level."""

    BONE = "BONE"
    SOFT = "SOFT"


class FractureType(StrEnum):
    """Fracture patterns the generator can place. All are ground-truth *fractures*."""

    BODY = "body"
    """Thin lucent plane (1-2 mm) through the vertebral body, crossing both cortices."""
    DENS_TYPE_II = "dens_type_ii"
    """Transverse lucent plane through the base of the dens (C2 only)."""
    C1_RING = "c1_ring"
    """Plane through the anterior or posterior arch of C1 (Jefferson-type, C1 only)."""
    PEDICLE = "pedicle"
    LAMINA = "lamina"
    SPINOUS = "spinous"
    """Spinous process (clay-shoveler type at C6/C7)."""
    TRANSVERSE = "transverse"
    """Transverse process, often through the foramen transversarium."""
    COMPRESSION = "compression"
    """Anterior wedge compression: body height loss anteriorly with an impaction band."""


FRACTURE_LEVELS: dict[FractureType, tuple[str, ...]] = {
    FractureType.BODY: ("C2", "C3", "C4", "C5", "C6", "C7"),
    FractureType.DENS_TYPE_II: ("C2",),
    FractureType.C1_RING: ("C1",),
    FractureType.PEDICLE: ("C2", "C3", "C4", "C5", "C6", "C7"),
    FractureType.LAMINA: ("C2", "C3", "C4", "C5", "C6", "C7"),
    FractureType.SPINOUS: ("C2", "C3", "C4", "C5", "C6", "C7"),
    FractureType.TRANSVERSE: ("C1", "C2", "C3", "C4", "C5", "C6", "C7"),
    FractureType.COMPRESSION: ("C3", "C4", "C5", "C6", "C7"),
}
"""Where each fracture type can occur (the generator rejects other combinations)."""


class MimicType(StrEnum):
    """Findings that look like fractures but are not: ground truth says *not fractured*."""

    NUTRIENT_FORAMEN = "nutrient_foramen"
    BASIVERTEBRAL_CHANNEL = "basivertebral_channel"
    ANTERIOR_OSTEOPHYTE = "anterior_osteophyte"
    DETACHED_OSTEOPHYTE = "detached_osteophyte"
    """Corticated ossicle in front of a disc space ("sesamoid" osteophyte)."""
    C1_ARCH_CLEFT = "c1_arch_cleft"
    """Congenital cleft of the posterior (or anterior) arch of C1, corticated margins."""
    OS_ODONTOIDEUM = "os_odontoideum"
    """Rounded corticated ossicle separated from a short dens by a smooth gap."""
    HEALED_FRACTURE = "healed_fracture"
    """Old corticated fracture: sclerotic band and slight step, no lucent line."""
    FACET_DEGENERATION = "facet_degeneration"
    """Joint narrowing, subchondral sclerosis, small osteophytes, vacuum phenomenon."""
    LAMINECTOMY = "laminectomy"
    """Postsurgical defect of lamina and spinous process with smooth margins."""
    SHOULDER_STREAK = "shoulder_streak"
    """Photon-starvation streaks across the lower neck between the shoulders."""
    BEAM_HARDENING = "beam_hardening"
    """Dark band between dense structures at C6-C7 (cupping / beam hardening)."""


MIMIC_LEVELS: dict[MimicType, tuple[str, ...]] = {
    MimicType.NUTRIENT_FORAMEN: ("C2", "C3", "C4", "C5", "C6", "C7"),
    MimicType.BASIVERTEBRAL_CHANNEL: ("C2", "C3", "C4", "C5", "C6", "C7"),
    MimicType.ANTERIOR_OSTEOPHYTE: ("C3", "C4", "C5", "C6", "C7"),
    MimicType.DETACHED_OSTEOPHYTE: ("C3", "C4", "C5", "C6"),
    MimicType.C1_ARCH_CLEFT: ("C1",),
    MimicType.OS_ODONTOIDEUM: ("C2",),
    MimicType.HEALED_FRACTURE: ("C3", "C4", "C5", "C6", "C7"),
    MimicType.FACET_DEGENERATION: ("C2", "C3", "C4", "C5", "C6"),
    MimicType.LAMINECTOMY: ("C3", "C4", "C5", "C6"),
    MimicType.SHOULDER_STREAK: ("C6", "C7"),
    MimicType.BEAM_HARDENING: ("C6", "C7"),
}
"""Levels where each mimic can occur."""


@dataclass(frozen=True)
class FractureSpec:
    """A requested fracture. ``vertebra=None`` lets the generator choose a plausible level."""

    type: FractureType
    vertebra: str | None = None
    displacement_mm: float | None = None
    """Shift of one fragment along the plane, mm (None: random 0-1.5 mm, i.e. minimal)."""


@dataclass(frozen=True)
class MimicSpec:
    """A requested mimic. ``vertebra=None`` lets the generator choose a plausible level."""

    type: MimicType
    vertebra: str | None = None


@dataclass
class PhantomOptions:
    """Everything that decides one phantom; the same options give the same voxels.

    Geometry: ``matrix`` x ``matrix`` pixels of ``pixel_spacing`` mm (in-plane FOV =
    matrix * pixel_spacing), ``n_slices`` slices ``slice_spacing`` mm apart along LPS +z,
    each ``slice_thickness`` mm thick (thickness > spacing: overlapping reconstruction,
    simulated as through-plane blur). ``n_slices=None`` covers the skull base to T2.
    The FOV is centred on the cervical spine (C4 at the middle of the volume).

    Anatomy randomness (size, shape, curvature, patient rotation) comes from ``seed``;
    the ``None`` fields are drawn from it too.
    """

    seed: int = 0
    n_slices: int | None = 300
    matrix: int = 512
    pixel_spacing: float = 0.4
    """mm per pixel (0.25-0.8 is realistic; 0.4 gives a 205 mm FOV at 512)."""
    slice_spacing: float = 0.625
    """mm between slice centres."""
    slice_thickness: float | None = None
    """mm; None = ``slice_spacing``."""
    kernel: Kernel = Kernel.BONE
    fractures: int | Sequence[FractureSpec] = 0
    """A count (types and levels drawn from the seed) or explicit specs."""
    mimics: int | Sequence[MimicSpec] = 0
    """A count (types and levels drawn from the seed) or explicit specs."""
    metal: bool = False
    """Anterior cervical plate with screws (C5-C6 or C4-C5) and its streak artefact."""
    osteopenia: float = 0.0
    """0 (normal bone) .. 1 (severe): lowers cancellous HU and thins the cortex."""
    size_scale: float | None = None
    """Global anatomy scale (~0.9 small woman .. 1.12 large man); None: drawn."""
    lordosis: float | None = None
    """Cervical lordosis, degrees between C2 and C7 endplates (negative: kyphosis); None: drawn."""
    rotation_deg: tuple[float, float, float] | None = None
    """Patient rotation (yaw about z, pitch about y, roll about x) in degrees; None: a few."""
    noise_scale: float = 1.0
    """Multiplies the kernel's calibrated noise (0 gives a noise-free image)."""
    shoulders: bool = True
    """Model the shoulders (and their streaks) in the lowest slices."""
    z_offset_mm: float = 0.0
    """Moves the FOV along +z (towards the head) relative to the default centring on C4."""
    age_years: int | None = None
    """Patient age written to the header (None: drawn); drives cartilage calcification."""

    def resolved_thickness(self) -> float:
        return float(self.slice_thickness if self.slice_thickness is not None
                     else self.slice_spacing)


@dataclass(frozen=True)
class FractureTruth:
    """One placed fracture. ``bbox`` covers the voxels where the lucent plane (or the
    compressed body) changed bone, in phantom voxel indices (z0, y0, x0, z1, y1, x1), end
    exclusive."""

    vertebra: str
    type: FractureType
    bbox: tuple[int, int, int, int, int, int]
    displacement_mm: float = 0.0
    center_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    slice_boxes: tuple[tuple[int, int, int, int, int], ...] = ()
    """Per slice ``(z, y0, x0, y1, x1)`` (end exclusive): the fracture's extent in that slice."""


@dataclass(frozen=True)
class MimicTruth:
    """One placed mimic (not a fracture). ``vertebra`` is None for artefacts that span
    levels; ``bbox`` as for fractures."""

    type: MimicType
    vertebra: str | None
    bbox: tuple[int, int, int, int, int, int]
    center_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    slice_boxes: tuple[tuple[int, int, int, int, int], ...] = ()


@dataclass
class PatientInfo:
    """Synthetic demographics written into the DICOM header (never a real person)."""

    patient_id: str
    patient_name: str
    sex: str
    age_years: int
    weight_kg: float
    accession_number: str
    extra: dict[str, str] = field(default_factory=dict)


def random_options(seed: int, fracture_rate: float = 0.5, *, matrix: int = 512,
                   n_slices: int | None = None, mimic_rate: float = 0.6) -> PhantomOptions:
    """Sample a realistic case from ``seed``.

    About ``fracture_rate`` of the cases carry 1-3 fractures (levels weighted towards C2 and
    C6-C7 as in trauma series), ``mimic_rate`` carry 1-2 mimics; scanner geometry is drawn
    from the ranges seen in clinical cervical-spine protocols. ``matrix=256`` keeps the FOV
    and doubles the pixel spacing (a quarter of the voxels: fast training data).
    ``n_slices=None`` chooses the count that covers the skull base to T1-T2.
    """
    rng = _random.Random(f"cspine-options-{seed}")
    fractured = rng.random() < fracture_rate
    n_frac = rng.choice((1, 1, 1, 2, 2, 3)) if fractured else 0
    n_mimic = rng.choice((1, 1, 2)) if rng.random() < mimic_rate else 0
    pixel = rng.choice((0.3, 0.35, 0.39, 0.43, 0.47, 0.5))
    spacing_and_thickness = rng.choice(((0.625, 0.625), (0.5, 0.75), (0.8, 1.0),
                                        (1.0, 1.0), (0.6, 0.6), (1.25, 1.25), (2.0, 2.0)))
    kernel = Kernel.BONE if rng.random() < 0.85 else Kernel.SOFT
    age = rng.randint(18, 95)
    osteopenia = max(0.0, min(1.0, (age - 45) / 50 + rng.gauss(0, 0.15)))
    return PhantomOptions(
        seed=seed,
        age_years=age,
        n_slices=n_slices,
        matrix=matrix,
        pixel_spacing=pixel * 512 / matrix,
        slice_spacing=spacing_and_thickness[0],
        slice_thickness=spacing_and_thickness[1],
        kernel=kernel,
        fractures=n_frac,
        mimics=n_mimic,
        metal=rng.random() < 0.05,
        osteopenia=round(osteopenia, 2),
        noise_scale=rng.uniform(0.8, 1.3),
        z_offset_mm=rng.uniform(-8.0, 8.0),
    )
