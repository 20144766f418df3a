"""A throwaway certificate authority for TLS tests, made with the ``openssl`` command.

One CA, a server certificate valid for ``127.0.0.1`` and ``localhost`` (subjectAltName, so
hostname verification passes the way it must in production) and a client certificate for
mutual TLS, all valid for one day. The peers under test (DCMTK, a syslog or MLLP listener, an
https webhook receiver) and the service then verify each other for real: no ``CERT_NONE``.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.services import missing


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    """A second CA that signed nothing here: trusting only it must fail the handshake."""


def make_pki(directory: Path) -> Pki:
    openssl = shutil.which("openssl")
    if openssl is None:
        missing("openssl command absent (Debian package openssl): cannot make certificates")
        raise AssertionError("unreachable")
    directory.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=directory, check=True, capture_output=True,
                       timeout=60)

    for ca in ("ca", "other-ca"):
        run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{ca}.key",
            "-out", f"{ca}.pem", "-days", "1", "-subj", f"/CN=test {ca}")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
            f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile", "san.ext")
    return Pki(ca=directory / "ca.pem", server_cert=directory / "server.pem",
               server_key=directory / "server.key", client_cert=directory / "client.pem",
               client_key=directory / "client.key", other_ca=directory / "other-ca.pem")
