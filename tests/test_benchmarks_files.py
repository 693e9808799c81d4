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

import pytest

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


@pytest.mark.slow  # 30 s; the suite itself runs in the default run (the test above)
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


def test_over_a_shaped_link_every_copy_still_arrives_identical(tmp_path: Path) -> None:
    """``--link``: the direct clients and the proxy all reach the server through the path
    shaper; the copies are compared as on loopback, and each way takes at least the link's
    round trip (the shaper is really in the path)."""
    out = tmp_path / "shaped.json"
    done = subprocess.run(
        [*QUICK_FILES, "--megabytes", "2", "--rounds", "1", "--link", "25/100", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads(out.read_text())
    assert results["differ"] == [] and results["compared"] == 5
    for key in ("direct_upload_s", "proxy_upload_s", "direct_download_s", "proxy_download_s"):
        assert results[key] >= 0.05, key  # one round trip at 25 ms one way, at the least


def test_the_shaped_half_of_the_suite_adds_its_rates_and_goals() -> None:
    """The suite's full run measures loopback and :data:`SHAPED_LINK`; its report keeps both,
    the shaped goals by the link's name (fed here with figures of the shape ``summarize``
    gives, so that this runs in no time)."""
    from benchmarks.files import SHAPED_LINK_NAME, suite_report

    def figures(scale: float) -> dict[str, Any]:
        rates = {"direct": 100.0, "verified": 90.0, "proxy": 95.0 * scale}
        out: dict[str, Any] = {"server_hash_s": 0.1, "compared": 5, "differ": []}
        for way, who in (("upload", ("direct", "proxy")), ("download", rates)):
            for name in who:
                out[f"{name}_{way}_mb_s"] = rates[name]
                out[f"{name}_{way}_cpu_s"] = out[f"{name}_{way}_server_cpu_s"] = 0.1
            out[f"{way}_ratio"] = rates["proxy"] / rates["direct"]
        out["verified_download_ratio"] = 0.9
        out["download_ratio_to_verified"] = rates["proxy"] / 90
        return out

    metrics, goals = suite_report(figures(0.5), figures(1.0))
    named = {g["goal"]: g for g in goals}
    for way in ("upload", "download"):
        assert named[f"{way} vs direct client"]["met"] is False  # 0.475x
        shaped = named[f"{way} vs direct client, {SHAPED_LINK_NAME}"]
        assert shaped["met"] is True and shaped["value"] == metrics[f"shaped_{way}_ratio"]["value"]
        assert metrics[f"shaped_proxy_{way}_mbps"]["value"] == 95.0
    assert named["copies byte-identical"]["value"] == "10/10"
