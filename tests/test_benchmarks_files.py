"""The ``files`` benchmark suite (``benchmarks/files.py``) runs in its quickest mode, alone and
under ``python -m benchmarks``, and reports what it measured in the suites' shape.

No timing thresholds: the machine is shared and noisy. What is checked is that every metric is
there and positive, that the ratios are the ones of the throughputs, that each goal says met or
not, and that every copy (the remote ones, read on the server's disk, and the local ones) came
back byte-identical, both as the suite reports it and as read here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICK_FILES = (sys.executable, "-m", "benchmarks.files", "--quick")
#: the path table's quickest run, one path: the suite is what is tested
QUICK_ALL = (sys.executable, "-m", "benchmarks", "--quick", "--paths", "zmq")
RATE_METRICS = {
    f"{who}_{way}_mbps"
    for way, clients in {
        "upload": ("direct", "proxy"),
        "download": ("direct", "verified", "proxy"),
    }.items()
    for who in clients
}
RATIOS = {
    "upload_ratio": ("proxy_upload_mbps", "direct_upload_mbps"),
    "download_ratio": ("proxy_download_mbps", "direct_download_mbps"),
    "verified_download_ratio": ("verified_download_mbps", "direct_download_mbps"),
    "download_ratio_to_verified": ("proxy_download_mbps", "verified_download_mbps"),
}


CPU_METRICS = {
    f"{name.removesuffix('_mbps')}{side}_cpu_s" for name in RATE_METRICS for side in ("", "_server")
}


def check_report(report: dict[str, Any]) -> None:
    metrics = report["metrics"]
    assert set(metrics) == RATE_METRICS | set(RATIOS) | CPU_METRICS | {"server_hash_s"}
    for name, entry in metrics.items():
        assert set(entry) == {"value", "unit", "higher_better"}, name
        if name in CPU_METRICS:  # 10 ms ticks: a few MB may take none
            assert entry["value"] >= 0 and entry["unit"] == "s", name
        else:
            assert entry["value"] > 0, name
        lower_better = name in CPU_METRICS or name == "server_hash_s"
        assert entry["higher_better"] is not lower_better, name
    for name in RATE_METRICS:
        assert metrics[name]["unit"] == "MB/s"
    for ratio, (top, bottom) in RATIOS.items():
        expected = metrics[top]["value"] / metrics[bottom]["value"]
        assert abs(metrics[ratio]["value"] - expected) < 0.02, ratio  # both rounded
    goals = {g["goal"]: g for g in report["goals"]}
    for way in ("upload", "download"):
        entry = goals[f"{way} vs direct client"]
        assert entry["value"] == metrics[f"{way}_ratio"]["value"]
        assert entry["target"] == ">= 0.9x"
        assert entry["met"] is (entry["value"] >= 0.9)
    identical = goals["copies byte-identical"]
    assert identical["met"] is True, identical
    compared, _, total = identical["value"].partition("/")
    assert compared == total and int(total) >= 5  # five copies a round


def test_the_files_suite_reports_rates_ratios_goals_and_identical_copies(tmp_path: Path) -> None:
    out = tmp_path / "files.json"
    work = tmp_path / "work"
    done = subprocess.run(
        [*QUICK_FILES, "--suite-json", str(out), "--work", str(work)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ratio" in done.stdout  # the plain summary is still printed
    check_report(json.loads(out.read_text()))
    source = (work / "here" / "payload.bin").read_bytes()
    assert len(source) > 1_000_000
    for copy in ("remote/payload.bin", "remote/direct.bin", "here/back.bin"):
        assert (work / copy).read_bytes() == source, copy
    assert not list(work.rglob("*cgpu-partial*"))


def test_python_m_benchmarks_keeps_the_files_suite_and_its_goals(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [*QUICK_ALL, "--suites", "files", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    check_report(report["suites"]["files"])
    suite_goals = [g for g in report["goals"] if g["path"] == "files"]
    assert {g["goal"] for g in suite_goals} == {
        g["goal"] for g in report["suites"]["files"]["goals"]
    }
    assert "download vs direct client" in done.stdout  # printed with the path table's goals
