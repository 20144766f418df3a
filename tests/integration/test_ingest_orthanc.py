"""Orthanc, started here on loopback ports with a generated configuration, routes a study to
the SCP through its REST API (POST /modalities/{name}/store), as a PACS routing rule would."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from harness.data.ctdata import SeriesSpec, write_series
from harness.peers.orthanc import Orthanc
from harness.process import wait_until
from service.config import Settings
from service.db import migrate
from service.db.tables import AuditEvent, Instance, Series
from service.dicom.runner import IngestNode
from service.ingest.bookkeeper import EVENT_ASSOCIATION

pytestmark = pytest.mark.slow


def test_orthanc_routes_a_study_to_us(sqlite_url: str, tmp_path: Path) -> None:
    migrate.upgrade(sqlite_url)
    settings = Settings(data_dir=tmp_path / "var", database_url=sqlite_url, spool_min_free_mb=0,
                        completion_idle_after_release_s=0.5, tracker_interval_s=0.2,
                        allowed_calling_aes=["ORTHANC"], min_slices=10,
                        broker_url="redis://127.0.0.1:1/0", broker_connect_timeout_s=0.3)
    node = IngestNode(settings)
    port = node.start("127.0.0.1", 0)
    bone = SeriesSpec(slices=24, rows=128, columns=128)
    scout = SeriesSpec(slices=2, rows=128, columns=128, study_uid=bone.study_uid,
                       image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), description="TOPOGRAM")
    files = write_series(tmp_path / "bone", bone).paths + write_series(tmp_path / "scout",
                                                                        scout).paths
    try:
        with Orthanc(tmp_path / "orthanc",
                     {"cspine": ["CSPINE_TRIAGE", "127.0.0.1", port]}) as orthanc:
            study_ids = {orthanc.request("POST", "/instances", path.read_bytes(),
                                         "application/dicom")["ParentStudy"] for path in files}
            assert len(study_ids) == 1
            echo = orthanc.request("POST", "/modalities/cspine/echo", b"{}")
            assert echo == {} or echo is None
            job = orthanc.request("POST", "/modalities/cspine/store",
                                  study_ids.pop().encode(), "text/plain")
            assert job is not None
        assert node.session_factory is not None
        factory = node.session_factory

        def decided() -> list[Series] | None:
            with factory() as session:
                rows = list(session.execute(select(Series)).scalars())
            return rows if len(rows) == 2 and all(r.qualified is not None for r in rows) \
                else None

        rows = {r.series_instance_uid: r for r in wait_until(decided, 60, 0.2,
                                                             "both series decided")}
        assert rows[bone.series_uid].instance_count == 24 and rows[bone.series_uid].qualified
        assert rows[scout.series_uid].state_reason in ("LOCALIZER", "EXCLUDED_DESCRIPTION")
        with factory() as session:
            instances = session.execute(select(Instance)).scalars().all()
            events = session.execute(select(AuditEvent).where(
                AuditEvent.event_type == EVENT_ASSOCIATION)).scalars().all()
        assert len(instances) == 26 and {i.calling_ae for i in instances} == {"ORTHANC"}
        stores = [e for e in events if e.details.get("instances")]
        assert sum(e.details["instances"] for e in stores) == 26
        assert all(e.actor == "ORTHANC" and e.details["accepted"] for e in events)
    finally:
        node.stop(grace_s=5)
