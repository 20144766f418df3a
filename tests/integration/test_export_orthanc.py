"""Export to Orthanc (a real PACS): SR and SEG land in the CT's study, re-sending creates no
duplicates, JPEG 2000 is kept where the peer accepts it, STOW-RS through the DICOMweb plugin."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.peers.orthanc import Orthanc, orthanc
from service.config import PacsDestination, Settings
from service.db.tables import ExportState
from service.dicom.scu import export_analysis, export_targets, plan_exports, send_datasets
from service.results.build import build_and_store
from service.results.uids import ObjectKind
from tests.integration.export_support import AnalysedStudy, analysed_study, export_rows

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def _modalities(server: Orthanc, study_uid: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for instance in server.instances_of_study(study_uid):
        tags = server.get(f"/instances/{instance['ID']}/simplified-tags")
        counts[tags["Modality"]] = counts.get(tags["Modality"], 0) + 1
    return counts


def _send_ct(server: Orthanc, study: AnalysedStudy, settings: Settings) -> None:
    destination = PacsDestination(ae_title=server.ae_title, host="127.0.0.1",
                                  port=server.dicom_port)
    outcomes = send_datasets(destination, study.case.datasets, settings=settings)
    assert all(o.ok for o in outcomes)


@pytest.mark.slow
def test_sr_and_seg_arrive_in_the_same_study_without_duplicates(
        tmp_path: Path, sqlite_url: str, settings_factory) -> None:  # type: ignore[no-untyped-def]
    with orthanc(tmp_path / "orthanc") as server:
        settings = settings_factory(
            database_url=sqlite_url, export_retry_backoff_s=0, secondary_capture=True,
            pacs_destinations=[PacsDestination(name="orthanc", ae_title=server.ae_title,
                                               host="127.0.0.1", port=server.dicom_port)])
        study = analysed_study(settings)
        study_uid = study.case.volume.study_instance_uid
        _send_ct(server, study, settings)
        summary = export_analysis(study.session_factory, study.analysis_id, settings)
        assert summary.all_sent, [r.last_error for r in export_rows(study.session_factory,
                                                                     study.analysis_id)]

        # One study in Orthanc, holding the CT, the SR, the SEG and the key image.
        assert len(server.get("/studies")) == 1
        assert _modalities(server, study_uid) == {"CT": len(study.case.datasets), "SR": 1,
                                                  "SEG": 1, "OT": 1}
        by_uid = {}
        for instance in server.instances_of_study(study_uid):
            tags = server.get(f"/instances/{instance['ID']}/simplified-tags")
            by_uid[tags["SOPInstanceUID"]] = (instance["ID"], tags)
        seg_id, seg_tags = by_uid[study.stored[ObjectKind.SEG].sop_instance_uid]
        assert seg_tags["SOPClassUID"] == SEG_CLASS
        # The SEG is stored as built (uncompressed by default, settings.seg_encoding), not
        # transcoded on the way.
        built = study.stored[ObjectKind.SEG].transfer_syntax_uid
        assert built == "1.2.840.10008.1.2.1"
        assert server.get(f"/instances/{seg_id}/metadata?expand")["TransferSyntax"] == built
        _sr_id, sr_tags = by_uid[study.stored[ObjectKind.SR].sop_instance_uid]
        assert sr_tags["SOPClassUID"] == SR_CLASS
        assert sr_tags["PatientID"] == "SYNTH-001"

        # Re-send everything, then rebuild and re-plan: same UIDs, nothing duplicated.
        export_analysis(study.session_factory, study.analysis_id, settings, resend=True)
        rebuilt = build_and_store(study.case.volume, study.case.findings, settings)
        assert {k: o.sop_instance_uid for k, o in rebuilt.items()} == \
            {k: o.sop_instance_uid for k, o in study.stored.items()}
        with study.session_factory() as session:
            rows = plan_exports(session, study.analysis_id, rebuilt, export_targets(settings))
            assert {r.state for r in rows} == {ExportState.SENT}  # same objects: nothing to do
            session.commit()
        export_analysis(study.session_factory, study.analysis_id, settings, resend=True)
        assert _modalities(server, study_uid) == {"CT": len(study.case.datasets), "SR": 1,
                                                  "SEG": 1, "OT": 1}
        assert all(r.attempts == 3 for r in export_rows(study.session_factory,
                                                         study.analysis_id))


@pytest.mark.slow
def test_stow_rs_to_orthanc_dicomweb(tmp_path: Path, sqlite_url: str,
                                     settings_factory) -> None:  # type: ignore[no-untyped-def]
    with orthanc(tmp_path / "orthanc", dicomweb=True) as server:
        settings = settings_factory(database_url=sqlite_url, export_retry_backoff_s=0,
                                    stow_rs_url=f"{server.url}/dicom-web")
        study = analysed_study(settings)
        summary = export_analysis(study.session_factory, study.analysis_id, settings)
        rows = export_rows(study.session_factory, study.analysis_id)
        assert summary.all_sent, [r.last_error for r in rows]
        assert {r.destination for r in rows} == {
            f"STOW http://127.0.0.1:{server.http_port}/dicom-web"}
        assert _modalities(server, study.case.volume.study_instance_uid) == {"SR": 1, "SEG": 1}
