"""Ingest throughput: our SCP against DCMTK storescp and a bare pynetdicom SCP, one run.

The same DCMTK ``storescu`` client sends the same 300-slice 512 x 512 CT series (Explicit VR
Little Endian, about 157 MB) over loopback, to receivers writing to the same disk, first in one
association, then split over 4 concurrent associations. Peers:

* ``dcmtk-storescp`` - DCMTK ``storescp --fork`` (one process per association);
* ``pynetdicom-bare`` - a pynetdicom SCP with default settings whose C-STORE handler only
  writes ``event.encoded_dataset()`` to a file (no fsync, no checks, no database);
* ``cspine-triage`` - ``triage scp`` as shipped: structural check of every dataset, spool write
  with fsync + atomic link + directory fsync before Success, batched database bookkeeping
  (SQLite by default, as ``make run``), audit, ``--processes`` receivers sharing the port.

Both DCMTK tools run with ``TCP_NODELAY=1`` in their environment (DCMTK reads it; without it
they stall on delayed ACKs). The time is the client's wall time, first storescu start to last
storescu exit; each configuration runs ``--repeats`` times, interleaved, and the median is
reported. Every run starts after ``sync`` (outside the timed window), so no receiver pays
for the disk writeback of another's files. For our SCP the delay until every instance row is
in the database after the client finished is printed too (bookkeeping is off the hot path, so
it is not in the client's time).
Synthetic pixels, not clinical data.

    .venv/bin/python -m bench.ingest [--repeats 3] [--processes N] [--database-url URL]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.data.ctdata import SeriesSpec, WrittenSeries, write_series
from harness.dcmtk import dcmtk

BARE_SCP = textwrap.dedent("""
    import os, sys
    from pynetdicom import AE, evt, AllStoragePresentationContexts, ALL_TRANSFER_SYNTAXES
    port, out = int(sys.argv[1]), sys.argv[2]
    def handle_store(event):
        with open(os.path.join(out, event.request.AffectedSOPInstanceUID + ".dcm"), "wb") as f:
            f.write(event.encoded_dataset())
        return 0x0000
    ae = AE(ae_title="BARE")
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.maximum_associations = 64
    ae.start_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_STORE, handle_store)])
""")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"receiver exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {port}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def clear(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)


@dataclass
class Peer:
    """A receiver that is (re)started around each measured run."""

    name: str
    start: Callable[[int, Path], subprocess.Popen[bytes]]
    stored: Callable[[Path], int]
    """How many instances are on disk under the run directory."""
    restart_each_run: bool = False
    rows: Callable[[Path], int] | None = None
    """For our SCP: instance rows in the database."""


@dataclass
class Result:
    seconds: list[float] = field(default_factory=list)
    db_lag: list[float] = field(default_factory=list)


def dcmtk_tool(tool: str) -> str:
    """DCMTK's ``tool`` by what it is: with the virtualenv on PATH, ``storescp`` there is
    pynetdicom's script, which rejects ``--fork`` ("receiver exited with 2")."""
    path = dcmtk(tool)
    if path is None:
        raise RuntimeError(f"DCMTK's {tool} not found (Debian package dcmtk)")
    return path


