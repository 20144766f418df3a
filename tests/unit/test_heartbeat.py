"""Worker heartbeats on the real Redis: written with a TTL, refreshed while the worker runs,
removed at a clean stop, read back by the status page's reader."""

from __future__ import annotations

import time

import pytest

from service.heartbeat import Heartbeat, read_heartbeats, worker_key
from service.queue import WORKER_KEY_PREFIX


def test_beats_refresh_and_stop(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    beat = Heartbeat(redis_url, {"host": "node-a", "pid": 77, "version": "1.5.0",
                                 "execution_provider": "CPUExecutionProvider"},
                     ttl_s=3, interval_s=0.5).start()
    try:
        key = worker_key("node-a", 77)
        assert key.startswith(WORKER_KEY_PREFIX)
        first = read_heartbeats(client)
        assert [w["pid"] for w in first] == [77] and first[0]["heartbeat_ttl_s"] == 3
        assert 0 < client.ttl(key) <= 3
        time.sleep(3.5)  # longer than the TTL: only the refresh keeps it alive
        again = read_heartbeats(client)
        assert len(again) == 1 and again[0]["at"] > first[0]["at"]
    finally:
        beat.stop()
    assert read_heartbeats(client) == []
    client.close()


def test_expires_without_refresh_and_skips_garbage(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    assert Heartbeat(redis_url, {"host": "dead", "pid": 1}, ttl_s=1, interval_s=0.5).beat()
    client.set(WORKER_KEY_PREFIX + "junk:2", b"not json")
    assert [w["host"] for w in read_heartbeats(client)] == ["dead"]
    time.sleep(1.5)
    assert read_heartbeats(client) == []  # a worker killed with SIGKILL drops off
    client.close()


def test_broker_down_costs_a_warning_not_the_worker() -> None:
    beat = Heartbeat("redis://127.0.0.1:1/0", {"host": "x", "pid": 2}, ttl_s=5, interval_s=1)
    assert beat.beat() is False
    with pytest.raises(ValueError):
        Heartbeat("redis://127.0.0.1:1/0", {"host": "x", "pid": 2}, ttl_s=5, interval_s=5)
