"""``bench.burst`` at a small size: the trauma-burst benchmark runs end to end and prints
its throughput, percentiles and ratios (the full 20 x 300 run is in docs/reliability.md)."""

from __future__ import annotations

import re

import pytest

from bench.burst import main, percentile

pytestmark = pytest.mark.slow


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 90), percentile(values, 99)) == \
        (50.0, 90.0, 99.0)
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0


def test_small_burst_is_analysed_exported_and_reported(
        postgres_server: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--studies", "3", "--slices", "60", "--matrix", "128", "--associations", "2",
                 "--workers", "2", "--distinct", "2", "--timeout", "400"]) == 0
    out = capsys.readouterr().out
    assert "3 studies x 60 slices (128x128), 180 instances" in out
    assert "Orthanc holds 3 SR and 3 SEG (no duplicates)" in out
    assert re.search(r"ingest: 180 instances in [\d.]+ s = [\d.]+ instances/s", out)
    for name in ("last instance -> flag", "last instance -> SR in PACS"):
        match = re.search(rf"{re.escape(name)}: p50 ([\d.]+) s, p90 ([\d.]+) s, "
                          rf"p99 ([\d.]+) s", out)
        assert match, out
        p50, p90, p99 = map(float, match.groups())
        assert 0 < p50 <= p90 <= p99
    assert re.search(r"ratio ingest cspine-triage / dcmtk-storescp = [\d.]+", out)
    assert re.search(r"ratio p50 last instance -> SR / commercial reference 180 s = [\d.]+",
                     out)
