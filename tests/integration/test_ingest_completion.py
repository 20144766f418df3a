"""Series completion over the network, per signal (issue 22), against the real SCP process.

DCMTK storescu sends where the sender matters (associations, releases); an MPPS N-CREATE and
N-SET come from a pynetdicom requestor, as a modality sends them. Each test sets the release
timer far above its own wait where an early signal is what is tested, so the recorded
``completion_reason`` says which signal completed the series; no test asserts a duration.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from sqlalchemy import func, select

from harness.data.ctdata import SeriesSpec, WrittenSeries, write_series
from harness.peers.dicom import Scu, storescu
from harness.process import wait_until
from service.config import Settings
from service.db import migrate
from service.db.tables import Analysis, Series, SeriesState
from service.dicom.runner import IngestNode

pytestmark = pytest.mark.slow

MPPS_CLASS = "1.2.840.10008.3.1.2.3.3"
SLICES = 60


def make_node(url: str, tmp_path: Path, *, idle_after_release_s: float) -> IngestNode:
    settings = Settings(data_dir=tmp_path / "var", database_url=url, spool_min_free_mb=0,
                        completion_idle_after_release_s=idle_after_release_s,
                        completion_idle_s=600.0, tracker_interval_s=0.2,
                        broker_url="redis://127.0.0.1:1/0", broker_connect_timeout_s=0.3)
    migrate.upgrade(settings.db_url)
    node = IngestNode(settings)
    node.start("127.0.0.1", 0)
    return node


@pytest.fixture
def nodes(migrated_url: str, tmp_path: Path) -> Iterator[list[IngestNode]]:
    started: list[IngestNode] = []
    yield started
    for node in started:
        node.stop(grace_s=5)


def decided(node: IngestNode) -> Series | None:
    assert node.session_factory is not None
    with node.session_factory() as session:
        series = session.execute(select(Series)).scalar_one_or_none()
    done = series is not None and series.state != SeriesState.RECEIVING \
        and series.qualified is not None
    return series if done else None


def analyses(node: IngestNode) -> int:
    assert node.session_factory is not None
    with node.session_factory() as session:
        return int(session.execute(select(func.count(Analysis.id))).scalar_one())


def send(node: IngestNode, files: list[Path]) -> None:
    assert node.scp is not None
    result = storescu(node.scp.port, files)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("hint", [None, SLICES], ids=["no-hint", "images-in-acquisition"])
def test_series_in_two_associations_with_a_pause_is_not_cut_short(
        migrated_url: str, tmp_path: Path, nodes: list[IngestNode], hint: int | None) -> None:
    """The first association leaves a complete, gap-free stack of half the slices; the second,
    after a pause, continues it. Without a hint only the release timer may complete it; with
    Images in Acquisition the count does, once every slice is here."""
    node = make_node(migrated_url, tmp_path, idle_after_release_s=8.0)
    nodes.append(node)
    written = write_series(tmp_path / "ct", SeriesSpec(slices=SLICES,
                                                       images_in_acquisition=hint))
    send(node, written.paths[:SLICES // 2])
    time.sleep(2.0)  # the pause: longer than a tracker tick, shorter than the release timer
    assert decided(node) is None, "completed after the first association"
    send(node, written.paths[SLICES // 2:])
    series = wait_until(lambda: decided(node), 60, 0.2, "the series to be decided")
    assert series.instance_count == SLICES and series.reopened_count == 0
    assert series.completion_reason == ("expected_count" if hint else "association_idle")
    assert series.qualified is True, series.qualification_detail
    assert analyses(node) == 1


def test_images_in_acquisition_completes_when_the_count_is_reached(
        migrated_url: str, tmp_path: Path, nodes: list[IngestNode]) -> None:
    node = make_node(migrated_url, tmp_path, idle_after_release_s=600.0)
    nodes.append(node)
    written = write_series(tmp_path / "ct", SeriesSpec(slices=SLICES,
                                                       images_in_acquisition=SLICES))
    send(node, written.paths)
    series = wait_until(lambda: decided(node), 60, 0.2, "the count to complete the series")
    assert series.completion_reason == "expected_count" and series.instance_count == SLICES


def test_wrong_images_in_acquisition_is_repaired_by_reopening(
        migrated_url: str, tmp_path: Path, nodes: list[IngestNode]) -> None:
    """Images in Acquisition of half the series (two acquisitions in one series): the first
    half is a complete stack of the hinted count, so it completes; the rest reopens the
    series, the count is now above the hint, the hint is set aside and the release timer
    completes the whole series, whose analysis supersedes the first."""
    node = make_node(migrated_url, tmp_path, idle_after_release_s=2.0)
    nodes.append(node)
    written = write_series(tmp_path / "ct", SeriesSpec(slices=SLICES,
                                                       images_in_acquisition=SLICES // 2))
    send(node, written.paths[:SLICES // 2])
    first = wait_until(lambda: decided(node), 60, 0.2, "the first half to complete")
    assert first.completion_reason == "expected_count"
    send(node, written.paths[SLICES // 2:])
    series = wait_until(lambda: (s if (s := decided(node)) and s.instance_count == SLICES
                                 else None), 60, 0.2, "the whole series to complete")
    assert series.reopened_count == 1 and series.completion_reason == "association_idle"
    assert analyses(node) == 2


def _mpps_create(study_uid: str) -> Dataset:
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.Modality = "CT"
    ds.PerformedProcedureStepID = "PPS1"
    step = Dataset()
    step.StudyInstanceUID = study_uid
    ds.ScheduledStepAttributesSequence = DicomSequence([step])
    ds.PerformedSeriesSequence = DicomSequence([])
    return ds


def _mpps_completed(written: WrittenSeries) -> Dataset:
    series = Dataset()
    series.SeriesInstanceUID = written.spec.series_uid
    refs = []
    for uid in written.sop_uids:
        ref = Dataset()
        ref.ReferencedSOPClassUID = written.spec.sop_class_uid
        ref.ReferencedSOPInstanceUID = uid
        refs.append(ref)
    series.ReferencedImageSequence = DicomSequence(refs)
    ds = Dataset()
    ds.PerformedProcedureStepStatus = "COMPLETED"
    ds.PerformedSeriesSequence = DicomSequence([series])
    return ds


def test_mpps_completed_completes_at_once(migrated_url: str, tmp_path: Path,
                                          nodes: list[IngestNode]) -> None:
    """No count hint, release timer out of reach: the MPPS N-SET COMPLETED that lists every
    instance completes the series."""
    node = make_node(migrated_url, tmp_path, idle_after_release_s=600.0)
    nodes.append(node)
    assert node.scp is not None
    written = write_series(tmp_path / "ct", SeriesSpec(slices=SLICES))
    mpps_uid = generate_uid()
    assoc = Scu(node.scp.port, calling="MODALITY").associate(
        [(MPPS_CLASS, ExplicitVRLittleEndian)])
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_create(_mpps_create(written.spec.study_uid), MPPS_CLASS,
                                        mpps_uid)
        assert status.Status == 0x0000
        send(node, written.paths)
        time.sleep(1.0)
        assert decided(node) is None  # nothing says it is complete yet
        status, _ = assoc.send_n_set(_mpps_completed(written), MPPS_CLASS, mpps_uid)
        assert status.Status == 0x0000
    finally:
        assoc.release()
    series = wait_until(lambda: decided(node), 60, 0.2, "the MPPS to complete the series")
    assert series.completion_reason == "mpps" and series.instance_count == SLICES
    assert analyses(node) == 1
