"""Logging setup for every entry point (IDs in logs, never patient names)."""

from __future__ import annotations

import logging


def configure(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
