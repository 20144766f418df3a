"""Deterministic UIDs for result objects.

A result UID is a function of (configured root, source Series Instance UID, model version,
object kind): rebuilding the same analysis gives the same SOP Instance and Series Instance
UIDs, so a re-run or a re-send replaces the object in the PACS instead of duplicating it.

The digits after the root come from a SHA-512 of the parts (pydicom's ``generate_uid`` with
explicit entropy), truncated to the 64-character UID limit; with the default 29-character
root that leaves 35 decimal digits (~116 bits), ample against collisions.
"""

from __future__ import annotations

import logging
from enum import StrEnum

from pydicom.uid import UID, generate_uid

logger = logging.getLogger(__name__)

_SEPARATOR = "\x1f"  # unit separator: never part of a UID or version string


class ObjectKind(StrEnum):
    """The result objects we create; the value is stored in ``Export.object_kind``.

    The LABELMAP variants are distinct objects (different SOP class), so they get their own
    UIDs, and so does the SR that references a LABELMAP SEG: a destination always receives
    an SR whose referenced segmentation it also receives.
    """

    SR = "SR"
    SEG = "SEG"
    SR_LABELMAP = "SR-LABELMAP"
    SEG_LABELMAP = "SEG-LABELMAP"
    KEY_IMAGE = "SC"


def derive_uid(root: str, *parts: str) -> UID:
    """A UID under ``root`` determined by ``parts`` alone (same parts, same UID)."""
    if not root.endswith("."):
        raise ValueError("UID root must end with '.'")
    if any(_SEPARATOR in part for part in parts):
        raise ValueError("UID parts must not contain the unit separator")
    uid = generate_uid(prefix=root, entropy_srcs=[_SEPARATOR.join(parts)])
    if not uid.is_valid:
        raise ValueError(f"derived UID {uid!r} is not valid (root too long?)")
    return uid


def sop_instance_uid(root: str, source_series_uid: str, model_version: str,
                     kind: ObjectKind | str) -> UID:
    """SOP Instance UID of one result object."""
    return derive_uid(root, "instance", source_series_uid, model_version, str(kind))


def series_instance_uid(root: str, source_series_uid: str, model_version: str,
                        kind: ObjectKind | str) -> UID:
    """Series Instance UID of the result series that holds the object of ``kind``.

    SR and SEG must be in different series (Modality is a series attribute).
    """
    return derive_uid(root, "series", source_series_uid, model_version, str(kind))


def tracking_uid(root: str, source_series_uid: str, model_version: str, finding: str) -> UID:
    """Tracking Unique Identifier of one finding (e.g. ``"C3"`` or ``"patient"``) in the SR."""
    return derive_uid(root, "tracking", source_series_uid, model_version, finding)


def device_uid(root: str, model_name: str, model_version: str) -> UID:
    """Device Observer UID of the algorithm: one per model name and version, not per study."""
    return derive_uid(root, "device", model_name, model_version)
