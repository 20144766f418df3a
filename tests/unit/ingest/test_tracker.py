"""Completeness, qualification, analysis creation and enqueue, across processes' worth of
trackers sharing one database (SQLite and PostgreSQL)."""

from __future__ import annotations

import json
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from harness.data.ctdata import SeriesSpec
from service.db.tables import (
    Analysis,
    AnalysisState,
    MppsStatus,
    PerformedProcedureStep,
    PerformedProcedureStepReference,
    Series,
    SeriesState,
    Study,
)
from service.db.types import utcnow
from service.ingest.bookkeeper import write_batch
from service.ingest.dispatch import AnalysisDispatcher, input_fingerprint, model_version
from service.ingest.tracker import CompletionReason, SeriesProgress, Tracker, due_reason
from service.outcomes import SeriesReason
from service.queue import ANALYSIS_QUEUE, TASK_ANALYZE_SERIES
from tests.unit.ingest.conftest import IngestEnv

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def progress(**overrides: Any) -> SeriesProgress:
    values: dict[str, Any] = {"id": 1, "series_instance_uid": "1.2", "instance_count": 10,
                              "expected_instances": None, "last_received_at": T0,
                              "association_released_at": None}
    values.update(overrides)
    return SeriesProgress(**values)


def due(p: SeriesProgress, seconds: float, **kw: Any) -> CompletionReason | None:
    args: dict[str, Any] = {"expected_hint": None, "idle_after_release_s": 5.0,
                            "idle_s": 30.0}
    args.update(kw)
    return due_reason(p, T0 + timedelta(seconds=seconds), **args)


def test_due_reason_rules() -> None:
    assert due(progress(expected_instances=10), 0) is CompletionReason.EXPECTED_COUNT
    assert due(progress(expected_instances=11), 0) is None
    assert due(progress(), 0, expected_hint=10) is CompletionReason.EXPECTED_COUNT
    assert due(progress(), 0, mpps_complete=True) is CompletionReason.MPPS
    assert due(progress(expected_instances=10), 0, hint_set_aside=True) is None
    assert due(progress(expected_instances=10), 30, hint_set_aside=True) is CompletionReason.IDLE
    released = progress(association_released_at=T0 + timedelta(seconds=1))
    assert due(released, 5.9) is None  # 4.9 s after the release
    assert due(released, 6.0) is CompletionReason.ASSOCIATION_IDLE
    assert due(progress(), 29.9) is None  # open association: only the long idle applies
    assert due(progress(), 30.0) is CompletionReason.IDLE
    assert due(progress(instance_count=0, expected_instances=0), 100) is None


@dataclass
class FakeBroker:
    """Stands in for the Celery app: records what was sent, or fails like a dead broker."""

    down: bool = False
    sent: list[tuple[str, list[Any], str]] = field(default_factory=list)

    def send_task(self, name: str, args: list[Any], queue: str, retry: bool) -> Any:
        if self.down:
            from kombu.exceptions import OperationalError

            raise OperationalError("Error 111 connecting to broker. Connection refused.")
        self.sent.append((name, args, queue))
        return type("Result", (), {"id": uuid.uuid4().hex})()


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset


def make_tracker(env: IngestEnv, broker: FakeBroker, clock: Clock | None = None) -> Tracker:
    clock = clock or Clock()
    dispatcher = AnalysisDispatcher(env.factory, env.settings, app_factory=lambda: broker,
                                    clock=clock)
    return Tracker(env.factory, env.settings, env.spool, dispatcher=dispatcher, clock=clock)


def receive_series(env: IngestEnv, spec: SeriesSpec, indices: range | None = None,
                   association_id: str = "a1") -> list[Any]:
    items = [env.receive(spec, i, association_id=association_id)
             for i in (indices if indices is not None else range(spec.slices))]
    with env.factory() as session, session.begin():
        write_batch(session, items)
    return items


def series_row(env: IngestEnv, uid: str) -> Series:
    with env.factory() as session:
        return session.execute(select(Series).where(Series.series_instance_uid == uid)
                               ).scalar_one()


def analyses(env: IngestEnv) -> list[Analysis]:
    with env.factory() as session:
        return list(session.execute(select(Analysis).order_by(Analysis.id)).scalars())


