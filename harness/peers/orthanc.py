"""One Orthanc launcher: a real Orthanc on free loopback ports with a generated configuration.

``Orthanc(workdir, modalities)`` as a context manager is the PACS of the ingest and
end-to-end tests (it sends to ``triage scp`` through its REST API and receives the results);
:func:`orthanc` is the same server with the settings the export tests rely on (it checks the
Called AE title, studies become stable after 1 s, optional DICOMweb plugin).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.process import free_port, stop, wait_port, wait_until
from harness.services import missing

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    """An Orthanc server; ``config`` entries override the generated configuration."""

    def __init__(self, workdir: Path, modalities: dict[str, list[Any]] | None = None, *,
                 ae_title: str = "ORTHANC", dicomweb: bool = False,
                 config: dict[str, Any] | None = None) -> None:
        binary = shutil.which("Orthanc") or (str(ORTHANC_BIN) if ORTHANC_BIN.is_file() else None)
        if binary is None:
            missing(f"{ORTHANC_BIN} absent (Debian package orthanc)")
        if dicomweb and not DICOMWEB_PLUGIN.exists():
            missing(f"{DICOMWEB_PLUGIN} absent (Debian package orthanc-dicomweb)")
        assert binary is not None
        self.binary = binary
        self.workdir = workdir
        self.ae_title = ae_title
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.config: dict[str, Any] = {
            "Name": "triage-test-orthanc", "DicomAet": ae_title,
            "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "HttpServerEnabled": True, "DicomServerEnabled": True,
            "DicomModalities": modalities or {}, "DicomAssociationCloseDelay": 0,
            "DicomScuTimeout": 30, "StableAge": 60, "HttpsVerifyPeers": False,
            "LuaScripts": [], "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        }
        if dicomweb:
            self.config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/"}
        self.config.update(config or {})
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def __enter__(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config_path = self.workdir / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        log = (self.workdir / "orthanc.log").open("wb")
        self.proc = subprocess.Popen([self.binary, str(config_path)], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError("Orthanc exited:\n" +
                                     (self.workdir / "orthanc.log").read_text()[-3000:])
            try:
                return self.request("GET", "/system") is not None
            except OSError:
                return False

        wait_until(up, 30, 0.2, "Orthanc to answer")
        wait_port(self.dicom_port, self.proc, timeout_s=30)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            stop(self.proc)

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout_s: float = 120) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            data = response.read()
        return json.loads(data) if data else None

    def get(self, path: str) -> Any:
        return self.request("GET", path, timeout_s=10)

    def find_study(self, study_instance_uid: str) -> dict[str, Any] | None:
        studies = self.request("POST", "/tools/find", json.dumps({
            "Level": "Study", "Query": {"StudyInstanceUID": study_instance_uid},
            "Expand": True}).encode(), timeout_s=10)
        return studies[0] if studies else None

    def instances_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        study = self.find_study(study_instance_uid)
        if study is None:
            return []
        instances: list[dict[str, Any]] = self.get(f"/studies/{study['ID']}/instances")
        return instances


@contextmanager
def orthanc(directory: Path, *, ae_title: str = "ORTHANC", dicomweb: bool = False,
            config: dict[str, Any] | None = None) -> Iterator[Orthanc]:
    """The Orthanc of the export tests: checks the Called AE, accepts any store, stable
    after 1 s."""
    settings = {"Name": "cspine-test", "DicomCheckCalledAet": True,
                "DicomAlwaysAllowStore": True, "StableAge": 1, **(config or {})}
    with Orthanc(directory, ae_title=ae_title, dicomweb=dicomweb, config=settings) as server:
        yield server
