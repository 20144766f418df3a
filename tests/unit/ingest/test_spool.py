"""The durable spool: layout, duplicates, refusal when full or unwritable, maintenance."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.ingest.spool import (
    PARTIAL_SUFFIX,
    QUARANTINE_DIR,
    Spool,
    SpoolError,
    SpoolFullError,
    StoreOutcome,
    path_component,
)

STUDY, SERIES, SOP = "1.2.3", "1.2.3.4", "1.2.3.4.5"


@pytest.fixture(params=["tmpfile", "named-partial", "tmpfile-fsync-directory"])
def spool(request: pytest.FixtureRequest, tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool", fsync_directory=request.param.endswith("directory"))
    spool.prepare()
    spool._use_tmpfile = request.param.startswith("tmpfile") and spool._use_tmpfile
    return spool


def test_layout_and_bytes_as_given(spool: Spool) -> None:
    data = os.urandom(10_000)
    stored = spool.store(STUDY, SERIES, SOP, data)
    assert stored.outcome is StoreOutcome.NEW
    assert stored.relative_path == f"{STUDY}/{SERIES}/{SOP}.dcm"
    assert spool.path(stored.relative_path).read_bytes() == data
    assert stored.size == len(data)
    # Nothing else left behind: no partial file, no stray names.
    assert sorted(p.name for p in (spool.root / STUDY / SERIES).iterdir()) == [f"{SOP}.dcm"]


def test_same_bytes_twice_is_one_file(spool: Spool) -> None:
    data = b"A" * 5000
    first = spool.store(STUDY, SERIES, SOP, data)
    again = spool.store(STUDY, SERIES, SOP, data)
    assert again.outcome is StoreOutcome.SAME
    assert again.relative_path == first.relative_path
    assert again.sha256 == hashlib.sha256(data).hexdigest()
    assert len(list((spool.root / STUDY / SERIES).iterdir())) == 1


def test_different_bytes_same_uid_are_both_kept(spool: Spool) -> None:
    first, second = b"A" * 5000, b"B" * 5000
    spool.store(STUDY, SERIES, SOP, first)
    conflict = spool.store(STUDY, SERIES, SOP, second)
    digest = hashlib.sha256(second).hexdigest()
    assert conflict.outcome is StoreOutcome.CONFLICT
    assert conflict.relative_path == f"{STUDY}/{SERIES}/{SOP}.{digest[:8]}.dcm"
    assert spool.path(conflict.relative_path).read_bytes() == second
    assert (spool.root / STUDY / SERIES / f"{SOP}.dcm").read_bytes() == first
    # The conflicting copy sent once more is recognised, not stored a third time.
    assert spool.store(STUDY, SERIES, SOP, second).outcome is StoreOutcome.SAME
    assert len(list(spool.iter_instance_files(spool.root / STUDY / SERIES))) == 2


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2.3/../../x", ".hidden", "1.2.abc",
                                 "", "9" * 65])
def test_unsafe_uids_never_leave_the_spool(spool: Spool, uid: str) -> None:
    stored = spool.store(uid, uid, uid, b"x")
    target = spool.path(stored.relative_path).resolve()
    assert spool.root in target.parents
    assert all(part.startswith("x") and len(part) == 41
               for part in stored.relative_path.removesuffix(".dcm").split("/"))
    assert path_component("1.2.840.10008") == "1.2.840.10008"


def test_reserve_below_free_space_refuses(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", min_free_bytes=1 << 62)
    spool.prepare()
    with pytest.raises(SpoolFullError):
        spool.store(STUDY, SERIES, SOP, b"x")
    assert not (spool.root / STUDY).exists() or not any((spool.root / STUDY).rglob("*.dcm"))


def test_directory_removed_under_the_spool_is_recreated(spool: Spool) -> None:
    import shutil

    spool.store(STUDY, SERIES, SOP, b"x")
    shutil.rmtree(spool.root / STUDY)
    stored = spool.store(STUDY, SERIES, SOP + ".6", b"y")
    assert spool.path(stored.relative_path).read_bytes() == b"y"


def test_old_partials_are_removed_young_ones_kept(spool: Spool) -> None:
    spool.store(STUDY, SERIES, SOP, b"x")
    series_dir = spool.root / STUDY / SERIES
    old = series_dir / f".{SOP}.abc{PARTIAL_SUFFIX}"
    young = series_dir / f".{SOP}.def{PARTIAL_SUFFIX}"
    old.write_bytes(b"partial")
    young.write_bytes(b"partial")
    past = time.time() - 3600
    os.utime(old, (past, past))
    assert spool.remove_partials(older_than_s=600) == 1
    assert not old.exists() and young.exists()
    assert [p.name for p in spool.iter_instance_files(series_dir)] == [f"{SOP}.dcm"]


def test_quarantine_keeps_the_file_and_the_reason(spool: Spool) -> None:
    stored = spool.store(STUDY, SERIES, SOP, b"junk")
    moved = spool.quarantine(spool.path(stored.relative_path), "unreadable header")
    assert moved.parent == spool.root / QUARANTINE_DIR
    assert moved.read_bytes() == b"junk"
    assert "unreadable header" in moved.with_suffix(".dcm.reason").read_text()
    assert list(spool.iter_series_dirs()) == [spool.root / STUDY / SERIES]


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {result.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_filesystem_is_a_spool_error_and_leaves_no_file(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=256k") as mount:
        spool = Spool(mount / "spool")
        spool.prepare()
        spool.store(STUDY, SERIES, SOP, b"x" * 100_000)
        with pytest.raises(SpoolError) as info:
            for index in range(10):
                spool.store(STUDY, SERIES, f"{SOP}.{index}", b"y" * 100_000)
        assert info.value.errno == errno.ENOSPC
        names = [p.name for p in (spool.root / STUDY / SERIES).iterdir()]
        # Every file under a final name is complete; nothing half-written is left.
        for name in names:
            assert not name.endswith(PARTIAL_SUFFIX)
            assert (spool.root / STUDY / SERIES / name).stat().st_size in (100_000,)


def test_read_only_filesystem_is_a_spool_error(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "size=1m") as mount:
        spool = Spool(mount / "spool")
        spool.prepare()
        spool.store(STUDY, SERIES, SOP, b"x")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        with pytest.raises(SpoolError) as info:
            spool.store(STUDY, SERIES, SOP + ".1", b"y")
        assert info.value.errno == errno.EROFS
        with pytest.raises(SpoolError):
            Spool(mount / "spool").prepare()