def test_expected_count_completes_at_once_and_enqueues(ingest_env: IngestEnv) -> None:
    broker = FakeBroker()
    spec = SeriesSpec(slices=12, images_in_acquisition=12)
    items = receive_series(ingest_env, spec)
    report = make_tracker(ingest_env, broker).tick()
    assert report.completed and report.enqueued == 1
    series = series_row(ingest_env, spec.series_uid)
    assert series.state == SeriesState.QUEUED
    assert series.completion_reason == "expected_count"
    assert series.qualified and series.qualification_reason == SeriesReason.QUALIFIED.value
    assert series.completed_at is not None
    (analysis,) = analyses(ingest_env)
    assert analysis.state == AnalysisState.QUEUED and analysis.task_id
    assert analysis.model_version == "unknown"
    assert analysis.input_fingerprint == input_fingerprint(
        (i.sop_instance_uid, i.sha256) for i in items)
    assert broker.sent == [(TASK_ANALYZE_SERIES, [analysis.id], ANALYSIS_QUEUE)]
    with ingest_env.factory() as session:
        study = session.execute(select(Study)).scalar_one()
        assert study.selected_series_id == series.id
        assert "only qualifying series" in (study.selection_reason or "")


def test_broker_down_keeps_pending_then_sweep_enqueues(ingest_env: IngestEnv) -> None:
    broker = FakeBroker(down=True)
    spec = SeriesSpec(slices=12, images_in_acquisition=12)
    receive_series(ingest_env, spec)
    tracker = make_tracker(ingest_env, broker)
    report = tracker.tick()
    assert report.completed and report.enqueued == 0
    (analysis,) = analyses(ingest_env)
    assert analysis.state == AnalysisState.PENDING and analysis.task_id is None
    assert series_row(ingest_env, spec.series_uid).state == SeriesState.COMPLETE
    assert tracker.dispatcher.last_error and "Connection refused" in tracker.dispatcher.last_error
    broker.down = False
    tracker.dispatcher._broker_down_until = 0.0  # the retry interval has passed
    assert tracker.tick().enqueued == 1
    (analysis,) = analyses(ingest_env)
    assert analysis.state == AnalysisState.QUEUED and analysis.task_id
    assert series_row(ingest_env, spec.series_uid).state == SeriesState.QUEUED
    assert len(broker.sent) == 1


