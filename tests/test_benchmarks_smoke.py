"""The benchmark command runs end to end in its quickest mode and reports every path and metric.

No timing thresholds: the machine is shared and noisy. What is checked is that every path was
measured, that the numbers are positive, and that the comm buffer came back byte-identical
wherever the path can carry one.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.run import ALL_PATHS, ON_REQUEST, PROXY_PATHS, compare
from tests.conftest import run_benchmark

SKIPPED = set(ON_REQUEST)
EXPECTED = [p for p in ALL_PATHS if p not in SKIPPED]
MEASURED_PROXIES = [p for p in PROXY_PATHS if p not in SKIPPED]


#: jupyter_server's gateway mode relays binary WebSocket messages as text frames: buffers are lost.
NO_BUFFERS = {"gateway", "gateway_quickack"}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    stdout = run_benchmark("benchmarks", "--quick", "--out", str(out))
    assert "x floor" in stdout  # the table was printed
    return json.loads(out.read_text())


def test_every_path_has_every_metric(report: dict) -> None:
    assert set(report["paths"]) == set(EXPECTED)
    for name, values in report["paths"].items():
        for metric in ("rtt_median_ms", "rtt_p99_ms", "stream_mbps", "start_s", "rtt_x_floor"):
            assert values[metric] > 0, (name, metric)
        assert values["rtt_p99_ms"] >= values["rtt_median_ms"]
        assert values["rtt_runs"] == report["settings"]["rtt_runs"]
        assert values["stream_bytes_ok"] is True, name
        assert values["gateway_x_faster"] > 0
    for name in MEASURED_PROXIES:
        values = report["paths"][name]
        for metric in (
            "ready_s",
            "rss_idle_mb",
            "rss_load_mb",
            "buffer_peak_rss_mb",
            "rss_after_buffer_mb",
            "import_ms",
        ):
            assert values[metric] > 0, (name, metric)
        # CPU time comes in 10 ms ticks: a quick run may see none.
        for metric in ("rtt_cpu_ms", "stream_cpu_ms_per_mib"):
            assert values[metric] >= 0, (name, metric)


def test_buffers_come_back_byte_identical(report: dict) -> None:
    for name, values in report["paths"].items():
        if name in NO_BUFFERS:
            assert isinstance(values["buffer_ok"], bool)
            if not values["buffer_ok"]:
                assert values["buffer_error"]
            continue
        assert values["buffer_ok"] is True, (name, values.get("buffer_error"))
        assert values["buffer_mbps"] > 0


def test_goals_and_compare(report: dict) -> None:
    goals = report["goals"]
    assert {g["path"] for g in goals} == set(MEASURED_PROXIES)
    # decided, or retired (shown for the record, judged neither way)
    assert all(isinstance(g["met"], bool) or "retired" in g["goal"] for g in goals)
    yardstick = report["paths"]["relay_minimal"].get("stream_cpu_ms_per_mib")
    for name in MEASURED_PROXIES:
        cpu = [g for g in goals if g["path"] == name and g["goal"].startswith("CPU per streamed")]
        if yardstick:  # a quick run may see no 10 ms CPU tick in the yardstick: no ratio then
            ratio = report["paths"][name]["stream_cpu_ms_per_mib"] / yardstick
            assert [g["value"] for g in cpu] == [round(ratio, 2)], cpu
            assert cpu[0]["met"] is (ratio <= 1.2)
    text, worse = compare(report, report, 0.25)
    assert worse == 0
    assert "rtt_median_ms" in text
    slower = json.loads(json.dumps(report))
    slower["paths"]["proxy_jupyter"]["rtt_median_ms"] *= 2
    _, worse = compare(report, slower, 0.25)
    assert worse == 1


def test_the_memory_suite_reports_every_part_and_stream() -> None:
    """``benchmarks.memory`` as a suite of ``python -m benchmarks`` (``--quick``, ~10 s): a
    metric and a goal for each part and each stream, each goal decided or said unmeasured."""
    from benchmarks.memory import LINES
    from benchmarks.suites import SUITES, run_suites

    assert SUITES["memory"] == "benchmarks.memory"
    logged: list[str] = []
    report = run_suites(["memory"], quick=True, log=logged.append)["memory"]
    assert "failed" not in report, report.get("failed")
    parts = ("code", "header", "buffer", "stream")
    for part in parts:
        assert report["metrics"][f"{part}_added_mb"]["unit"] == "MB"
        assert report["metrics"][f"{part}_ratio"]["higher_better"] is False
    for name, _ in LINES:
        assert report["metrics"][f"lines_{name}_added_mb"]["value"] >= 0
    assert len(report["goals"]) == len(parts) + len(LINES)
    assert all(g["met"] in (True, False, None) and g["target"] for g in report["goals"])


def test_start_suite_reports_its_goals_and_leaves_no_server(tmp_path: Path) -> None:
    """``benchmarks.start --quick`` (the ``start`` suite): every metric and both goals written,
    and the warm servers of its own state folder stopped."""
    import psutil

    from benchmarks.suites import SUITES

    assert SUITES["start"] == "benchmarks.start"
    out = tmp_path / "start.json"
    run_benchmark("benchmarks.start", "--quick", "--suite-json", str(out))
    report = json.loads(out.read_text())
    assert set(report["metrics"]) == {
        "warm_median_s",
        "warm_worst_s",
        "cold_median_s",
        "private_median_s",
        "warm_cpu_s",
        "warm_server_cpu_s",
        "cli_import_s",
    }
    assert all(m["value"] > 0 and m["higher_better"] is False for m in report["metrics"].values())
    assert [g["target"] for g in report["goals"]] == ["<= 1.0 s", "<= 2.5 s"]
    assert all(isinstance(g["met"], bool) for g in report["goals"])
    left = [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if "cgpu-bench-start-" in " ".join(p.info.get("cmdline") or [])
        and p.status() != psutil.STATUS_ZOMBIE
    ]
    assert left == []
