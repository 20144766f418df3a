"""What SR, SEG and key-image builders share: the algorithm's identity and the source headers.

The source headers come from :class:`~service.imaging.volume.Volume` (pixel data stripped).
highdicom reads patient/study attributes from them with plain attribute access, so Type 2
attributes that a scanner left out (Patient's Birth Date, Accession Number, ...) are added
empty on a copy here rather than failing the build.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, time
from typing import Any

import highdicom as hd
from pydicom import Dataset, valuerep
from pydicom.datadict import dictionary_VR

from service import __version__
from service.imaging.volume import Volume
from service.results import codes

logger = logging.getLogger(__name__)

DEFAULT_MANUFACTURER = "cspine-triage"

# Type 2 attributes (present, possibly empty) that highdicom copies from the first source
# image by attribute access: a missing one raises AttributeError inside the constructor.
_TYPE2_FROM_SOURCE: tuple[str, ...] = (
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


class ResultBuildError(Exception):
    """The inputs cannot make a valid result object (mismatched shapes, unknown slices)."""


@dataclass(frozen=True)
class AlgorithmInfo:
    """Identity of the model that produced the findings, as written into SEG and SR.

    ``name`` and ``version`` come from the model manifest (``models/<name>/manifest.json``);
    the Findings object carries the same two values, so either source gives the same objects.
    """

    name: str
    version: str
    manufacturer: str = DEFAULT_MANUFACTURER
    software_version: str = __version__
    """Version of this service (the SEG's and SR's Software Versions list it after the model's)."""

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any] | Any) -> AlgorithmInfo:
        """Read ``name``/``version``/``manufacturer`` (``model_name``/``model_version`` also
        accepted) from a parsed model manifest: a mapping or an object with those attributes
        (``service.inference.manifest.ModelManifest``)."""
        if not isinstance(manifest, Mapping):
            manifest = {key: getattr(manifest, key, None)
                        for key in ("name", "version", "manufacturer")}
        name = manifest.get("name") or manifest.get("model_name")
        version = manifest.get("version") or manifest.get("model_version")
        if not name or not version:
            raise ResultBuildError("model manifest lacks name or version")
        return cls(name=str(name), version=str(version),
                   manufacturer=str(manifest.get("manufacturer") or DEFAULT_MANUFACTURER))

    @property
    def software_versions(self) -> Any:
        """Model version, then service version (a list: highdicom's hint says tuple, but
        pydicom warns when a tuple is assigned to an LO element)."""
        return [self.version, self.software_version]

    def segmentation_algorithm(self) -> hd.AlgorithmIdentificationSequence:
        """Algorithm Identification Sequence for SEG segment descriptions (family: AI)."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name, version=self.version, family=codes.ARTIFICIAL_INTELLIGENCE,
            source=self.manufacturer,
        )

    def sr_algorithm(self) -> hd.sr.AlgorithmIdentification:
        """TID 4019 Algorithm Identification for SR measurement groups."""
        return hd.sr.AlgorithmIdentification(name=self.name, version=self.version)


_TEMPORAL = {"DA": valuerep.DA, "DT": valuerep.DT, "TM": valuerep.TM}


def _invalid_temporal(dataset: Dataset) -> list[str]:
    """Keywords of top-level DA/DT/TM attributes whose value is no date or time.

    De-identification by hashing puts UUIDs in Patient Birth Date, Study Date and Content
    Date (the real chest CT in ``../shared/data``); highdicom copies patient and study
    attributes into the SR and SEG and refuses such a value, which would fail the analysis
    after the model has run. They are written empty (all are Type 2 or optional there).
    """
    bad: list[str] = []
    for tag in list(dataset.keys()):
        # The VR from the raw element or the dictionary, so that only the few DA/DT/TM
        # values are converted (iterating the dataset converts every value: seconds for
        # 600 headers per analysis on a loaded CPU).
        vr = dataset.get_item(tag).VR
        if vr is None:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
        if vr not in _TEMPORAL:
            continue
        element = dataset[tag]
        if element.VR not in _TEMPORAL or element.value in (None, ""):
            continue
        values = element.value if element.VM > 1 else [element.value]
        try:
            for value in values:
                if not isinstance(value, date | time | datetime):
                    _TEMPORAL[element.VR](str(value))
        except (ValueError, TypeError, OverflowError):
            bad.append(element.keyword)
    return bad


_ENUMERATED = {"PatientSex": {"M", "F", "O"}}
"""Attributes highdicom checks against their enumerated values when it copies them."""


def _invalid_enumerated(dataset: Dataset) -> list[str]:
    """Keywords of copied attributes whose value is none of the standard's (a hash in
    Patient's Sex, as the de-identified real chest CT has)."""
    return [keyword for keyword, allowed in _ENUMERATED.items()
            if dataset.get(keyword) not in (None, "") and str(dataset.get(keyword)) not in allowed]


