"""Every benchmark in ``bench/``, one after the other, and one table of their ratios.

Each module ``bench/<name>.py`` (all but this one) runs as ``python -m bench.<name>`` with its
own defaults, in its own process, never two at once (they would measure each other). Its
whole output goes to ``<log-dir>/<name>.log``; the table keeps, per benchmark, its status,
its wall time and the lines where it states a ratio against its named peer (lines with
"ratio", "->" or a number followed by "x"). A benchmark that cannot run here (no DCMTK, no
Orthanc, no model) shows as failed with the last line it printed; the exit status is 1 when
any failed.

    .venv/bin/python -m bench.run_all [--only ingest,volume] [--timeout 3600] [--log-dir DIR]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
RATIO_LINE = re.compile(r"(?i)\bratios?\b|->|\b\d+(?:\.\d+)?x\b")


@dataclass
class Outcome:
    name: str
    status: str
    """``ok``, ``failed (exit N)`` or ``timed out``."""
    seconds: float
    ratios: list[str] = field(default_factory=list)
    last_line: str = ""


def benchmarks(directory: Path = BENCH_DIR) -> list[str]:
    """Module names of the benchmarks in ``directory`` (every ``*.py`` but this runner)."""
    return sorted(p.stem for p in directory.glob("*.py")
                  if p.stem not in {"run_all", "__init__"} and not p.stem.startswith("_"))


def ratio_lines(output: str) -> list[str]:
    return [line.strip() for line in output.splitlines() if RATIO_LINE.search(line)]


def run_one(name: str, *, package: str, cwd: Path, timeout_s: float, log_dir: Path) -> Outcome:
    log = log_dir / f"{name}.log"
    started = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", f"{package}.{name}"], cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout_s, check=False)
        output, status = proc.stdout, ("ok" if proc.returncode == 0
                                       else f"failed (exit {proc.returncode})")
    except subprocess.TimeoutExpired as exc:
        raw = exc.stdout or ""
        output = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
        status = "timed out"
    seconds = time.perf_counter() - started
    log.write_text(output, encoding="utf-8")
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return Outcome(name, status, seconds, ratio_lines(output), lines[-1] if lines else "")


def table(outcomes: Sequence[Outcome]) -> str:
    width = max([len("benchmark"), *(len(o.name) for o in outcomes)])
    status_width = max([len("status"), *(len(o.status) for o in outcomes)])
    indent = " " * (width + status_width + 14)
    rows = [f"{'benchmark':<{width}}  {'status':<{status_width}}  {'wall s':>8}  "
            "ratios against the named peers"]
    rows.append("-" * len(rows[0]))
    for o in outcomes:
        notes = o.ratios if o.status == "ok" else [o.last_line or "(no output)"]
        notes = notes or ["(printed no ratio)"]
        rows.append(f"{o.name:<{width}}  {o.status:<{status_width}}  {o.seconds:8.1f}  "
                    f"{notes[0]}")
        rows += [f"{indent}{note}" for note in notes[1:]]
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None, *, directory: Path = BENCH_DIR) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run_all",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds allowed to each benchmark")
    parser.add_argument("--log-dir", type=Path, default=Path("var/bench/logs"))
    args = parser.parse_args(argv)
    names = benchmarks(directory)
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"no such benchmark: {', '.join(unknown)} (have {', '.join(names)})")
        names = [n for n in names if n in wanted]
    args.log_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for name in names:
        print(f"running {directory.name}.{name} ...", flush=True)
        outcome = run_one(name, package=directory.name, cwd=directory.parent,
                          timeout_s=args.timeout, log_dir=args.log_dir)
        print(f"  {outcome.status} in {outcome.seconds:.1f} s (log: "
              f"{args.log_dir / (name + '.log')})", flush=True)
        outcomes.append(outcome)
    print()
    print(table(outcomes))
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
