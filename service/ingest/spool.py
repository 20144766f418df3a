"""The durable spool: one file per received instance, written before the C-STORE is answered.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, each file the
instance exactly as received (preamble, file meta, dataset bytes in the transfer syntax of the
association). A second instance with the same SOP Instance UID but different bytes is kept
beside the first as ``<SOPInstanceUID>.<sha256[:8]>.dcm``; the same bytes again are not
written twice.

Durability protocol, per instance: the bytes go to an unnamed file in the series directory
(``O_TMPFILE``; a hidden ``.<name>.<token>.part`` file where the filesystem has no
``O_TMPFILE``), are linked under their final name with ``link(2)`` (atomic, and unlike
``rename(2)`` it never replaces an existing file, which is what duplicate handling needs), and
then one ``fsync`` of the file makes data and name durable together: on ext4, XFS and btrfs
the link changed the inode in the same journal transaction as the directory entry, and the
fsync commits that transaction after writing the data (NFS link is synchronous anyway). With
``fsync_directory`` (``TRIAGE_SPOOL_FSYNC_DIRECTORY``) the POSIX-strict order is used
instead: fsync the file, link, fsync the directory - two journal commits per instance. Only
after that may the SCP answer Success.

A crash between the link and the fsync can leave a file under its final name whose tail never
reached the disk; it was never acknowledged, and the rebuild at the next start checks every
file it does not know with the same structural walk as the SCP and quarantines such a file.

Names that are not plain dotted-decimal UIDs (non-conformant senders) are replaced by a hash so
no peer can steer a path outside the spool.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

logger = logging.getLogger(__name__)

INSTANCE_SUFFIX = ".dcm"
PARTIAL_SUFFIX = ".part"
QUARANTINE_DIR = ".quarantine"
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)


class StoreOutcome(StrEnum):
    NEW = "new"
    """A new file under the instance's name."""
    SAME = "same"
    """These exact bytes were already in the spool: nothing written, counted once."""
    CONFLICT = "conflict"
    """Same SOP Instance UID as a stored instance but different bytes: kept beside it."""


class SpoolError(OSError):
    """The instance could not be made durable (C-STORE status 0xA700, out of resources)."""


class SpoolFullError(SpoolError):
    """Free space on the spool filesystem is below the configured reserve."""


@dataclass(frozen=True, slots=True)
class StoredFile:
    relative_path: str
    """POSIX path relative to the spool root."""
    size: int
    outcome: StoreOutcome
    sha256: str | None
    """Known when duplicates had to be compared; otherwise ``None`` (the bookkeeper hashes)."""


