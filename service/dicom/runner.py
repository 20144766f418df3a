"""Assembling and running the ingest side: ``triage scp`` and ``triage tracker``.

One :class:`IngestNode` is one receiver process: spool, bookkeeper thread, SCP server thread
and (optionally) the tracker thread. With ``scp_processes`` > 1 the supervisor first rebuilds
the database from the spool once, then starts that many receiver processes that all bind the
DICOM port with ``SO_REUSEPORT`` (the kernel spreads associations over them, so several
associations use several cores despite the GIL) and runs the tracker itself. The processes
share nothing in memory: files in the spool and rows in the database.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from types import FrameType
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db.session import make_engine, make_session_factory
from service.dicom.scp import StorageSCP
from service.dicom.security import server_ssl_context
from service.ingest.bookkeeper import Bookkeeper, RebuildReport, rebuild_from_spool
from service.ingest.spool import Spool
from service.ingest.tracker import Tracker

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
RETRY_DATABASE_S = 5.0


class NotMigrated(RuntimeError):
    """The database schema is not at the head revision: run ``triage db upgrade``."""


def check_schema(engine: Engine, settings: Settings) -> None:
    from service.db import migrate

    current = migrate.current_revision(engine)
    head = migrate.head_revision(settings.db_url)
    if current != head:
        raise NotMigrated(f"database at revision {current}, code expects {head}: "
                          "run `triage db upgrade`")


def check_schema_if_reachable(engine: Engine, settings: Settings) -> bool:
    """:func:`check_schema`, but a database that does not answer is not fatal: ``False``.

    The SCP keeps receiving into the spool while the database is down (the spool is the
    truth); the bookkeeper writes the rows when it is back.
    """
    try:
        check_schema(engine, settings)
    except OperationalError as exc:
        logger.error("database unavailable at start (%s): receiving into the spool anyway; "
                     "rows are written when it is back", str(exc).splitlines()[0][:200])
        return False
    return True


def start_rebuild(engine: Engine, factory: sessionmaker[Session], spool: Spool,
                  settings: Settings, stop: threading.Event) -> RebuildReport | None:
    """Rebuild database rows from the spool now, or - database down - as soon as it is back,
    in a background thread (receiving does not wait for it)."""
    def rebuild() -> RebuildReport:
        return rebuild_from_spool(
            spool, factory,
            use_images_in_acquisition=settings.completion_use_images_in_acquisition)

    if check_schema_if_reachable(engine, settings):
        return rebuild()

    def retry() -> None:
        reported = False
        while not stop.wait(RETRY_DATABASE_S):
            try:
                check_schema(engine, settings)
                rebuild()
                logger.info("database back: spool rebuild done")
                return
            except OperationalError:
                continue
            except NotMigrated as exc:  # reachable but not migrated yet: keep waiting
                if not reported:
                    logger.error("%s", exc)
                    reported = True

    threading.Thread(target=retry, name="ingest-rebuild", daemon=True).start()
    return None


def make_spool(settings: Settings) -> Spool:
    spool = Spool(settings.spool_path, min_free_bytes=settings.spool_min_free_mb * MIB,
                  fsync_directory=settings.spool_fsync_directory)
    spool.prepare()
    return spool


class IngestNode:
    """One receiver process's worth of ingest machinery."""

    def __init__(self, settings: Settings, *, with_tracker: bool = True,
                 rebuild: bool = True, reuse_port: bool = False) -> None:
        self.settings = settings
        self.with_tracker = with_tracker
        self.rebuild = rebuild
        self.reuse_port = reuse_port
        self.engine: Engine | None = None
        self.session_factory: sessionmaker[Session] | None = None
        self.spool: Spool | None = None
        self.bookkeeper: Bookkeeper | None = None
        self.tracker: Tracker | None = None
        self.scp: StorageSCP | None = None
        self.rebuild_report: RebuildReport | None = None
        self._stop_event = threading.Event()

    def start(self, host: str | None = None, port: int | None = None) -> int:
        """Rebuild (if asked), start bookkeeper, SCP and tracker; returns the bound port."""
        settings = self.settings
        self.engine = make_engine(settings.db_url)
        self.session_factory = make_session_factory(self.engine)
        self.spool = make_spool(settings)
        if self.rebuild:
            self.rebuild_report = start_rebuild(self.engine, self.session_factory, self.spool,
                                                settings, self._stop_event)
        else:
            check_schema_if_reachable(self.engine, settings)
        if self.with_tracker:
            self.tracker = Tracker(self.session_factory, settings, self.spool)
        self.bookkeeper = Bookkeeper(
            self.session_factory, interval_s=settings.ingest_batch_interval_s,
            use_images_in_acquisition=settings.completion_use_images_in_acquisition,
            on_flushed=self.tracker.wake if self.tracker else None)
        self.bookkeeper.start()
        self.scp = StorageSCP(settings, self.spool, self.bookkeeper, self.session_factory,
                              ssl_context=server_ssl_context(settings),
                              reuse_port=self.reuse_port)
        _, bound_port = self.scp.start(host, port)
        if self.tracker is not None:
            self.tracker.start()
        return bound_port

    def stop(self, grace_s: float = 10.0) -> None:
        """Stop accepting, finish running associations, flush, stop the tracker."""
        self._stop_event.set()
        if self.scp is not None:
            self.scp.stop(grace_s)
        if self.bookkeeper is not None:
            self.bookkeeper.stop(timeout_s=10.0)
        if self.tracker is not None:
            self.tracker.stop()
        if self.engine is not None:
            self.engine.dispose()


