"""The export task's backoff waits in the broker, not in a worker process (issue 20).

``export_analysis`` with a ``sleep`` that raises ``ExportDeferred`` (what the Celery task
passes) makes one try, leaves the rows RETRYING and hands the wait back; the next call goes
on with the schedule from the rows' attempt counts and ends FAILED after
``export_max_retries`` tries, as the in-process schedule does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.peers.dicom import storescp
from harness.process import free_port
from service.config import PacsDestination
from service.db.tables import ExportState
from service.dicom.scu import ExportDeferred, export_analysis
from tests.integration.export_support import analysed_study, export_rows


def _defer(seconds: float) -> None:
    raise ExportDeferred(seconds)


def test_deferred_schedule_continues_then_fails(sqlite_url: str,
                                                settings_factory) -> None:  # type: ignore[no-untyped-def]
    settings = settings_factory(
        database_url=sqlite_url, export_max_retries=3, export_retry_backoff_s=2,
        export_timeout_s=2,
        pacs_destinations=[PacsDestination(name="down", ae_title="NOBODY", host="127.0.0.1",
                                           port=free_port())])
    study = analysed_study(settings)
    waits = []
    for expected_attempts in (1, 2):
        with pytest.raises(ExportDeferred) as info:
            export_analysis(study.session_factory, study.analysis_id, settings, sleep=_defer)
        waits.append(info.value.seconds)
        rows = export_rows(study.session_factory, study.analysis_id)
        assert {r.state for r in rows} == {ExportState.RETRYING}
        assert {r.attempts for r in rows} == {expected_attempts}
    assert waits == [2.0, 4.0]  # the schedule went on across calls
    summary = export_analysis(study.session_factory, study.analysis_id, settings, sleep=_defer)
    assert not summary.all_sent
    rows = export_rows(study.session_factory, study.analysis_id)
    assert {(r.state, r.attempts) for r in rows} == {(ExportState.FAILED, 3)}


def test_deferred_export_is_sent_when_the_peer_is_back(tmp_path: Path, sqlite_url: str,
                                                       settings_factory) -> None:  # type: ignore[no-untyped-def]
    with storescp(tmp_path / "scp") as scp:
        down = settings_factory(
            database_url=sqlite_url, export_max_retries=5, export_retry_backoff_s=1,
            export_timeout_s=2,
            pacs_destinations=[PacsDestination(name="pacs", ae_title=scp.ae_title,
                                               host="127.0.0.1", port=free_port())])
        study = analysed_study(down)
        with pytest.raises(ExportDeferred):
            export_analysis(study.session_factory, study.analysis_id, down, sleep=_defer)
        # The PACS is back (same destination name, now reachable).
        up = down.model_copy(update={"pacs_destinations": [PacsDestination(
            name="pacs", ae_title=scp.ae_title, host="127.0.0.1", port=scp.port)]})
        summary = export_analysis(study.session_factory, study.analysis_id, up, sleep=_defer)
        assert summary.all_sent
        assert len(scp.received()) == len(export_rows(study.session_factory,
                                                      study.analysis_id))
    assert {r.attempts for r in export_rows(study.session_factory, study.analysis_id)} == {2}
