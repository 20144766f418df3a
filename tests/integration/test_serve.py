"""`triage serve` on embedded defaults: SQLite, ./var, its own redis-server; Ctrl-C stops all."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from harness.process import free_port


@pytest.mark.slow
def test_serve_starts_everything_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
    env.update({"TRIAGE_WEB_PORT": str(port), "TRIAGE_DICOM_PORT": str(free_port())})
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve"], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    body = None
    try:
        deadline = time.monotonic() + 180  # three Python processes starting on a loaded CI machine
        while time.monotonic() < deadline and body is None:
            assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.3)
        assert body is not None, "web never answered /healthz"
        assert body == {"status": "ok"}, "an anonymous caller gets the status alone"
        # The full report needs an admin or an API token: made with the CLI, as a site would.
        cli = [sys.executable, "-m", "service.cli"]
        subprocess.run([*cli, "user", "add", "ops", "--role", "admin", "--password-stdin"],
                       cwd=tmp_path, env=env, input=b"a long enough password\n", check=True)
        token = subprocess.run([*cli, "token", "create", "ops"], cwd=tmp_path, env=env,
                               check=True, capture_output=True).stdout.decode().strip()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz",
                                         headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=5) as r:
            body = json.loads(r.read())
        assert body["components"]["database"]["status"] == "up"
        assert body["components"]["database"]["dialect"] == "sqlite"
        assert body["components"]["broker"]["status"] == "up"
        assert (tmp_path / "var" / "triage.db").is_file()
        # No TRIAGE_SECRET_KEY here (as with `make run`): serve made one, and the web app,
        # which refuses the public placeholder, started with it.
        key = tmp_path / "var" / "secret-key"
        assert key.is_file() and oct(key.stat().st_mode & 0o777) == "0o600"
        children = psutil.Process(proc.pid).children(recursive=True)
        assert any("redis-server" in c.name() for c in children)
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out.decode()
    assert b"cspine-triage stopped" in out
    for child in children:
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
