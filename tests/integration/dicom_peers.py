"""Real DICOM peers for integration tests: DCMTK ``storescp`` and Orthanc.

Each is started on free loopback ports with a generated configuration and stopped (by its
own process id) afterwards. A missing binary skips the test with the Debian package name.
The lead's end-to-end test can reuse :class:`OrthancServer`.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import free_port, missing

ORTHANC_BIN = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


def _wait_port(port: int, process: subprocess.Popen[bytes], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"peer exited early with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"peer did not listen on {port} within {timeout_s} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


@dataclass
class StoreScp:
    ae_title: str
    port: int
    directory: Path

    def received(self) -> list[Path]:
        return sorted(p for p in self.directory.rglob("*") if p.is_file())


@contextmanager
def storescp(directory: Path, *, ae_title: str = "STORESCP",
             extra_args: tuple[str, ...] = ()) -> Iterator[StoreScp]:
    """DCMTK storescp; by default it accepts uncompressed transfer syntaxes only."""
    binary = shutil.which("storescp")
    if binary is None:
        missing("storescp absent (Debian package dcmtk)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = (directory.parent / f"storescp-{port}.log").open("wb")
    process = subprocess.Popen(
        [binary, "--aetitle", ae_title, "--output-directory", str(directory), *extra_args,
         str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_port(port, process)
        yield StoreScp(ae_title=ae_title, port=port, directory=directory)
    finally:
        _stop(process)
        log.close()


@dataclass
class OrthancServer:
    ae_title: str
    dicom_port: int
    http_port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def get(self, path: str) -> Any:
        import httpx

        response = httpx.get(self.url + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def find_study(self, study_instance_uid: str) -> dict[str, Any] | None:
        import httpx

        response = httpx.post(self.url + "/tools/find", timeout=10, json={
            "Level": "Study", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True})
        response.raise_for_status()
        studies = response.json()
        return studies[0] if studies else None

    def instances_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        study = self.find_study(study_instance_uid)
        if study is None:
            return []
        instances: list[dict[str, Any]] = self.get(f"/studies/{study['ID']}/instances")
        return instances


@contextmanager
def orthanc(directory: Path, *, ae_title: str = "ORTHANC", dicomweb: bool = False,
            config: dict[str, Any] | None = None) -> Iterator[OrthancServer]:
    if not ORTHANC_BIN.exists():
        missing(f"{ORTHANC_BIN} absent (Debian package orthanc)")
    if dicomweb and not DICOMWEB_PLUGIN.exists():
        missing(f"{DICOMWEB_PLUGIN} absent (Debian package orthanc-dicomweb)")
    directory.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    settings: dict[str, Any] = {
        "Name": "cspine-test",
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"),
        "HttpPort": http_port,
        "HttpServerEnabled": True,
        "DicomPort": dicom_port,
        "DicomAet": ae_title,
        "DicomServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "StableAge": 1,
        "Plugins": [str(DICOMWEB_PLUGIN)] if dicomweb else [],
        "DicomWeb": {"Enable": dicomweb, "Root": "/dicom-web/"},
        "HttpsVerifyPeers": False,
        "LuaScripts": [],
    }
    settings.update(config or {})
    config_path = directory / "orthanc.json"
    config_path.write_text(json.dumps(settings, indent=2))
    log = (directory / "orthanc.log").open("wb")
    process = subprocess.Popen([str(ORTHANC_BIN), str(config_path)], stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        _wait_port(http_port, process, timeout_s=30)
        _wait_port(dicom_port, process, timeout_s=30)
        yield OrthancServer(ae_title=ae_title, dicom_port=dicom_port, http_port=http_port)
    finally:
        _stop(process)
        log.close()
