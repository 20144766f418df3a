"""A whole phantom study as a scanner routes it (bone and soft-kernel series, a localizer, a
dose-report secondary capture), written by ``service.synthetic``, sent by DCMTK storescu in
one association: every series gets a decision with a reason, and only the bone series is
analysed."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from harness.peers.dicom import storescu
from harness.process import wait_until
from service.config import Settings
from service.db import migrate
from service.db.tables import Analysis, Series, SeriesState, Study
from service.dicom.runner import IngestNode
from service.synthetic.dicom_writer import TransferSyntax, WriterOptions, write_study
from service.synthetic.options import PhantomOptions
from service.synthetic.phantom import generate_phantom

pytestmark = pytest.mark.slow


def test_phantom_study_gets_one_analysis_and_reasons(sqlite_url: str, tmp_path: Path) -> None:
    migrate.upgrade(sqlite_url)
    settings = Settings(data_dir=tmp_path / "var", database_url=sqlite_url, spool_min_free_mb=0,
                        completion_idle_after_release_s=0.5, tracker_interval_s=0.2,
                        broker_url="redis://127.0.0.1:1/0", broker_connect_timeout_s=0.3)
    phantom = generate_phantom(PhantomOptions(seed=11, n_slices=60, matrix=128,
                                              pixel_spacing=1.6, slice_spacing=1.0))
    written = write_study(phantom, tmp_path / "study", WriterOptions(
        localizer=True, soft_kernel_series=True, non_ct_series=True,
        transfer_syntax=TransferSyntax.EXPLICIT_VR_LE, shuffle=True))
    roles = {w.series_instance_uid: w.role for w in written}
    files = [p for w in written for p in w.paths]
    node = IngestNode(settings)
    port = node.start("127.0.0.1", 0)
    try:
        result = storescu(port, files)
        assert result.returncode == 0, result.stderr[-2000:]
        assert node.session_factory is not None
        factory = node.session_factory

        def decided() -> list[Series] | None:
            with factory() as session:
                rows = list(session.execute(select(Series)).scalars())
            done = len(rows) == len(written) and all(r.qualified is not None for r in rows)
            return rows if done else None

        rows = wait_until(decided, 60, 0.2, "every series decided")
        by_role = {roles[r.series_instance_uid]: r for r in rows}
        assert by_role["ct"].qualified and by_role["ct"].state in (SeriesState.COMPLETE,
                                                                   SeriesState.QUEUED)
        assert by_role["ct"].instance_count == len(written[0].paths)
        assert by_role["soft"].qualified
        assert by_role["soft"].state_reason == "NOT_SELECTED"
        assert by_role["localizer"].state_reason == "LOCALIZER"
        assert by_role["non_ct"].state_reason == "NOT_CT"
        with factory() as session:
            study = session.execute(select(Study)).scalar_one()
            analyses = session.execute(select(Analysis)).scalars().all()
        assert study.selected_series_id == by_role["ct"].id
        live = [a for a in analyses if a.state.value != "SUPERSEDED"]
        assert [a.series_id for a in live] == [by_role["ct"].id]
    finally:
        node.stop(grace_s=5)