def _wait_for_signal(extra_check: Any = None) -> None:
    stop = threading.Event()

    def _handler(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, _handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(0.5):
            if extra_check is not None and not extra_check():
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _receiver_main(settings: Settings, parent_pid: int) -> None:
    """Body of one receiver process (spawned): SCP + bookkeeper, no tracker, no rebuild."""
    from service.logs import configure

    configure(settings.log_level)
    node = IngestNode(settings, with_tracker=False, rebuild=False, reuse_port=True)
    node.start()
    try:
        # Exit with the supervisor, even if it was killed with SIGKILL.
        _wait_for_signal(lambda: os.getppid() == parent_pid)
    finally:
        node.stop()


def serve_scp(settings: Settings, *, processes: int | None = None, with_tracker: bool = True,
              rebuild: bool = True) -> int:
    """Run the SCP until SIGINT/SIGTERM; see the module docstring."""
    processes = processes or settings.scp_processes
    if processes <= 1:
        node = IngestNode(settings, with_tracker=with_tracker, rebuild=rebuild)
        port = node.start()
        print(f"DICOM SCP {settings.ae_title} on {settings.dicom_host}:{port}", flush=True)
        try:
            _wait_for_signal()
        finally:
            node.stop()
        return 0

    engine = make_engine(settings.db_url)
    factory = make_session_factory(engine)
    spool = make_spool(settings)
    stopping = threading.Event()
    if rebuild:
        start_rebuild(engine, factory, spool, settings, stopping)
    else:
        check_schema_if_reachable(engine, settings)
    tracker = Tracker(factory, settings, spool) if with_tracker else None
    context = multiprocessing.get_context("spawn")
    children: list[Any] = []

    def spawn(index: int) -> Any:
        child = context.Process(target=_receiver_main, args=(settings, os.getpid()),
                                name=f"scp-receiver-{index}", daemon=False)
        child.start()
        return child

    children = [spawn(i) for i in range(processes)]
    if tracker is not None:
        tracker.start()
    print(f"DICOM SCP {settings.ae_title} on {settings.dicom_host}:{settings.dicom_port} "
          f"({processes} receiver processes)", flush=True)
    restarts = 0

    def supervise() -> bool:
        nonlocal restarts
        for index, child in enumerate(children):
            if not child.is_alive():
                restarts += 1
                logger.error("receiver %d exited with %s; restarting", index, child.exitcode)
                time.sleep(min(5.0, 0.5 * restarts))
                children[index] = spawn(index)
        return True

    try:
        _wait_for_signal(supervise)
    finally:
        stopping.set()
        for child in children:
            if child.is_alive() and child.pid is not None:
                os.kill(child.pid, signal.SIGTERM)
        for child in children:
            child.join(30)
            if child.is_alive():
                child.kill()
        if tracker is not None:
            tracker.stop()
        engine.dispose()
    return 0


def serve_tracker(settings: Settings) -> int:
    """Only the tracker loop (completion, qualification, enqueue), for separate deployment."""
    engine = make_engine(settings.db_url)
    check_schema_if_reachable(engine, settings)
    tracker = Tracker(make_session_factory(engine), settings, make_spool(settings))
    tracker.start()
    print("ingest tracker running", flush=True)
    try:
        _wait_for_signal()
    finally:
        tracker.stop()
        engine.dispose()
    return 0
