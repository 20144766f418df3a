"""Jinja2 templates and the filters they use (durations, probabilities, priority styles)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from fastapi.templating import Jinja2Templates

TEMPLATE_DIR = Path(__file__).parent / "templates"
STATIC_DIR = Path(__file__).parent / "static"


def duration(seconds: float | None) -> str:
    """``4 min 05 s``, ``2 h 03 min``; an em dash when unknown."""
    if seconds is None:
        return "\u2014"
    sign = "-" if seconds < 0 else ""
    total = int(round(abs(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{sign}{hours} h {minutes:02d} min {secs:02d} s"
    if minutes:
        return f"{sign}{minutes} min {secs:02d} s"
    return f"{sign}{secs} s"


def percent(value: float | None) -> str:
    return "\u2014" if value is None else f"{value * 100:.0f} %"


def utc(value: datetime | None) -> str:
    if value is None:
        return "\u2014"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def iso(value: datetime | None) -> str:
    return "" if value is None else value.astimezone(UTC).isoformat()


def dicom_date(value: str | None) -> str:
    if not value or len(value) != 8 or not value.isdigit():
        return value or "\u2014"
    return f"{value[:4]}-{value[4:6]}-{value[6:]}"


def person_name(value: str | None) -> str:
    """DICOM PN ``Family^Given`` as ``Family, Given``."""
    if not value:
        return "\u2014"
    parts = [p for p in value.split("^") if p]
    return ", ".join(parts[:2]) + (" " + " ".join(parts[2:]) if len(parts) > 2 else "")


def make_templates() -> Jinja2Templates:
    templates = Jinja2Templates(directory=str(TEMPLATE_DIR))
    templates.env.filters.update(duration=duration, percent=percent, utc=utc, iso=iso,
                                 dicom_date=dicom_date, person_name=person_name)
    return templates
