"""DCMTK ``storescu`` / ``storescp``, a pynetdicom SCU, and ``triage scp`` as a process.

Each helper skips the test (or, in a benchmark, raises ``PeerMissing``), naming the tool, when
it is absent. DCMTK is found by what it is (:func:`harness.dcmtk.dcmtk`), not by its name on
PATH, where the project's virtualenv puts pynetdicom's scripts of the same names."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.presentation import build_context

from harness.dcmtk import dcmtk
from harness.process import free_port, stop, wait_port, wait_until
from harness.services import missing

CALLED = "CSPINE_TRIAGE"
DCMTK_TOOLS = frozenset({"storescu", "storescp", "echoscu", "findscu", "movescu", "getscu",
                         "dcmsend", "dcmrecv", "dsrdump", "dcmdump"})


def need(tool: str) -> str:
    """Path of ``tool`` (DCMTK's by what it is, others by name); skip the test if absent."""
    if tool in DCMTK_TOOLS:
        found = dcmtk(tool)
    else:
        found = shutil.which(tool) or (tool if Path(tool).is_file() else None)
    if not found:
        missing(f"{tool} not installed (Debian package dcmtk / orthanc)")
    assert found is not None
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
    binary = need("storescp")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = (directory.parent / f"storescp-{port}.log").open("wb")
    process = subprocess.Popen(
        [binary, "--aetitle", ae_title, "--output-directory", str(directory), *extra_args,
         str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port, process)
        yield StoreScp(ae_title=ae_title, port=port, directory=directory)
    finally:
        stop(process)
        log.close()


class Scu:
    """A pynetdicom requestor bound to one SCP port."""

    def __init__(self, port: int, calling: str = "TESTSCU", called: str = CALLED,
                 tls_args: tuple[Any, str | None] | None = None) -> None:
        self.port = port
        self.calling = calling
        self.called = called
        self.tls_args = tls_args

    def associate(self, contexts: Sequence[tuple[str, str]]) -> Any:
        ae = AE(ae_title=self.calling)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.requested_contexts = [build_context(sop, [ts]) for sop, ts in
                                 dict.fromkeys(contexts)]
        # pynetdicom's annotation wants a hostname; None (no name check) works at run time.
        return ae.associate("127.0.0.1", self.port, ae_title=self.called,
                            tls_args=self.tls_args)  # type: ignore[arg-type]

    def store(self, items: Sequence[Path | Dataset]) -> list[int]:
        """Send every item in one association; the statuses in order (-1: no response)."""
        from pydicom.filereader import read_file_meta_info

        contexts = []
        for item in items:
            meta = read_file_meta_info(item) if isinstance(item, Path) else item.file_meta
            contexts.append((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        assoc = self.associate(contexts)
        assert assoc.is_established, "association not established"
        statuses = []
        try:
            for item in items:
                status = assoc.send_c_store(item)
                statuses.append(int(status.Status) if "Status" in status else -1)
        finally:
            assoc.release()
        return statuses