def complete_type2(dataset: Dataset) -> Dataset:
    """``dataset`` itself when it has every Type 2 attribute highdicom reads and only valid
    dates and times, else a copy with the missing ones present and empty and the unreadable
    dates, times and enumerated values emptied (:func:`_invalid_temporal`,
    :func:`_invalid_enumerated`)."""
    missing = [kw for kw in _TYPE2_FROM_SOURCE if kw not in dataset]
    invalid = _invalid_temporal(dataset) + _invalid_enumerated(dataset)
    if not missing and not invalid:
        return dataset
    patched = copy.deepcopy(dataset)
    for keyword in missing + invalid:
        setattr(patched, keyword, "")
    if invalid:
        logger.debug("source %s: unreadable %s emptied in the result objects",
                       dataset.get("SOPInstanceUID"), ", ".join(invalid))
    return patched


@dataclass(frozen=True)
class SourceImages:
    """The source headers in the order the SEG's frames must follow.

    ``datasets``: for single-frame series, one header per z slice in volume order; for a
    multi-frame source, the single header. ``z_order``: for multi-frame sources the volume z
    index of each source frame (frame ``i + 1`` is ``volume[z_order[i]]``), else ``None``.
    """

    datasets: list[Dataset]
    z_order: list[int] | None


def source_images(volume: Volume) -> SourceImages:
    """Order the volume's pixel-stripped headers to correspond slice-for-slice with ``hu``."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.headers}
    n_slices = volume.shape[0]
    if len(volume.sop_instance_uids) != n_slices:
        raise ResultBuildError(
            f"volume has {n_slices} slices but {len(volume.sop_instance_uids)} source UIDs")
    if getattr(volume, "resampled", False):
        # Slices map to their *nearest* source slice, so UIDs repeat: the SEG then takes its
        # geometry from the volume, and the sources are just the distinct headers.
        distinct = list(dict.fromkeys(volume.sop_instance_uids))
        missing = [uid for uid in distinct if uid not in by_uid]
        if missing:
            raise ResultBuildError(f"no header for source instance {missing[0]}")
        return SourceImages(datasets=[complete_type2(by_uid[uid]) for uid in distinct],
                            z_order=None)
    multi = any(f is not None for f in volume.frame_numbers)
    if not multi:
        try:
            ordered = [complete_type2(by_uid[uid]) for uid in volume.sop_instance_uids]
        except KeyError as exc:
            raise ResultBuildError(f"no header for source instance {exc.args[0]}") from exc
        if len({str(ds.SOPInstanceUID) for ds in ordered}) != n_slices:
            raise ResultBuildError("a source instance appears at more than one z index")
        return SourceImages(datasets=ordered, z_order=None)
    uids = set(volume.sop_instance_uids)
    if len(uids) != 1:
        raise ResultBuildError("multi-frame source spanning several instances is not supported")
    header = by_uid.get(next(iter(uids)))
    if header is None:
        raise ResultBuildError("no header for the multi-frame source instance")
    n_frames = int(getattr(header, "NumberOfFrames", n_slices))
    frames = [f for f in volume.frame_numbers if f is not None]
    if len(frames) != n_slices or sorted(frames) != list(range(1, n_frames + 1)):
        raise ResultBuildError("volume does not cover every frame of the multi-frame source once")
    z_order = [0] * n_frames
    for z, frame in enumerate(frames):
        z_order[frame - 1] = z
    return SourceImages(datasets=[complete_type2(header)], z_order=z_order)


def headers_for_slices(volume: Volume, z_indices: Sequence[int]) -> list[Dataset]:
    """Distinct source headers holding the given z slices, in z order (for SR references)."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in volume.headers}
    seen: dict[str, Dataset] = {}
    for z in sorted(set(z_indices)):
        uid = volume.sop_instance_uids[z]
        if uid in by_uid and uid not in seen:
            seen[uid] = by_uid[uid]
    return list(seen.values())
