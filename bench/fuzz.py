"""Hostile input at scale: the fuzz strategies of ``tests/fuzz`` with many more examples.

Runs each surface of ``harness/fuzz.py`` in a fresh child process (so each peak RSS is its
own) and prints one table: surface, inputs tried, outcomes by DIMSE status or reason code,
crashes (a property violated: an undeclared exception, 0xC211, a Success for broken bytes,
a refused dataset in the spool, a time or traced-memory bound exceeded; must be 0) and peak
RSS. Surfaces:

* ``scan``: ``scan_dataset`` on byte-mutated datasets (outcome: keys / UndecodableDataset);
* ``handler``: the SCP's C-STORE handler in process (outcome: DIMSE status);
* ``network``: a real SCP (``IngestNode`` on a free port) and a pynetdicom SCU sending
  batches of 8 hostile datasets in one association each (outcome: DIMSE status);
* ``header``: ``InstanceHeader`` / ``read_header_bytes`` on hostile values (parsed /
  UnreadableHeader);
* ``volume``: ``load_volume`` on hostile series (loaded / SeriesReason);
* ``series``: ``--series`` one-slice series through bookkeeper and tracker (series state and
  reason; "analyses" and "queued" must stay 0).

There is no peer to compare with: the figure is "crashes = 0" at a count CI cannot afford.

    .venv/bin/python -m bench.fuzz [--examples 1000] [--series 10000] [--only scan,header]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

SURFACES = ("scan", "handler", "network", "header", "volume", "series")
NETWORK_BATCH = 8


def _run_given(strategy: Any, body: Callable[[Any], str], examples: int,
               randomize: bool) -> tuple[Counter[str], list[str]]:
    """Run ``body`` on ``examples`` hypothesis examples; tally outcomes, collect crashes."""
    from hypothesis import HealthCheck, given, settings

    from harness.fuzz import PropertyViolation, pass_interrupts

    outcomes: Counter[str] = Counter()
    crashes: list[str] = []

    @settings(max_examples=examples, deadline=None, derandomize=not randomize,
              database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def run(value: Any) -> None:
        try:
            outcomes[body(value)] += 1
        except PropertyViolation as exc:
            outcomes["CRASH"] += 1
            crashes.append(str(exc)[:300])
        except BaseException as exc:  # noqa: BLE001 - a crash of the harness counts too
            pass_interrupts(exc)
            outcomes["CRASH"] += 1
            crashes.append(f"{type(exc).__name__}: {exc}"[:300])

    run()
    return outcomes, crashes


def surface(name: str, examples: int, series: int, workdir: Path,
            randomize: bool) -> dict[str, Any]:
    """One surface in this process; returns the row of the table."""
    from hypothesis import strategies as st

    from harness import fuzz
    from harness.peers.dicom import CALLED
    from service.config import Settings
    from service.dicom.runner import make_spool
    from service.dicom.scp import StorageSCP

    started = time.perf_counter()
    crashes: list[str] = []
    outcomes: Counter[str] = Counter()
    if name == "scan":
        outcomes, crashes = _run_given(
            fuzz.mutations(), lambda m: fuzz.check_scan(m, max_inflated_bytes=fuzz.MIB),
            examples, randomize)
    elif name == "handler":
        config = Settings(data_dir=workdir, ae_title=CALLED, spool_min_free_mb=0,
                          max_inflated_dataset_mb=1)
        scp = StorageSCP(config, make_spool(config), fuzz.RecordingBookkeeper())  # type: ignore[arg-type]
        outcomes, crashes = _run_given(
            fuzz.mutations(), lambda m: fuzz.outcome_of(fuzz.check_store_handler(scp, m)),
            examples, randomize)
    elif name == "network":
        from service.db import migrate
        from service.dicom.runner import IngestNode

        config = Settings(data_dir=workdir, ae_title=CALLED, spool_min_free_mb=0,
                          ingest_batch_interval_s=0.05, broker_url="redis://127.0.0.1:1/0",
                          broker_connect_timeout_s=0.3, max_inflated_dataset_mb=1)
        migrate.upgrade(config.db_url)
        node = IngestNode(config, with_tracker=False)
        node.start("127.0.0.1", 0)
        assert node.scp is not None and node.spool is not None
        port, root = node.scp.port, Path(node.spool.root)
        tally: Counter[str] = Counter()

        def send(batch: list[fuzz.Mutation]) -> str:
            statuses = fuzz.check_network_store(port, batch, workdir / "outgoing", root)
            tally.update(fuzz.outcome_of(s) for s in statuses)
            return "batch"

        try:
            batches, crashes = _run_given(
                st.lists(fuzz.mutations(), min_size=NETWORK_BATCH, max_size=NETWORK_BATCH),
                send, max(examples // NETWORK_BATCH, 1), randomize)
        finally:
            node.stop(grace_s=2)
        outcomes = tally
        if batches.get("CRASH"):
            outcomes["CRASH"] = batches["CRASH"]
    elif name == "header":
        outcomes, crashes = _run_given(fuzz.header_elements(), fuzz.check_header, examples,
                                       randomize)
    elif name == "volume":
        counter = iter(range(10**9))

        def load(case: fuzz.SeriesCase) -> str:
            paths = fuzz.write_series_case(case, workdir / f"s{next(counter)}")
            try:
                return fuzz.check_volume(case, paths)
            finally:
                for path in paths:
                    path.unlink()

        outcomes, crashes = _run_given(fuzz.series_cases(), load, examples, randomize)
    elif name == "series":
        report = fuzz.run_one_slice_series(series, workdir, trace_memory=False)
        outcomes = Counter(report.outcomes)
        outcomes["analyses"] = report.analyses
        outcomes["queued"] = report.queued
        if report.recorded != series:
            crashes.append(f"{series} series sent, {report.recorded} recorded")
        if report.analyses or report.queued:
            crashes.append(f"{report.analyses} analyses, {report.queued} queued")
        unexpected = set(report.outcomes) - {"NOT_ANALYZABLE:TOO_FEW_SLICES"}
        if unexpected:
            crashes.append(f"outcomes {sorted(unexpected)}")
    else:
        raise SystemExit(f"unknown surface {name}")
    if name == "series":
        inputs, crash_count = series, len(crashes)
    else:
        # A crashed network batch has no statuses and counts once, as CRASH.
        inputs = sum(outcomes.values())
        crash_count = outcomes.get("CRASH", 0)
    return {"surface": name, "inputs": inputs, "outcomes": dict(outcomes),
            "crashes": crash_count,
            "crash_examples": crashes[:5], "peak_rss_mb": fuzz.peak_rss_mb(),
            "seconds": time.perf_counter() - started}


def _format_outcomes(outcomes: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000,
                        help="hypothesis examples per surface (network: datasets)")
    parser.add_argument("--series", type=int, default=10_000,
                        help="one-slice series through bookkeeper and tracker")
    parser.add_argument("--only", default="", help="comma-separated surfaces")
    parser.add_argument("--random", action="store_true",
                        help="new inputs each run (default: the same, derandomized)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.CRITICAL)
    for noisy in ("service", "pynetdicom", "pydicom"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="cspine-bench-fuzz-"))
    if args.child:
        row = surface(args.child, args.examples, args.series, workdir, args.random)
        print(json.dumps(row))
        return 0

    wanted = [s.strip() for s in args.only.split(",") if s.strip()] or list(SURFACES)
    print(f"fuzz: {args.examples} examples per surface, {args.series} one-slice series, "
          f"{'random' if args.random else 'derandomized'} inputs; each surface in a fresh "
          "process")
    rows = []
    for name in wanted:
        child = subprocess.run(
            [sys.executable, "-m", "bench.fuzz", "--child", name, "--examples",
             str(args.examples), "--series", str(args.series), "--workdir",
             str(workdir / name)] + (["--random"] if args.random else []),
            capture_output=True, text=True)
        if child.returncode != 0:
            rows.append({"surface": name, "inputs": 0, "outcomes": {},
                         "crashes": f"child died ({child.returncode})",
                         "crash_examples": [child.stderr[-500:]], "peak_rss_mb": 0.0,
                         "seconds": 0.0})
        else:
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"  {name}: done in {row['seconds']:.0f} s", flush=True)

    print(f"\n{'surface':9s} {'inputs':>7s} {'crashes':>7s} {'peak RSS':>9s} {'time':>6s}  "
          "outcomes")
    for row in rows:
        print(f"{row['surface']:9s} {row['inputs']:7d} {row['crashes']!s:>7s} "
              f"{row['peak_rss_mb']:6.0f} MB {row['seconds']:5.0f} s  "
              f"{_format_outcomes(row['outcomes'])}")
    failed = [row for row in rows if row["crashes"]]
    for row in failed:
        print(f"\n{row['surface']}: {row['crashes']} crash(es), e.g.")
        for example in row["crash_examples"]:
            print(f"  {example}")
    crashes = sum(r["crashes"] if isinstance(r["crashes"], int) else 1 for r in rows)
    # One line with "->" for bench.run_all's summary table.
    print(f"\nhostile inputs: {sum(r['inputs'] for r in rows)} tried -> {crashes} crash(es) "
          f"(must be 0); workdir {workdir}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
