"""Private Redis and PostgreSQL servers that a test may stop, kill and restart.

The shared servers on 127.0.0.1:5432 and :6379 serve every engineer's tests at once: a fault
test must never restart them. :class:`RedisServer` and :class:`PostgresServer` start a server
of their own on a free loopback port, in a temporary directory, and can stop it (gracefully
or with SIGKILL) and start it again *on the same port*, so the service under test, which
keeps its configured URL, sees a real outage and a real return.

- Redis: ``redis-server --port P --save "" --appendonly no`` by default: nothing persists, so
  a restart loses every queued message, the harshest broker restart (``appendonly=True``
  gives the docker-compose configuration, where the append-only file keeps them).
- PostgreSQL: ``initdb`` + ``pg_ctl`` (trust authentication on loopback, ``fsync=off``: a
  test cluster). ``initdb`` refuses to run as root, so as root every PostgreSQL command runs
  as the ``postgres`` user through ``runuser``, in a directory that user owns.

A missing binary fails the test under ``TEST_REQUIRE_SERVICES`` and skips it elsewhere,
naming the Debian package (:func:`harness.services.missing`).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from harness.process import free_port
from harness.services import missing

REDIS_SERVER = "/usr/bin/redis-server"
PG_BIN_DIRS = ("/usr/local/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")


def _wait_port(port: int, up: bool, timeout_s: float) -> None:
    import socket

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.3):
                if up:
                    return
        except OSError:
            if not up:
                return
        time.sleep(0.05)
    raise AssertionError(f"port {port} still {'closed' if up else 'open'} after {timeout_s} s")


class RedisServer:
    """A redis-server of our own; ``url(db)`` stays valid across :meth:`restart`."""

    def __init__(self, workdir: Path | None = None, *, port: int | None = None,
                 appendonly: bool = False) -> None:
        binary = shutil.which("redis-server") or (REDIS_SERVER if Path(REDIS_SERVER).is_file()
                                                  else None)
        if binary is None:
            missing("redis-server absent (Debian package redis-server)")
        assert binary is not None
        self.binary = binary
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="redis-"))
        self.port = port or free_port()
        self.appendonly = appendonly
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.workdir), "--save", "",
             "--appendonly", "yes" if self.appendonly else "no"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        _wait_port(self.port, True, 20)
        self.starts += 1
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, kill: bool = False) -> None:
        """SIGTERM (Redis writes its append-only file and exits) or SIGKILL."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        _wait_port(self.port, False, 10)

    def restart(self, *, kill: bool = False, down_s: float = 0.0) -> None:
        self.stop(kill=kill)
        time.sleep(down_s)
        self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop(kill=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def _pg_binary(name: str) -> str:
    for directory in PG_BIN_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file():
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        missing(f"{name} absent (Debian package postgresql)")
    assert found is not None
    return found


class PostgresServer:
    """A PostgreSQL cluster of our own (superuser ``postgres``, trust auth on loopback)."""

    def __init__(self, *, port: int | None = None) -> None:
        self.initdb = _pg_binary("initdb")
        self.pg_ctl = _pg_binary("pg_ctl")
        self.port = port or free_port()
        self._as_root = os.geteuid() == 0
        if self._as_root:
            try:
                self._owner = pwd.getpwnam("postgres")
            except KeyError:
                missing("no 'postgres' user to run initdb as (initdb refuses root)")
        # Not under pytest's tmp_path: that is private to root and the server runs as
        # 'postgres'.
        self.workdir = Path(tempfile.mkdtemp(prefix="pg-"))
        self.data = self.workdir / "data"
        self.log = self.workdir / "postgres.log"
        if self._as_root:
            os.chown(self.workdir, self._owner.pw_uid, self._owner.pw_gid)
        self.starts = 0

    def _run(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        command = list(args)
        if self._as_root:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s,
                                check=False, cwd=self.workdir)
        if result.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise AssertionError(f"{' '.join(args[:2])} failed ({result.returncode}): "
                                 f"{result.stderr[-2000:]}\n{tail}")
        return result

    @property
    def admin_url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        if not (self.data / "PG_VERSION").is_file():
            self._run(self.initdb, "-D", str(self.data), "-A", "trust", "-U", "postgres",
                      "-E", "UTF8", "--no-sync")
        self._run(self.pg_ctl, "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
                  "-o", f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 "
                        "-c fsync=off -c max_connections=200", "start")
        self.starts += 1
        return self

    def stop(self, *, mode: str = "fast") -> None:
        """``fast`` (clients disconnected, clean shutdown) or ``immediate`` (a crash: no
        checkpoint, recovery on the next start)."""
        if (self.data / "postmaster.pid").exists():
            self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self, *, mode: str = "fast", down_s: float = 0.0) -> None:
        self.stop(mode=mode)
        time.sleep(down_s)
        self.start()

    def create_database(self, name: str) -> str:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            engine.dispose()
        return self.url(name)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)