def test_only_one_of_many_trackers_completes_a_series(ingest_env: IngestEnv) -> None:
    broker = FakeBroker()
    spec = SeriesSpec(slices=12, images_in_acquisition=12)
    receive_series(ingest_env, spec)
    trackers = [make_tracker(ingest_env, broker) for _ in range(4)]
    reports: list[Any] = []
    barrier = threading.Barrier(len(trackers))

    def tick(tracker: Tracker) -> None:
        barrier.wait()
        reports.append(tracker.tick())

    threads = [threading.Thread(target=tick, args=(t,)) for t in trackers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(len(r.completed) for r in reports) == [0, 0, 0, 1]
    assert sum(len(r.analyses_created) for r in reports) == 1
    assert len(analyses(ingest_env)) == 1 and len(broker.sent) == 1


def test_instance_arriving_during_claim_prevents_completion(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=13, images_in_acquisition=12)
    receive_series(ingest_env, spec, range(12))
    tracker = make_tracker(ingest_env, FakeBroker())
    (seen, reason), = tracker.due()
    receive_series(ingest_env, spec, range(12, 13))  # lands between the read and the claim
    assert not tracker._claim(seen, reason)
    assert series_row(ingest_env, spec.series_uid).state == SeriesState.RECEIVING


def test_association_release_then_short_idle(ingest_env: IngestEnv) -> None:
    from service.ingest.bookkeeper import AssociationRecord

    clock = Clock()
    spec = SeriesSpec(slices=12)
    items = receive_series(ingest_env, spec, association_id="assoc-x")
    tracker = make_tracker(ingest_env, FakeBroker(), clock)
    assert tracker.tick().completed == []
    end = AssociationRecord("assoc-x", "SCU", "CSPINE_TRIAGE", "127.0.0.1", 1, items[0].received_at,
                           utcnow(), "released")
    with ingest_env.factory() as session, session.begin():
        write_batch(session, [end])
    assert tracker.tick().completed == []
    clock.offset = timedelta(seconds=ingest_env.settings.completion_idle_after_release_s + 0.5)
    assert tracker.tick().completed
    assert series_row(ingest_env, spec.series_uid).completion_reason == "association_idle"


def test_images_in_acquisition_not_trusted_over_a_gap(ingest_env: IngestEnv) -> None:
    """Images in Acquisition reached, but a slice of the stack is missing (it counts the
    acquisition, not the series): the hint is set aside and the release timer decides."""
    from service.ingest.bookkeeper import AssociationRecord

    clock = Clock()
    spec = SeriesSpec(slices=13, images_in_acquisition=12, skip_positions=(5,))
    items = receive_series(ingest_env, spec, [i for i in range(13) if i != 5],  # type: ignore[arg-type]
                           association_id="assoc-g")
    tracker = make_tracker(ingest_env, FakeBroker(), clock)
    assert tracker.tick().completed == []
    end = AssociationRecord("assoc-g", "SCU", "CSPINE_TRIAGE", "127.0.0.1", 1,
                            items[0].received_at, utcnow(), "released")
    with ingest_env.factory() as session, session.begin():
        write_batch(session, [end])
    assert tracker.tick().completed == []
    clock.offset = timedelta(seconds=ingest_env.settings.completion_idle_after_release_s + 0.5)
    assert tracker.tick().completed
    series = series_row(ingest_env, spec.series_uid)
    assert series.completion_reason == "association_idle"
    assert series.qualification_reason == SeriesReason.MISSING_SLICES.value


def test_images_in_acquisition_waits_for_the_count(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=12, images_in_acquisition=12)
    tracker = make_tracker(ingest_env, FakeBroker())
    receive_series(ingest_env, spec, range(6), association_id="first")
    assert tracker.tick().completed == []
    receive_series(ingest_env, spec, range(6, 12), association_id="second")
    assert tracker.tick().completed
    series = series_row(ingest_env, spec.series_uid)
    assert series.completion_reason == "expected_count" and series.instance_count == 12


def multiframe_dataset(spec: SeriesSpec, frames: int, *, concatenation: tuple[int, int] | None
                       = None, first_frame: int = 0) -> Any:
    """An enhanced-CT-like object: ``frames`` frames of ``spec``'s stack from ``first_frame``;
    ``concatenation`` = (in-concatenation number, total)."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage, generate_uid

    from harness.data.ctdata import ct_dataset

    ds = ct_dataset(spec, first_frame, with_pixels=False)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
                    "ImagesInAcquisition"):
        delattr(ds, keyword) if keyword in ds else None
    ds.NumberOfFrames = frames
    if concatenation is not None:
        ds.ConcatenationUID = "1.2.826.0.1.3680043.8.498.1"
        ds.InConcatenationNumber, ds.InConcatenationTotalNumber = concatenation
    orientation = Dataset()
    orientation.ImageOrientationPatient = list(spec.orientation)
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for k in range(first_frame, first_frame + frames):
        position = Dataset()
        position.ImagePositionPatient = [0.0, 0.0, -float(k) * spec.thickness_mm]
        item = Dataset()
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = bytes(spec.rows * spec.columns * 2 * frames)
    return ds


def receive_dataset(env: IngestEnv, spec: SeriesSpec, ds: Any) -> Any:
    import io

    from service.ingest.bookkeeper import ReceivedInstance

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    stored = env.spool.store(spec.study_uid, spec.series_uid, str(ds.SOPInstanceUID), data)
    item = ReceivedInstance(
        study_instance_uid=spec.study_uid, series_instance_uid=spec.series_uid,
        sop_instance_uid=str(ds.SOPInstanceUID), stored=stored, received_at=utcnow(),
        association_id="mf", calling_ae="TESTSCU", data=data, sha256=stored.sha256)
    with env.factory() as session, session.begin():
        write_batch(session, [item])
    return item


def test_one_multiframe_object_completes_by_number_of_frames(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=20)
    receive_dataset(ingest_env, spec, multiframe_dataset(spec, 20))
    assert series_row(ingest_env, spec.series_uid).expected_instances == 1
    assert make_tracker(ingest_env, FakeBroker()).tick().completed
    assert series_row(ingest_env, spec.series_uid).completion_reason == "number_of_frames"


def test_concatenation_waits_for_every_part(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=20)
    tracker = make_tracker(ingest_env, FakeBroker())
    receive_dataset(ingest_env, spec, multiframe_dataset(spec, 10, concatenation=(1, 2)))
    assert series_row(ingest_env, spec.series_uid).expected_instances == 2
    assert tracker.tick().completed == []
    receive_dataset(ingest_env, spec, multiframe_dataset(spec, 10, concatenation=(2, 2),
                                                         first_frame=10))
    assert tracker.tick().completed
    series = series_row(ingest_env, spec.series_uid)
    assert series.completion_reason == "number_of_frames" and series.instance_count == 2


def test_stack_verdict() -> None:
    from harness.data.ctdata import ct_dataset
    from service.ingest.tracker import stack_verdict

    spec = SeriesSpec(slices=10)
    stack = [ct_dataset(spec, i, with_pixels=False) for i in range(10)]
    assert stack_verdict(stack, 10, max_gap_factor=1.6).complete
    assert stack_verdict(stack[::-1], 10, max_gap_factor=1.6).complete  # order of arrival
    assert not stack_verdict(stack, 11, max_gap_factor=1.6).complete  # count differs
    assert not stack_verdict(stack, 10, max_gap_factor=1.6, unreadable=1).complete
    gap = stack[:4] + stack[5:]
    assert "uneven" in stack_verdict(gap, 9, max_gap_factor=1.6).detail
    doubled = stack[:9] + [ct_dataset(spec, 8, with_pixels=False)]
    assert "share" in stack_verdict(doubled, 10, max_gap_factor=1.6).detail
    tilted = ct_dataset(SeriesSpec(slices=10, orientation=(1, 0, 0, 0, 0.8, 0.6)), 9,
                        with_pixels=False)
    assert "parallel" in stack_verdict(stack[:9] + [tilted], 10, max_gap_factor=1.6).detail
    multi = multiframe_dataset(spec, 10)
    verdict = stack_verdict([multi], 1, max_gap_factor=1.6)
    assert verdict.complete and verdict.multiframe


def test_mpps_listing_every_instance_completes(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=12)
    items = receive_series(ingest_env, spec, range(11))
    with ingest_env.factory() as session, session.begin():
        step = PerformedProcedureStep(sop_instance_uid="1.2.3.77", status=MppsStatus.COMPLETED,
                                      study_instance_uid=spec.study_uid)
        session.add(step)
        session.flush()
        for uid in [i.sop_instance_uid for i in items] + ["1.2.3.404"]:
            session.add(PerformedProcedureStepReference(
                mpps_id=step.id, series_instance_uid=spec.series_uid, sop_instance_uid=uid))
    tracker = make_tracker(ingest_env, FakeBroker())
    assert tracker.tick().completed == []  # one listed image is still missing
    with ingest_env.factory() as session, session.begin():
        session.execute(PerformedProcedureStepReference.__table__.delete().where(
            PerformedProcedureStepReference.sop_instance_uid == "1.2.3.404"))
    assert tracker.tick().completed
    assert series_row(ingest_env, spec.series_uid).completion_reason == "mpps"


def test_not_analyzable_series_gets_reason_and_no_analysis(ingest_env: IngestEnv) -> None:
    spec = SeriesSpec(slices=12, images_in_acquisition=12, thickness_mm=5.0)
    receive_series(ingest_env, spec)
    report = make_tracker(ingest_env, FakeBroker()).tick()
    assert report.not_analyzable
    series = series_row(ingest_env, spec.series_uid)
    assert series.state == SeriesState.NOT_ANALYZABLE
    assert series.state_reason == SeriesReason.SLICE_TOO_THICK.value
    assert series.qualified is False
    assert json.loads(series.qualification_detail or "{}")["metrics"]["thickness_mm"] == 5.0
    assert analyses(ingest_env) == []


def test_reopened_series_gets_new_analysis_superseding_the_old(ingest_env: IngestEnv) -> None:
    broker = FakeBroker()
    clock = Clock()
    spec = SeriesSpec(slices=13, images_in_acquisition=12)
    receive_series(ingest_env, spec, range(12))
    tracker = make_tracker(ingest_env, broker, clock)
    tracker.tick()
    (first,) = analyses(ingest_env)
    receive_series(ingest_env, spec, range(12, 13), association_id="late")
    series = series_row(ingest_env, spec.series_uid)
    assert series.state == SeriesState.RECEIVING and series.reopened_count == 1
    # 13 instances where the hint said 12: the hint is wrong, so the timers decide.
    assert tracker.tick().completed == []
    clock.offset = timedelta(seconds=ingest_env.settings.completion_idle_s + 1)
    assert tracker.tick().completed
    assert series_row(ingest_env, spec.series_uid).completion_reason == "idle"
    old, new = analyses(ingest_env)
    assert old.id == first.id and old.state == AnalysisState.SUPERSEDED
    assert old.superseded_by_id == new.id
    assert new.state == AnalysisState.QUEUED
    assert new.input_fingerprint != old.input_fingerprint
    assert [args for _, args, _ in broker.sent] == [[old.id], [new.id]]


def test_study_with_several_series_analyses_the_preferred(ingest_env: IngestEnv) -> None:
    broker = FakeBroker()
    tracker = make_tracker(ingest_env, broker)
    soft = SeriesSpec(slices=12, images_in_acquisition=12, kernel="STANDARD",
                      description="C-SPINE SOFT 2.0", thickness_mm=2.0)
    bone = SeriesSpec(slices=12, images_in_acquisition=12, kernel="BONE",
                      description="C-SPINE BONE 1.0", study_uid=soft.study_uid,
                      frame_of_reference_uid=soft.frame_of_reference_uid)
    thick_bone = SeriesSpec(slices=12, images_in_acquisition=12, kernel="BONE",
                            description="C-SPINE BONE 3.0", thickness_mm=3.0,
                            study_uid=soft.study_uid)
    receive_series(ingest_env, soft)
    tracker.tick()
    receive_series(ingest_env, bone)
    tracker.tick()
    receive_series(ingest_env, thick_bone)
    tracker.tick()
    soft_row = series_row(ingest_env, soft.series_uid)
    bone_row = series_row(ingest_env, bone.series_uid)
    thick_row = series_row(ingest_env, thick_bone.series_uid)
    with ingest_env.factory() as session:
        study = session.execute(select(Study)).scalar_one()
    assert study.selected_series_id == bone_row.id
    assert "over 1 other" in (study.selection_reason or "")
    assert thick_row.state == SeriesState.NOT_ANALYZABLE
    assert thick_row.state_reason == SeriesReason.NOT_SELECTED.value
    assert bone.series_uid in (thick_row.state_detail or "")
    soft_analysis, bone_analysis = analyses(ingest_env)
    assert soft_analysis.series_id == soft_row.id
    assert soft_analysis.state == AnalysisState.SUPERSEDED
    assert soft_analysis.superseded_by_id == bone_analysis.id
    assert bone_analysis.series_id == bone_row.id and bone_analysis.state == AnalysisState.QUEUED


def test_stale_complete_and_stale_claim_are_recovered(ingest_env: IngestEnv) -> None:
    clock = Clock()
    broker = FakeBroker()
    spec = SeriesSpec(slices=12, images_in_acquisition=12)
    receive_series(ingest_env, spec)
    tracker = make_tracker(ingest_env, broker, clock)
    (seen, reason), = tracker.due()
    assert tracker._claim(seen, reason)  # ... and the process dies before qualifying
    assert tracker.tick().qualified == []
    clock.offset = timedelta(seconds=120)
    report = tracker.tick()
    assert report.qualified and report.enqueued == 1
    # A claim whose send never happened (crash) goes back to PENDING and is sent again.
    with ingest_env.factory() as session, session.begin():
        analysis = session.execute(select(Analysis)).scalar_one()
        analysis.task_id = None
        analysis.queued_at = utcnow()
    clock.offset = timedelta(seconds=400)
    assert tracker.tick().enqueued == 1
    assert len(broker.sent) == 2


def test_model_version_from_manifest(ingest_env: IngestEnv, tmp_path: Any) -> None:
    assert model_version(ingest_env.settings) == "unknown"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "manifest.json").write_text(json.dumps({"version": "cspine-v1.2"}))
    settings = ingest_env.settings.model_copy(update={"model_dir": tmp_path / "m"})
    assert model_version(settings) == "cspine-v1.2"


@pytest.mark.parametrize("pairs", [[("1.2", "aa"), ("1.3", "bb")]])
def test_fingerprint_ignores_order(pairs: list[tuple[str, str]]) -> None:
    assert input_fingerprint(pairs) == input_fingerprint(reversed(pairs))
    assert input_fingerprint(pairs) != input_fingerprint(pairs[:1])


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
def test_hot_path_header_reads_the_frame_hint(syntax: str) -> None:
    """The SCP's walk (no pydicom parse) captures Number of Frames and the concatenation total
    (US, binary) in either VR encoding."""
    import io

    from service.ingest.header import InstanceHeader
    from service.ingest.validate import scan_dataset, split_part10

    spec = SeriesSpec(slices=20)
    ds = multiframe_dataset(spec, 10, concatenation=(1, 3))
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    found, offset = split_part10(data)
    assert found == syntax
    keys = scan_dataset(data[offset:], syntax)
    header = InstanceHeader.per_instance(keys.elements, study_uid=spec.study_uid,
                                         series_uid=spec.series_uid,
                                         sop_uid=str(ds.SOPInstanceUID),
                                         transfer_syntax_uid=syntax)
    assert header.frame_instances == 3


def test_headers_read_during_the_release_wait_are_reused_only_if_nothing_came(
        ingest_env: IngestEnv) -> None:
    """The release timer's wait reads the headers; qualification after the claim reuses them,
    unless an instance arrived since (then they are read again)."""
    from service.ingest.bookkeeper import AssociationRecord

    def release(association_id: str, items: list[Any]) -> None:
        end = AssociationRecord(association_id, "SCU", "CSPINE_TRIAGE", "127.0.0.1", 1,
                                items[0].received_at, utcnow(), "released")
        with ingest_env.factory() as session, session.begin():
            write_batch(session, [end])

    clock = Clock()
    tracker = make_tracker(ingest_env, FakeBroker(), clock)
    reads: list[int] = []
    read = tracker._read_headers

    def counting(series_id: int) -> Any:
        reads.append(series_id)
        return read(series_id)

    tracker._read_headers = counting  # type: ignore[method-assign]
    spec = SeriesSpec(slices=13)
    release("p1", receive_series(ingest_env, spec, range(12), association_id="p1"))
    assert tracker.tick().completed == [] and len(reads) == 1  # read while waiting
    assert tracker.tick().completed == [] and len(reads) == 1  # not twice
    release("p2", receive_series(ingest_env, spec, range(12, 13), association_id="p2"))
    assert tracker.tick().completed == [] and len(reads) == 2  # stale: read again
    clock.offset = timedelta(seconds=ingest_env.settings.completion_idle_after_release_s + 0.5)
    assert tracker.tick().completed and len(reads) == 2  # qualified on what was read
    series = series_row(ingest_env, spec.series_uid)
    assert series.qualified and series.instance_count == 13
    assert json.loads(series.qualification_detail or "{}")["metrics"]["slices"] == 13


def test_hinted_series_headers_are_read_as_they_arrive_and_once(
        ingest_env: IngestEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.ingest.tracker as tracker_module

    files: list[Any] = []
    read = tracker_module.read_header

    def counting(path: Any) -> Any:
        files.append(path)
        return read(path)

    monkeypatch.setattr(tracker_module, "read_header", counting)
    tracker = make_tracker(ingest_env, FakeBroker())
    spec = SeriesSpec(slices=12, images_in_acquisition=12)
    receive_series(ingest_env, spec, range(6), association_id="first")
    assert tracker.tick().completed == [] and len(files) == 6  # read while receiving
    receive_series(ingest_env, spec, range(6, 12), association_id="second")
    assert tracker.tick().completed  # the stack check and the qualification read the rest
    assert len(files) == len(set(files)) == 12
    assert series_row(ingest_env, spec.series_uid).completion_reason == "expected_count"


def test_headers_of_a_decided_series_are_not_held_until_the_tick_ends(
        ingest_env: IngestEnv, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fuzzing (bench.fuzz, 10 000 one-slice series): every header read in a tick stayed in
    the tracker's cache until the next one, about 23 KB per series due at once; each
    series' headers are now dropped when it is decided."""
    broker, clock = FakeBroker(), Clock()
    tracker = make_tracker(ingest_env, broker, clock)
    for _ in range(6):
        receive_series(ingest_env, SeriesSpec(slices=1))
    held: list[int] = []
    decide = tracker._record_decision

    def watching(*args: Any, **kwargs: Any) -> None:
        held.append(sum(len(c) for c in tracker._header_cache.values()))
        decide(*args, **kwargs)

    monkeypatch.setattr(tracker, "_record_decision", watching)
    clock.offset = timedelta(seconds=ingest_env.settings.completion_idle_s + 1)
    report = tracker.tick()
    assert len(report.not_analyzable) == 6 and not broker.sent
    assert held == [0] * 6
    with ingest_env.factory() as session:
        reasons = session.execute(select(Series.state_reason)).scalars().all()
    assert reasons == [SeriesReason.TOO_FEW_SLICES.value] * 6
