#!/usr/bin/env python3
"""Print the runtime requirements of cspine-triage for an image build, one per line.

Why this exists: the CPU runtime dependency ``onnxruntime`` and the ``gpu`` extra's
``onnxruntime-gpu`` install the same import package (``onnxruntime/``). pip installing both
leaves the one installed first partly overwritten, and uninstalling either one deletes files
the other needs. The GPU image therefore installs the runtime list printed by
``--extra gpu --exclude onnxruntime`` and then the project itself with ``--no-deps``.

Only the standard library is used: this runs in a fresh build virtualenv before anything is
installed (``packaging`` is not importable there).
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def normalize(name: str) -> str:
    """PEP 503 name normalization: ``Foo_Bar.baz`` and ``foo-bar-baz`` are one project."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if not match:
        raise ValueError(f"cannot read a project name from requirement {requirement!r}")
    return normalize(match.group(1))


def runtime_requirements(pyproject: Path, extras: list[str], exclude: list[str]) -> list[str]:
    """The ``[project] dependencies`` plus the named extras, minus the excluded projects.

    Raises ``KeyError`` for an extra that ``pyproject.toml`` does not define, so a renamed
    extra fails the image build instead of silently installing nothing.
    """
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    wanted: list[str] = list(project.get("dependencies", []))
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise KeyError(f"pyproject.toml defines no extra {extra!r}")
        wanted.extend(optional[extra])
    dropped = {normalize(name) for name in exclude}
    out: list[str] = []
    for requirement in wanted:
        if requirement_name(requirement) in dropped or requirement in out:
            continue
        out.append(requirement)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--extra", action="append", default=[], help="extra to add (repeatable)")
    parser.add_argument("--exclude", action="append", default=[],
                        help="project to leave out (repeatable)")
    args = parser.parse_args(argv)
    for line in runtime_requirements(args.pyproject, args.extra, args.exclude):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
