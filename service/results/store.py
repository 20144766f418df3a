"""Result objects on disk, under ``settings.results_path``.

Layout: ``<results>/<source series UID>/<model version>/<object kind>.dcm``: derived from UIDs
and versions only (no patient data in paths); the same analysis always maps to the same
files, so a rebuild replaces them. Writes are atomic (temporary file, fsync, rename): the
export task never reads a half-written object.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from pydicom import Dataset, dcmread

from service.config import Settings
from service.results.uids import ObjectKind

logger = logging.getLogger(__name__)

_SAFE = re.compile(r"[^A-Za-z0-9._-]")


@dataclass(frozen=True)
class StoredObject:
    """A result object written to the store: what the export needs without reading it."""

    kind: ObjectKind
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    size_bytes: int


class ResultStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    @classmethod
    def from_settings(cls, settings: Settings) -> ResultStore:
        return cls(settings.results_path)

    def path_for(self, source_series_uid: str, model_version: str, kind: ObjectKind) -> Path:
        return (self.root / _SAFE.sub("_", source_series_uid) / _SAFE.sub("_", model_version)
                / f"{kind.value}.dcm")

    def write(self, dataset: Dataset, *, kind: ObjectKind, source_series_uid: str,
              model_version: str) -> StoredObject:
        """Write ``dataset`` as a DICOM file (with file meta) atomically; replaces any previous."""
        path = self.path_for(source_series_uid, model_version, kind)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{kind.value}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                dataset.save_as(handle, enforce_file_format=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        stored = StoredObject(
            kind=kind,
            path=path,
            sop_class_uid=str(dataset.SOPClassUID),
            sop_instance_uid=str(dataset.SOPInstanceUID),
            series_instance_uid=str(dataset.SeriesInstanceUID),
            study_instance_uid=str(dataset.StudyInstanceUID),
            transfer_syntax_uid=str(dataset.file_meta.TransferSyntaxUID),
            size_bytes=path.stat().st_size,
        )
        logger.info("stored %s %s (%d bytes)", kind.value, stored.sop_instance_uid,
                    stored.size_bytes)
        return stored

    @staticmethod
    def read(path: Path) -> Dataset:
        return dcmread(path)
