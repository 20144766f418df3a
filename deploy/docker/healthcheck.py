#!/usr/bin/env python3
"""Container health probe for every cspine-triage component (Docker ``HEALTHCHECK``).

One image runs ``triage web``, ``triage scp`` or ``triage worker``, so the image's
HEALTHCHECK finds the component in PID 1's command line unless it is named as the argument
(docker-compose names it). Ports and hosts come from :class:`service.config.Settings`, the
same settings the component itself reads, so a changed ``TRIAGE_WEB_PORT`` moves the probe too.

* ``web`` / ``serve``: ``GET /healthz`` answers 200 (it answers 503 when the database or the
  broker is down, which is what "unhealthy" should mean for the dashboard).
* ``scp``: the DICOM port accepts a TCP connection. No association is opened, so the probe
  leaves no association in the audit trail.
* ``worker``: the broker answers PING. A hung task is the task time limits' job.

Exit status 0 is healthy, 1 unhealthy; one line on stdout says why (Docker keeps it).
"""

from __future__ import annotations

import argparse
import http.client
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

COMPONENTS = ("web", "scp", "worker", "serve")
TIMEOUT_S = 5.0


def detect_component(cmdline: Sequence[str]) -> str | None:
    """The first argument that names a component, e.g. ``tini -- triage scp`` -> ``scp``."""
    for arg in cmdline[1:]:
        if arg in COMPONENTS:
            return arg
    return None


def pid1_cmdline(proc: Path = Path("/proc/1/cmdline")) -> list[str]:
    try:
        raw = proc.read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _local(host: str) -> str:
    """A wildcard bind address is probed on loopback; a specific one is probed as is."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def check_http(host: str, port: int, path: str = "/healthz") -> tuple[bool, str]:
    connection = http.client.HTTPConnection(_local(host), port, timeout=TIMEOUT_S)
    try:
        connection.request("GET", path)
        status = connection.getresponse().status
    except OSError as exc:
        return False, f"GET {path} on port {port}: {type(exc).__name__}: {exc}"
    finally:
        connection.close()
    return status == 200, f"GET {path} on port {port}: HTTP {status}"


def check_tcp(host: str, port: int) -> tuple[bool, str]:
    try:
        with socket.create_connection((_local(host), port), timeout=TIMEOUT_S):
            pass
    except OSError as exc:
        return False, f"TCP port {port}: {type(exc).__name__}: {exc}"
    return True, f"TCP port {port}: accepting"


def check_broker(broker_url: str | None) -> tuple[bool, str]:
    if not broker_url:
        return False, "no broker configured (TRIAGE_BROKER_URL)"
    import redis

    client = redis.Redis.from_url(broker_url, socket_connect_timeout=TIMEOUT_S,
                                  socket_timeout=TIMEOUT_S)
    try:
        client.ping()
    except redis.RedisError as exc:
        return False, f"broker: {type(exc).__name__}"
    finally:
        client.close()
    return True, "broker: PONG"


def check(component: str) -> tuple[bool, str]:
    from service.config import Settings

    settings = Settings()
    if component in ("web", "serve"):
        return check_http(settings.web_host, settings.web_port)
    if component == "scp":
        return check_tcp(settings.dicom_host, settings.dicom_port)
    if component == "worker":
        return check_broker(settings.broker_url)
    raise ValueError(f"unknown component {component!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("component", nargs="?", choices=COMPONENTS,
                        help="default: found in PID 1's command line")
    args = parser.parse_args(argv)
    component = args.component or detect_component(pid1_cmdline())
    if component is None:
        # Nothing we know how to probe (e.g. a one-off `triage db upgrade`): not unhealthy.
        print("no long-running triage component in PID 1; nothing to probe")
        return 0
    healthy, reason = check(component)
    print(f"{component}: {'healthy' if healthy else 'UNHEALTHY'}: {reason}")
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
