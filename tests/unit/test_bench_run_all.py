"""``make bench``: bench.run_all finds every benchmark and prints one table of ratios."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.run_all import BENCH_DIR, benchmarks, main, ratio_lines


def test_every_benchmark_module_is_run() -> None:
    on_disk = {p.stem for p in BENCH_DIR.glob("*.py")} - {"run_all", "__init__"}
    assert set(benchmarks()) == on_disk
    assert {"e2e", "inference", "ingest", "results", "synthetic", "volume"} <= on_disk


def test_ratio_lines() -> None:
    output = ("series: 300 slices\n  ratio naive/ours = 1.52 (ours faster)\n"
              "peer gaussian_filter: 2.1 s -> generation = 3.20x one filter\nSR built\n")
    assert ratio_lines(output) == ["ratio naive/ours = 1.52 (ours faster)",
                                   "peer gaussian_filter: 2.1 s -> generation = 3.20x one filter"]


def test_one_table_and_failures_shown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = tmp_path / "fakebench"
    package.mkdir()
    (package / "fast.py").write_text("print('warm up')\nprint('ratio peer/ours = 2.00')\n")
    (package / "broken.py").write_text("import sys\nsys.exit('storescp not found')\n")
    (package / "run_all.py").write_text("raise SystemExit('the runner does not run itself')\n")
    logs = tmp_path / "logs"
    assert main(["--log-dir", str(logs)], directory=package) == 1
    out = capsys.readouterr().out
    table = out[out.index("benchmark"):]
    assert "fast" in table and "ok" in table and "ratio peer/ours = 2.00" in table
    assert "broken" in table and "failed (exit 1)" in table and "storescp not found" in table
    assert "run_all" not in table
    assert (logs / "fast.log").read_text().startswith("warm up")
    assert main(["--log-dir", str(logs), "--only", "fast"], directory=package) == 0
    with pytest.raises(SystemExit):
        main(["--only", "nope"], directory=package)
