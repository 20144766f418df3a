"""Worker heartbeats on the broker: which workers are up, on which execution provider, with
which model (version and manifest hash).

Each worker process writes one Redis key, ``<WORKER_KEY_PREFIX><host>:<pid>``, holding a JSON
object, with a TTL of ``ttl_s``, and a daemon thread rewrites it every ``interval_s``. A
worker that dies (SIGKILL, OOM, lost host) therefore drops off the status page within one TTL
without anybody cleaning up, and a live worker never expires while it runs (a one-shot key
with a TTL, as first written, vanished two minutes after start while the worker was still
serving). Readers (``service.health``, the admin status page, ``/metrics``) read the keys by
:data:`service.queue.WORKER_KEY_PATTERN` and need no import of the worker.

The thread never raises: a broker that is down costs a warning and the next beat retries.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from service.queue import WORKER_KEY_PATTERN, WORKER_KEY_PREFIX

logger = logging.getLogger(__name__)

HEARTBEAT_TTL_S = 90
"""Seconds a heartbeat lives without a refresh: a worker gone longer than this is not shown."""
HEARTBEAT_INTERVAL_S = 20.0
"""Seconds between beats: several beats per TTL, so one lost write does not drop a worker."""


def _redis_client(broker_url: str, timeout_s: float) -> Any:
    import redis

    return redis.Redis.from_url(broker_url, socket_timeout=timeout_s,
                                socket_connect_timeout=timeout_s)


def worker_key(host: str, pid: int) -> str:
    return f"{WORKER_KEY_PREFIX}{host}:{pid}"


class Heartbeat:
    """Publishes ``info`` (plus ``at``, the time of the beat, ISO 8601 UTC) under the worker's
    key until :meth:`stop`; ``info`` must hold ``host`` and ``pid``."""

    def __init__(self, broker_url: str, info: dict[str, Any], *,
                 ttl_s: int = HEARTBEAT_TTL_S, interval_s: float = HEARTBEAT_INTERVAL_S,
                 client_factory: Callable[[], Any] | None = None) -> None:
        if interval_s >= ttl_s:
            raise ValueError("the heartbeat interval must be shorter than its TTL")
        self.key = worker_key(str(info["host"]), int(info["pid"]))
        self.info = dict(info)
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self._client_factory = client_factory or (lambda: _redis_client(broker_url, 2.0))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> bool:
        """Write the key once; False (and a warning) when the broker cannot be reached."""
        payload = {**self.info, "at": datetime.now(UTC).isoformat(),
                   "heartbeat_ttl_s": self.ttl_s}
        try:
            client = self._client_factory()
            try:
                client.set(self.key, json.dumps(payload, default=str), ex=self.ttl_s)
            finally:
                client.close()
        except Exception:  # noqa: BLE001 - a heartbeat never takes the worker down
            logger.warning("worker heartbeat %s not written", self.key, exc_info=True)
            return False
        return True

    def start(self) -> Heartbeat:
        """Beat now, then every ``interval_s`` from a daemon thread."""
        self.beat()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="worker-heartbeat",
                                            daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def stop(self) -> None:
        """Stop beating and remove the key (a clean shutdown leaves no stale worker)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            client = self._client_factory()
            try:
                client.delete(self.key)
            finally:
                client.close()
        except Exception:  # noqa: BLE001
            logger.warning("worker heartbeat %s not removed", self.key, exc_info=True)


def read_heartbeats(client: Any, limit: int = 200) -> list[dict[str, Any]]:
    """The live heartbeats (expired keys are gone), sorted by key; unreadable values skipped.

    ``client`` is a ``redis.Redis``; errors reaching it propagate to the caller, which decides
    how to show an unknown state.
    """
    keys = sorted(client.scan_iter(WORKER_KEY_PATTERN, count=100))[:limit]
    values = client.mget(keys) if keys else []
    out: list[dict[str, Any]] = []
    for value in values:
        if not value:
            continue
        try:
            data = json.loads(value)
        except ValueError:
            continue
        if isinstance(data, dict):
            out.append(data)
    return out
