"""The import contracts of ``.importlinter`` hold (DESIGN.md's boundaries, checked in CI).

``lint-imports`` runs from the repository root (it puts the working directory on the path, so
the training package ``models`` is found beside ``service``). A broken contract fails here
with import-linter's own report: the chain of imports that crosses the boundary.
"""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / ".importlinter"


def test_import_contracts_hold() -> None:
    proc = subprocess.run(
        [sys.executable, "-c",
         "import sys; from importlinter.cli import lint_imports_command; "
         "sys.exit(lint_imports_command())",
         "--no-cache", "--no-logo"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report
    assert "0 broken" in report, report


def test_contracts_are_the_designed_ones_and_unloosened() -> None:
    """The contracts exist as DESIGN.md states them, and none is weakened by ignores."""
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    contracts = {s.removeprefix("importlinter:contract:"): parser[s]
                 for s in parser.sections() if s.startswith("importlinter:contract:")}
    assert set(contracts) == {"layers", "edge-not-model", "only-worker-runs-models",
                              "no-torch", "acyclic", "bench-not-tests", "suites-apart",
                              "service-not-harness", "conftest-fixtures-only"}
    for name, contract in contracts.items():
        assert "ignore_imports" not in contract, f"{name}: fix the import, do not ignore it"
    layers = [line.split() for line in contracts["layers"]["layers"].strip().splitlines()]
    floor = {name: i for i, line in enumerate(layers) for name in line if name != "|"}
    assert layers[-1] == ["shipped"]  # where the model and migrations are: below config
    assert {"config", "outcomes"} <= set(layers[-2]) and layers[-3] == ["db"]
    assert floor["findings"] > floor["results"] and floor["findings"] > floor["inference"]
    edge = contracts["edge-not-model"]
    assert {"service.web", "service.dicom", "service.ingest"} <= set(edge["source_modules"].split())
    assert {"service.inference", "service.worker", "models", "torch"} <= set(
        edge["forbidden_modules"].split())
    apart = contracts["bench-not-tests"]
    assert set(apart["source_modules"].split()) == {"bench", "harness"}
    assert apart["forbidden_modules"].split() == ["tests"]
    suites = contracts["suites-apart"]
    assert {"tests.integration", "tests.e2e"} <= set(suites["source_modules"].split())
    assert suites["forbidden_modules"].split() == ["tests.unit"]