def path_component(uid: str) -> str:
    """A file-system-safe name for a UID: the UID itself when it is dotted decimal."""
    if _UID_RE.fullmatch(uid) and len(uid) <= 64:
        return uid
    return "x" + hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Spool:
    """The spool directory. Thread-safe; several processes may share one spool directory."""

    def __init__(self, root: Path, min_free_bytes: int = 0, *,
                 fsync_directory: bool = False) -> None:
        self.root = root.resolve()
        self.min_free_bytes = min_free_bytes
        self.fsync_directory = fsync_directory
        self._known_dirs: set[Path] = set()
        self._dir_lock = threading.Lock()
        self._use_tmpfile = bool(_O_TMPFILE) and Path("/proc/self/fd").is_dir()

    # --- writing -------------------------------------------------------------------------
    def prepare(self) -> None:
        """Create the root and prove it writable; raises :class:`SpoolError` otherwise."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise SpoolError(exc.errno or errno.EIO, f"spool {self.root} not writable: {exc}") \
                from exc

    def free_bytes(self) -> int:
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> StoredFile:
        """Make ``data`` durable under the instance's name; raises :class:`SpoolError`.

        Returns only after the bytes and the directory entry are on stable storage.
        """
        try:
            if self.min_free_bytes and self.free_bytes() < self.min_free_bytes + len(data):
                raise SpoolFullError(errno.ENOSPC,
                                     f"spool free space below reserve of {self.min_free_bytes} B")
            series_dir = self._series_dir(study_uid, series_uid)
            try:
                return self._store_in(series_dir, path_component(sop_uid), data)
            except FileNotFoundError:
                # The directory went away under us (retention cleanup): create it again.
                self._known_dirs.discard(series_dir)
                series_dir = self._series_dir(study_uid, series_uid)
                return self._store_in(series_dir, path_component(sop_uid), data)
        except SpoolError:
            raise
        except OSError as exc:
            raise SpoolError(exc.errno or errno.EIO, f"spool write failed: {exc}") from exc

    def _series_dir(self, study_uid: str, series_uid: str) -> Path:
        series_dir = self.root / path_component(study_uid) / path_component(series_uid)
        if series_dir in self._known_dirs:
            return series_dir
        with self._dir_lock:
            for directory in (series_dir.parent, series_dir):
                try:
                    directory.mkdir()
                except FileExistsError:
                    continue
                # A new directory entry must itself be durable before a file inside it is.
                _fsync_dir(directory.parent)
            self._known_dirs.add(series_dir)
        return series_dir

    def _store_in(self, series_dir: Path, name: str, data: bytes) -> StoredFile:
        dir_fd = os.open(series_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            return self._write_and_link(dir_fd, series_dir, name, data)
        finally:
            os.close(dir_fd)

    def _write_and_link(self, dir_fd: int, series_dir: Path, name: str,
                        data: bytes) -> StoredFile:
        partial: str | None = None
        fd = -1
        if self._use_tmpfile:
            try:
                fd = os.open(".", _O_TMPFILE | os.O_WRONLY, 0o640, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                logger.info("no O_TMPFILE on %s: using named partial files", self.root)
                self._use_tmpfile = False
        if fd < 0:
            partial = f".{name}.{secrets.token_hex(6)}{PARTIAL_SUFFIX}"
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640, dir_fd=dir_fd)
        try:
            _write_all(fd, data)
            if self.fsync_directory:
                os.fsync(fd)
            # linkat(AT_SYMLINK_FOLLOW) on /proc/self/fd/N names the anonymous file; the
            # dir_fd argument makes CPython use linkat rather than link, which would not follow.
            source = f"/proc/self/fd/{fd}" if partial is None else partial
            stored = self._publish(source, dir_fd, series_dir, name, data)
            if stored.outcome is StoreOutcome.SAME:
                # The earlier copy may still be on its way to disk (a concurrent duplicate).
                self._fsync_existing(dir_fd, stored.relative_path.rsplit("/", 1)[-1])
            elif self.fsync_directory:
                os.fsync(dir_fd)
            else:
                # One journal commit makes the data and the new name durable together.
                os.fsync(fd)
            return stored
        finally:
            os.close(fd)
            if partial is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial, dir_fd=dir_fd)

    @staticmethod
    def _fsync_existing(dir_fd: int, file_name: str) -> None:
        fd = os.open(file_name, os.O_RDONLY, dir_fd=dir_fd)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _publish(self, source: str, dir_fd: int, series_dir: Path, name: str,
                 data: bytes) -> StoredFile:
        """Link the written file under its final name, resolving an existing one."""
        final = f"{name}{INSTANCE_SUFFIX}"
        if self._link(source, final, dir_fd):
            return StoredFile(self._relative(series_dir / final), len(data), StoreOutcome.NEW,
                              None)
        digest = hashlib.sha256(data).hexdigest()
        for candidate in (final, f"{name}.{digest[:8]}{INSTANCE_SUFFIX}",
                          f"{name}.{digest}{INSTANCE_SUFFIX}"):
            relative = self._relative(series_dir / candidate)
            if candidate != final and self._link(source, candidate, dir_fd):
                logger.warning("duplicate SOP Instance UID with different bytes kept as %s",
                               relative)
                return StoredFile(relative, len(data), StoreOutcome.CONFLICT, digest)
            if sha256_file(series_dir / candidate) == digest:
                return StoredFile(relative, len(data), StoreOutcome.SAME, digest)
        raise SpoolError(errno.EEXIST, f"cannot place duplicate of {name}")  # pragma: no cover

    @staticmethod
    def _link(source: str, target: str, dir_fd: int) -> bool:
        try:
            os.link(source, target, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=True)
        except FileExistsError:
            return False
        return True

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    # --- reading and maintenance -----------------------------------------------------------
    def path(self, relative_path: str) -> Path:
        return self.root / relative_path

    def iter_series_dirs(self) -> Iterator[Path]:
        """Every ``<study>/<series>`` directory (hidden entries skipped)."""
        if not self.root.is_dir():
            return
        for study_dir in sorted(self.root.iterdir()):
            if study_dir.name.startswith(".") or not study_dir.is_dir():
                continue
            for series_dir in sorted(study_dir.iterdir()):
                if not series_dir.name.startswith(".") and series_dir.is_dir():
                    yield series_dir

    def iter_instance_files(self, series_dir: Path) -> Iterator[Path]:
        for entry in sorted(series_dir.iterdir()):
            if not entry.name.startswith(".") and entry.name.endswith(INSTANCE_SUFFIX) \
                    and entry.is_file():
                yield entry

    def remove_partials(self, older_than_s: float = 600.0) -> int:
        """Delete leftover ``.part`` files of unacknowledged instances.

        Only files older than ``older_than_s`` go, so a partial another live process is
        writing right now (shared spool) is left alone.
        """
        removed = 0
        cutoff = time.time() - older_than_s
        for series_dir in self.iter_series_dirs():
            for entry in series_dir.iterdir():
                if entry.name.startswith(".") and entry.name.endswith(PARTIAL_SUFFIX):
                    try:
                        if entry.stat().st_mtime < cutoff:
                            entry.unlink()
                            removed += 1
                    except FileNotFoundError:
                        continue
        if removed:
            logger.info("removed %d partial spool files of unacknowledged instances", removed)
        return removed

    def quarantine(self, path: Path, reason: str) -> Path:
        """Move an unreadable file out of the way (kept, never deleted) and say why."""
        target_dir = self.root / QUARANTINE_DIR
        target_dir.mkdir(exist_ok=True)
        target = target_dir / f"{int(time.time())}-{secrets.token_hex(4)}-{path.name}"
        os.replace(path, target)
        target.with_suffix(target.suffix + ".reason").write_text(reason + "\n")
        logger.warning("quarantined spool file %s: %s", target.name, reason)
        return target
