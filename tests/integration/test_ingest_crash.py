"""``kill -9`` of the SCP in the middle of an association: after a restart, every instance
that was answered Success is on disk and in the database (the spool is the truth)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.presentation import build_context
from sqlalchemy import select

from harness.data.ctdata import SeriesSpec, write_series
from harness.peers.dicom import ScpProcess
from harness.process import free_port, wait_until
from service.db import migrate
from service.db.session import make_engine, make_session_factory
from service.db.tables import Instance, Series

pytestmark = pytest.mark.slow


def test_kill_9_mid_association_loses_nothing_acknowledged(database_url: str,
                                                           tmp_path: Path) -> None:
    migrate.upgrade(database_url)
    port = free_port()
    scp = ScpProcess({
        "TRIAGE_DATA_DIR": str(tmp_path / "var"), "TRIAGE_DATABASE_URL": database_url,
        "TRIAGE_DICOM_HOST": "127.0.0.1", "TRIAGE_DICOM_PORT": str(port),
        "TRIAGE_SPOOL_MIN_FREE_MB": "0", "TRIAGE_BROKER_URL": "redis://127.0.0.1:1/0",
        "TRIAGE_BROKER_CONNECT_TIMEOUT_S": "0.3",
        # A slow bookkeeper: when the SCP dies, most Success instances have no row yet.
        "TRIAGE_INGEST_BATCH_INTERVAL_S": "30",
    }, tmp_path, tmp_path / "scp.log").start()
    written = write_series(tmp_path / "in", SeriesSpec(slices=200, rows=128, columns=128))
    acknowledged: list[str] = []
    failed: list[str] = []
    done = threading.Event()

    def send() -> None:
        ae = AE(ae_title="MODALITY")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.requested_contexts = [build_context(written.spec.sop_class_uid,
                                               [ExplicitVRLittleEndian])]
        assoc = ae.associate("127.0.0.1", port, ae_title="CSPINE_TRIAGE")
        assert assoc.is_established
        try:
            for path, uid in zip(written.paths, written.sop_uids, strict=True):
                if not assoc.is_established:
                    failed.append(uid)
                    continue
                try:
                    status = assoc.send_c_store(dcmread(path))
                except Exception:  # noqa: BLE001 - the peer died under us
                    failed.append(uid)
                    continue
                if "Status" in status and status.Status == 0:
                    acknowledged.append(uid)
                else:
                    failed.append(uid)
        finally:
            if assoc.is_established:
                assoc.release()
            done.set()

    sender = threading.Thread(target=send)
    sender.start()
    wait_until(lambda: len(acknowledged) >= 40, 120, 0.01, "40 acknowledged instances")
    scp.kill9()
    sender.join(60)
    assert done.is_set()
    assert 40 <= len(acknowledged) < len(written.paths), "the kill did not land mid-association"
    assert failed, "no C-STORE failed after the kill"

    engine = make_engine(database_url)
    factory = make_session_factory(engine)
    with factory() as session:
        rows_before = len(session.execute(select(Instance)).scalars().all())
    assert rows_before < len(acknowledged)  # the rows really were lost with the process

    scp.env["TRIAGE_INGEST_BATCH_INTERVAL_S"] = "0.2"
    scp.start()  # rebuilds from the spool before it listens
    try:
        with factory() as session:
            rows = {r.sop_instance_uid: r for r in session.execute(select(Instance)).scalars()}
            series = session.execute(select(Series)).scalar_one()
        missing = [uid for uid in acknowledged if uid not in rows]
        assert not missing, f"{len(missing)} acknowledged instances lost"
        spool = tmp_path / "var" / "spool"
        for uid in acknowledged:
            stored = dcmread(spool / rows[uid].spool_path)
            assert stored.SOPInstanceUID == uid and len(stored.PixelData) == 128 * 128 * 2
        assert series.instance_count == len(rows) >= len(acknowledged)
        # The new process serves the rest of the series normally.
        from harness.peers.dicom import storescu

        rest = [p for p, u in zip(written.paths, written.sop_uids, strict=True)
                if u not in rows]
        result = storescu(port, rest)
        assert result.returncode == 0, result.stderr[-2000:]

        def all_rows() -> bool:
            with factory() as session:
                return len(session.execute(select(Instance.id)).all()) == len(written.paths)

        wait_until(all_rows, 90, 0.5, "every instance recorded after the restart")
    finally:
        assert scp.stop() == 0
        engine.dispose()
        time.sleep(0.1)
