"""One call for the worker: build every result object an analysis needs, and store them.

Which objects: for each SEG format some destination wants (BINARY always, for the default
and STOW-RS; LABELMAP when a destination asks for it) a SEG and the SR that references it;
plus the Secondary Capture key image when ``settings.secondary_capture`` is on and a
vertebra is suspected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from pydicom import Dataset

from service.config import PacsDestination, SegEncoding, SegFormat, Settings
from service.findings import Findings
from service.imaging.volume import Volume
from service.results.common import AlgorithmInfo
from service.results.keyimage import build_key_image
from service.results.seg import build_segmentation, seg_kind, transfer_syntax_for
from service.results.sr import build_report, sr_kind
from service.results.store import ResultStore, StoredObject
from service.results.uids import ObjectKind

logger = logging.getLogger(__name__)


def seg_formats_needed(settings: Settings) -> list[SegFormat]:
    """BINARY always; LABELMAP only when a destination is configured for it."""
    formats = {SegFormat.BINARY} | {d.seg_format for d in settings.pacs_destinations}
    return sorted(formats, key=lambda f: f.value)


def kinds_for(seg_format: SegFormat, *, secondary_capture: bool) -> list[ObjectKind]:
    """Objects one destination receives, in sending order (SEG before the SR citing it)."""
    kinds = [seg_kind(seg_format), sr_kind(seg_format)]
    if secondary_capture:
        kinds.append(ObjectKind.KEY_IMAGE)
    return kinds


def kinds_for_destination(destination: PacsDestination, settings: Settings) -> list[ObjectKind]:
    return kinds_for(destination.seg_format, secondary_capture=settings.secondary_capture)


def build_results(
    volume: Volume,
    findings: Findings,
    *,
    uid_root: str,
    algorithm: AlgorithmInfo | None = None,
    seg_formats: Iterable[SegFormat] = (SegFormat.BINARY,),
    secondary_capture: bool = False,
    seg_encoding: SegEncoding = SegEncoding.NATIVE,
) -> dict[ObjectKind, Dataset]:
    """Build the objects in memory (highdicom datasets), keyed by kind."""
    algorithm = algorithm or AlgorithmInfo(name=findings.model_name, version=findings.model_version)
    objects: dict[ObjectKind, Dataset] = {}
    for seg_format in seg_formats:
        segmentation = build_segmentation(
            volume, findings, uid_root=uid_root, algorithm=algorithm, seg_format=seg_format,
            transfer_syntax_uid=transfer_syntax_for(seg_format, seg_encoding))
        if segmentation is not None:
            objects[segmentation.kind] = segmentation.dataset
        objects[sr_kind(seg_format)] = build_report(
            volume, findings, uid_root=uid_root, algorithm=algorithm,
            segmentation=segmentation, seg_format=seg_format)
    if secondary_capture:
        key_image = build_key_image(volume, findings, uid_root=uid_root, algorithm=algorithm)
        if key_image is not None:
            objects[ObjectKind.KEY_IMAGE] = key_image
    return objects


def build_and_store(
    volume: Volume,
    findings: Findings,
    settings: Settings,
    *,
    algorithm: AlgorithmInfo | None = None,
    store: ResultStore | None = None,
) -> dict[ObjectKind, StoredObject]:
    """Build what the configured destinations need and write it to the result store."""
    store = store or ResultStore.from_settings(settings)
    objects = build_results(
        volume, findings, uid_root=settings.uid_root, algorithm=algorithm,
        seg_formats=seg_formats_needed(settings), secondary_capture=settings.secondary_capture,
        seg_encoding=settings.seg_encoding)
    return {
        kind: store.write(dataset, kind=kind, source_series_uid=findings.series_instance_uid,
                          model_version=findings.model_version)
        for kind, dataset in objects.items()
    }
