"""Installed, not only checked out: the wheel runs ``triage`` from any working directory.

The wheel is built from a copy of the source tree (so the build writes nothing into the
checkout) and installed, not editable, into a fresh virtualenv. That virtualenv sees the
project environment's third-party packages through a ``.pth`` line (a plain path: the
editable install's finder there is *not* loaded), so pip resolves every dependency of the
wheel, finds them satisfied and downloads nothing; ``service`` itself comes only from the
wheel, which the test checks. Then, from an empty temporary directory: ``triage db upgrade``
against a fresh PostgreSQL database, ``triage serve`` with the real Redis as broker, and
``/healthz`` with an admin token must report the database up and the shipped model present,
and the login page must render (the templates are package data).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

from harness.process import free_port

REPO = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "service", "alembic",
           "models/cspine-v1")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "checkpoints", "*.egg-info")

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def build_wheel(out: Path) -> Path:
    source = out / "src"
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=IGNORE)
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(origin, source / name)
    dist = out / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--quiet", "-w", str(dist), str(source)], check=True, timeout=300)
    (wheel,) = dist.glob("cspine_triage-*.whl")
    return wheel


def fresh_venv(directory: Path) -> Path:
    """A virtualenv whose only first-party code will be the wheel; returns its python."""
    venv.create(directory, with_pip=False, symlinks=True)
    python = directory / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()"
                           "['purelib'])"], check=True, capture_output=True, text=True,
                          timeout=60).stdout.strip()
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (Path(site) / "project_dependencies.pth").write_text("\n".join(ours) + "\n")
    return python


def healthz(port: int, token: str | None = None) -> dict[str, object] | None:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            body: dict[str, object] = json.loads(response.read())
            return body
    except OSError:
        return None


def test_wheel_migrates_and_serves_from_any_directory(tmp_path: Path, postgres_url: str,
                                                       redis_url: str) -> None:
    wheel = build_wheel(tmp_path / "build")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = "service/_shipped/"
    assert {f"{shipped}models/cspine-v1/manifest.json", f"{shipped}models/cspine-v1/seg.onnx",
            f"{shipped}models/cspine-v1/frac.onnx", f"{shipped}alembic/env.py"} <= names
    assert any(n.startswith(f"{shipped}alembic/versions/0001_") for n in names)
    package_data = {str(p.relative_to(REPO)) for p in (REPO / "service").rglob("*")
                    if p.is_file() and p.suffix not in (".py", ".pyc")
                    and "__pycache__" not in p.parts}
    assert package_data - names == set(), "package data missing from the wheel (pyproject)"
    assert not any("checkpoints" in n or n.split("/")[0] in {"harness", "tests", "bench",
                                                             "models", "alembic"}
                   for n in names), "the wheel ships the service only"

    python = fresh_venv(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
                    str(wheel)], check=True, timeout=300)
    triage = str(python.parent / "triage")
    work = tmp_path / "anywhere"
    work.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("TRIAGE_") and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({"TRIAGE_DATABASE_URL": postgres_url, "TRIAGE_BROKER_URL": redis_url,
                "TRIAGE_WEB_PORT": str(port), "TRIAGE_DICOM_PORT": str(free_port()),
                "TRIAGE_EXECUTION_PROVIDERS": "CPUExecutionProvider"})

    where = subprocess.run([str(python), "-c", "import service; print(service.__file__)"],
                           cwd=work, env=env, check=True, capture_output=True, text=True,
                           timeout=60).stdout.strip()
    assert Path(where).is_relative_to(tmp_path / "venv"), where

    def run(*args: str, stdin: str | None = None) -> str:
        proc = subprocess.run([triage, *args], cwd=work, env=env, input=stdin,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    run("db", "upgrade")
    revisions = json.loads(run("db", "current"))
    assert revisions["current"] == revisions["head"] is not None

    server = subprocess.Popen([triage, "serve"], cwd=work, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while healthz(port) is None:
            assert server.poll() is None, server.stdout.read().decode() if server.stdout else ""
            assert time.monotonic() < deadline, "web never answered /healthz"
            time.sleep(0.3)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/login", timeout=5) as page:
            assert page.status == 200 and b"csrf_token" in page.read()  # templates shipped
        run("user", "add", "ops", "--role", "admin", "--password-stdin",
            stdin="a long enough password\n")
        token = run("token", "create", "ops").strip()
        report = healthz(port, token)
        assert report is not None
        components = report["components"]
        assert isinstance(components, dict)
        assert components["database"]["status"] == "up"
        assert components["database"]["dialect"] == "postgresql"
        assert components["model"] == {"status": "present", "name": "cspine-v1",
                                       "version": components["model"]["version"]}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            out, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            out, _ = server.communicate(timeout=10)
    assert server.returncode == 0, out.decode()