def storescu_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def start_storescp(port: int, run_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([dcmtk_tool("storescp"), "--fork", "-aet", "STORESCP", "-od",
                             str(run_dir), str(port)], env=storescu_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def start_bare(port: int, run_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", BARE_SCP, str(port), str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def ours_factory(processes: int, database_url: str | None) -> Callable[[int, Path],
                                                                       subprocess.Popen[bytes]]:
    def start(port: int, run_dir: Path) -> subprocess.Popen[bytes]:
        from service.db import migrate

        data_dir = run_dir / "var"
        url = database_url or f"sqlite:///{data_dir / 'triage.db'}"
        data_dir.mkdir(parents=True, exist_ok=True)
        if database_url:
            _reset_postgres(database_url)
        migrate.upgrade(url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRIAGE_")}
        env.update({"TRIAGE_DATA_DIR": str(data_dir), "TRIAGE_DATABASE_URL": url,
                     "TRIAGE_AE_TITLE": "CSPINE_TRIAGE", "TRIAGE_LOG_LEVEL": "WARNING",
                     "TRIAGE_BROKER_URL": "redis://127.0.0.1:1/0",
                     "TRIAGE_BROKER_CONNECT_TIMEOUT_S": "0.2"})
        proc = subprocess.Popen([sys.executable, "-m", "service.cli", "scp", "--host",
                                 "127.0.0.1", "--port", str(port), "--processes",
                                 str(processes)], env=env, stdout=subprocess.DEVNULL,
                                stderr=(run_dir / "scp.log").open("wb"),
                                start_new_session=True)
        wait_port(port, proc)
        time.sleep(1.0 + 0.5 * processes)  # let every receiver process bind the port
        return proc

    return start


def _reset_postgres(url: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()


def count_files(run_dir: Path) -> int:
    return sum(1 for p in run_dir.rglob("*") if p.is_file())


def count_spool(run_dir: Path) -> int:
    spool = run_dir / "var" / "spool"
    return sum(1 for p in spool.rglob("*.dcm") if ".quarantine" not in p.parts)


def count_rows(database_url: str | None) -> Callable[[Path], int]:
    def rows(run_dir: Path) -> int:
        if database_url:
            from sqlalchemy import create_engine, text

            engine = create_engine(database_url)
            with engine.connect() as conn:
                value = int(conn.execute(text("SELECT count(*) FROM instance")).scalar_one())
            engine.dispose()
            return value
        with sqlite3.connect(run_dir / "var" / "triage.db", timeout=30) as conn:
            return int(conn.execute("SELECT count(*) FROM instance").fetchone()[0])

    return rows


def send(port: int, called: str, parts: Sequence[Sequence[Path]]) -> float:
    """Run one storescu per part concurrently; wall seconds from first start to last exit."""
    started = time.perf_counter()
    procs = [subprocess.Popen([dcmtk_tool("storescu"), "-aet", "BENCH", "-aec", called, "127.0.0.1",
                               str(port), *map(str, part)], env=storescu_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for part in parts]
    errors = []
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            errors.append(err.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError("storescu failed: " + " | ".join(errors))
    return elapsed


def measure(peer: Peer, called: str, parts: Sequence[Sequence[Path]], work: Path,
            expected: int, result: Result, state: dict[str, object]) -> None:
    """One timed run. Receivers start on an empty directory; what a run wrote is deleted
    right after it and synced, long before the next timed window (the disk is mounted with
    online discard here, and a fresh deletion slows the next journal commits)."""
    run_dir = work / peer.name
    proc = state.get(peer.name)
    if peer.restart_each_run or proc is None:
        clear(run_dir)
        port = free_port()
        proc = peer.start(port, run_dir)
        wait_port(port, proc)
        state[peer.name] = proc
        state[peer.name + ".port"] = port
    port = int(state[peer.name + ".port"])  # type: ignore[call-overload]
    # Start every run from a clean page cache: on ext4 (data=ordered) a journal commit also
    # writes out other files' dirty data, so without this the receiver that fsyncs would pay
    # for the writeback of whatever the previous (non-fsyncing) receiver left behind.
    os.sync()
    time.sleep(1.0)
    seconds = send(port, called, parts)
    result.seconds.append(seconds)
    stored = peer.stored(run_dir)
    if stored != expected:
        raise RuntimeError(f"{peer.name}: {stored} instances stored, expected {expected}")
    if peer.rows is not None:
        finished = time.perf_counter()
        deadline = finished + 60
        while peer.rows(run_dir) < expected:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"{peer.name}: database rows incomplete after 60 s")
            time.sleep(0.02)
        result.db_lag.append(time.perf_counter() - finished)
    if peer.restart_each_run and isinstance(proc, subprocess.Popen):
        stop(proc)
        state.pop(peer.name)
        clear(run_dir)
    else:
        for child in run_dir.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    os.sync()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--associations", default="1,4",
                        help="comma-separated numbers of concurrent associations")
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1,
                        help="receiver processes of our SCP (default: CPU count)")
    parser.add_argument("--database-url", help="PostgreSQL URL for our SCP (default SQLite); "
                        "its schema is dropped and recreated each run")
    parser.add_argument("--workdir", type=Path, default=Path("var/bench"),
                        help="where the series and every receiver's files go (one disk)")
    args = parser.parse_args(argv)
    for tool in ("storescu", "storescp"):
        if not dcmtk(tool):
            print(f"DCMTK's {tool} not found (pynetdicom's script of that name does not count): "
                  "install the Debian package dcmtk", file=sys.stderr)
            return 2

    args.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ingest-", dir=args.workdir))
    try:
        series: WrittenSeries = write_series(work / "series", SeriesSpec(
            slices=args.slices, rows=args.size, columns=args.size))
        total_mb = sum(p.stat().st_size for p in series.paths) / 1e6
        peers = [
            Peer("dcmtk-storescp", start_storescp, count_files),
            Peer("pynetdicom-bare", start_bare, count_files),
            Peer("cspine-triage", ours_factory(args.processes, args.database_url), count_spool,
                 restart_each_run=True, rows=count_rows(args.database_url)),
        ]
        called = {"dcmtk-storescp": "STORESCP", "pynetdicom-bare": "BARE",
                  "cspine-triage": "CSPINE_TRIAGE"}
        counts = [int(n) for n in args.associations.split(",")]
        results: dict[tuple[str, int], Result] = {}
        state: dict[str, object] = {}
        try:
            for n in counts:
                parts = [series.paths[i::n] for i in range(n)]
                for _ in range(args.repeats):
                    for peer in peers:
                        result = results.setdefault((peer.name, n), Result())
                        measure(peer, called[peer.name], parts, work, len(series.paths),
                                result, state)
        finally:
            for value in state.values():
                if isinstance(value, subprocess.Popen):
                    stop(value)
        report(results, counts, len(series.paths), total_mb, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict[tuple[str, int], Result], counts: Sequence[int], instances: int,
           total_mb: float, args: argparse.Namespace) -> None:
    db = "PostgreSQL" if args.database_url else "SQLite"
    print(f"ingest benchmark: {instances} x {args.size}x{args.size} CT, {total_mb:.1f} MB, "
          f"loopback, {os.cpu_count()} CPUs, TCP_NODELAY=1 for storescu/storescp, "
          f"median of {args.repeats}; our SCP: {args.processes} receiver process(es), {db}")
    print(f"{'assoc':>5}  {'receiver':<16} {'seconds':>8} {'inst/s':>8} {'MB/s':>7}  runs")
    for n in counts:
        for name in ("dcmtk-storescp", "pynetdicom-bare", "cspine-triage"):
            result = results[(name, n)]
            median = statistics.median(result.seconds)
            runs = " ".join(f"{s:.2f}" for s in result.seconds)
            extra = ""
            if result.db_lag:
                extra = f"  (all rows in DB {statistics.median(result.db_lag):.2f} s later)"
            print(f"{n:>5}  {name:<16} {median:>8.2f} {instances / median:>8.1f} "
                  f"{total_mb / median:>7.1f}  {runs}{extra}")
        ours = statistics.median(results[("cspine-triage", n)].seconds)
        bare = statistics.median(results[("pynetdicom-bare", n)].seconds)
        dcmtk = statistics.median(results[("dcmtk-storescp", n)].seconds)
        print(f"{n:>5}  ratio (throughput): cspine-triage / pynetdicom-bare = {bare / ours:.2f}, "
              f"cspine-triage / dcmtk-storescp = {dcmtk / ours:.2f}, "
              f"pynetdicom-bare / dcmtk-storescp = {dcmtk / bare:.2f}")


if __name__ == "__main__":
    sys.exit(main())
