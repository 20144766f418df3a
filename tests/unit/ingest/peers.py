"""Real DICOM peers for the ingest tests: DCMTK storescu, Orthanc, and ``triage scp`` itself
run as a separate process. Each helper skips the test, naming the tool, when it is absent."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tests.conftest import free_port, missing

REPO = Path(__file__).resolve().parents[3]


def need(tool: str) -> str:
    found = shutil.which(tool) or (tool if Path(tool).is_file() else None)
    if not found:
        missing(f"{tool} not installed (Debian package dcmtk / orthanc)")
    return found


def storescu(port: int, files: Sequence[Path | str], *, calling: str = "STORESCU",
             called: str = "CSPINE_TRIAGE", timeout_s: float = 300,
             extra: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, with TCP_NODELAY=1 (else it stalls on delayed ACKs)."""
    binary = need("storescu")
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run([binary, "-aet", calling, "-aec", called, *extra, "127.0.0.1",
                           str(port), *map(str, files)], env=env, capture_output=True,
                          text=True, timeout=timeout_s)


def wait_until(predicate: Callable[[], Any], timeout_s: float = 30.0,
               interval_s: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


class ScpProcess:
    """``python -m service.cli scp`` in its own process group, configured by TRIAGE_* env."""

    def __init__(self, env: dict[str, str], cwd: Path, log: Path) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        self.env.update(env)
        self.cwd = cwd
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> ScpProcess:
        handle = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "service.cli", "scp"],
                                     cwd=self.cwd, env=self.env, stdout=handle,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        handle.close()
        wait_until(lambda: self._ready(), timeout_s, 0.1, "the SCP to listen")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"SCP exited with {self.proc.returncode}:\n"
                                 f"{self.log.read_text()[-3000:]}")
        text = self.log.read_text(errors="replace")
        return text.count("DICOM SCP ") > getattr(self, "_seen", 0)

    def kill9(self) -> None:
        """SIGKILL the whole process group (the SCP and any receiver children)."""
        assert self.proc is not None
        self._seen = self.log.read_text(errors="replace").count("DICOM SCP ")
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self._seen = self.log.read_text(errors="replace").count("DICOM SCP ")
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)


class Orthanc:
    """An Orthanc server on free loopback ports with a generated configuration."""

    def __init__(self, workdir: Path, modalities: dict[str, list[Any]]) -> None:
        self.binary = need("/usr/sbin/Orthanc") if not shutil.which("Orthanc") \
            else need("Orthanc")
        self.workdir = workdir
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.config = {
            "Name": "triage-test-orthanc", "DicomAet": "ORTHANC",
            "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "StorageDirectory": str(workdir / "storage"),
            "IndexDirectory": str(workdir / "index"),
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "HttpServerEnabled": True, "DicomServerEnabled": True,
            "DicomModalities": modalities, "DicomAssociationCloseDelay": 0,
            "DicomScuTimeout": 30, "Plugins": [], "StableAge": 60,
        }
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
        return self

    def request(self, method: str, path: str, body: bytes | None = None,
                content_type: str = "application/json", timeout_s: float = 120) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method,
                                     headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=timeout_s) as response:
            data = response.read()
        return json.loads(data) if data else None

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
