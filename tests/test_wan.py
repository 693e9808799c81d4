"""The WAN suite (``python -m benchmarks.wan --quick``) end to end: every path went through its
shaper, the proxy adds no round trip over the link per cell, and the report has every goal.

No timing upper bounds (the machine is shared); the one timing assertion is a lower bound that
holds on any machine: a cell's round trip over a shaped link takes at least twice its one-way
delay, so a path that bypassed its shaper would fail it.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from benchmarks.suites import SUITES
from benchmarks.wan import LINKS, PATHS
from tests.conftest import run_benchmark

pytestmark = pytest.mark.servers


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("wan") / "report.json"
    stdout = run_benchmark("benchmarks.wan", "--quick", "--suite-json", str(out))
    assert "turns/cell" in stdout  # the table was printed
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def value(report: dict[str, Any], link: str, path: str, key: str) -> float:
    return float(report["metrics"][f"{link}.{path}.{key}"]["value"])


def test_every_path_went_through_its_shaper(report: dict[str, Any]) -> None:
    for link, shape in LINKS.items():
        for path in PATHS:
            assert value(report, link, path, "rtt_median_ms") >= 2 * shape.delay * 1000, (
                link,
                path,
            )
            assert value(report, link, path, "stream_mbps") > 0


def test_the_proxy_adds_no_round_trip_over_the_link_per_cell(report: dict[str, Any]) -> None:
    for link in LINKS:
        direct = {k: value(report, link, "direct", k) for k in ("turns_per_cell", "ws_up_per_cell")}
        # One execute_request up, its answers down: one turn-around, as counted by the shaper.
        assert direct == {"turns_per_cell": 1.0, "ws_up_per_cell": 1.0}, link
        # No connection opened for a cell (a REST call per cell would open or reuse one; reused,
        # its request would show as a turn-around above).
        assert value(report, link, "proxy", "connections_during_cells") == 0, link
        for key in ("turns_per_cell", "ws_up_per_cell", "ws_down_per_cell"):
            assert value(report, link, "proxy", key) == value(report, link, "direct", key), (
                link,
                key,
            )


def test_the_report_has_every_goal(report: dict[str, Any]) -> None:
    names = [g["goal"] for g in report["goals"]]
    for link in LINKS:
        for what in ("cell round trip", "MiB stream", "MB buffer both ways"):
            assert any(n.startswith(link) and what in n and "proxy / direct" in n for n in names)
        assert any(n.startswith(link) and "turn-arounds" in n for n in names)
        # The buffer came back byte-identical through the proxy and the direct client (its
        # throughput is recorded only then); gateway mode's either has a ratio or lost it.
        for path in ("direct", "proxy"):
            assert value(report, link, path, "buffer_mbps") > 0, (link, path)
    assert all(isinstance(g["met"], bool) for g in report["goals"])
    assert SUITES["wan"] == "benchmarks.wan"
