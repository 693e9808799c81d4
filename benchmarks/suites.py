"""Benchmark suites beside the path table: each its own module, run by ``python -m benchmarks``.

The path table (``benchmarks/run.py``) measures one kind of thing for every path to a kernel. A
suite measures one goal of its own (file transfer, memory per message part, ``run`` start, a
WAN-shaped link) side by side with its own yardstick. Each suite is a module with a command line
that takes ``--suite-json PATH`` (and ``--quick``) and writes there one :data:`SuiteReport`:

    {"metrics": {"download_mbps": {"value": 81.0, "higher_better": true, "unit": "MB/s"}, ...},
     "goals": [{"goal": "download vs direct", "value": 0.93, "target": ">= 0.9x", "met": true}]}

``python -m benchmarks`` runs each one in its own process (suites set environment variables and
start servers; a process keeps that from leaking into the next one), keeps the reports in its
JSON under ``suites``, prints their goals with the path table's, and ``--compare`` compares
their metrics as it does the paths'. A suite that fails is reported as failed, with its output's
tail, and makes the run exit non-zero: a benchmark that did not run must not look like one that
met its goals.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: Suite name -> module run as ``python -m MODULE --suite-json PATH [--quick]``.
SUITES: dict[str, str] = {
    "files": "benchmarks.files",  # %cgpu upload/download against a direct Contents API client
    "memory": "benchmarks.memory",  # issue 19 goal 3: the proxy's memory per message part
    "start": "benchmarks.start",  # `cgpu-kernel run 'print(1)'`: warm and cold (issue 19, goal 2)
    "wan": "benchmarks.wan",  # issue 19 goal 1: a WAN-shaped link (benchmarks/shaper.py)
}

SuiteReport = dict[str, Any]

#: A whole suite's limit; the slowest full one (a WAN-shaped link at 80 ms) takes minutes.
SUITE_TIMEOUT_S = 1800


def metric(value: float, unit: str, *, higher_better: bool) -> dict[str, Any]:
    """One entry of a report's ``metrics``; suites call it so that every entry has all keys."""
    return {"value": value, "unit": unit, "higher_better": higher_better}


def goal(name: str, value: Any, target: str, met: bool | None) -> dict[str, Any]:
    """One entry of a report's ``goals``: ``met`` is None where nothing could be measured."""
    return {"goal": name, "value": value, "target": target, "met": met}


def write_report(path: Path, metrics: dict[str, Any], goals: list[dict[str, Any]]) -> None:
    """What a suite's ``--suite-json`` writes (called by each suite's ``main``)."""
    path.write_text(json.dumps({"metrics": metrics, "goals": goals}, indent=2) + "\n")


def run_suites(
    names: list[str], *, quick: bool, log: Callable[[str], None]
) -> dict[str, SuiteReport]:
    """Run each named suite in its own process; a failed one is ``{"failed": "why"}``."""
    reports: dict[str, SuiteReport] = {}
    for name in names:
        log(f"suite {name}: running")
        with tempfile.TemporaryDirectory(prefix=f"cgpu-suite-{name}-") as folder:
            out = Path(folder) / "report.json"
            command = [sys.executable, "-m", SUITES[name], "--suite-json", str(out)]
            if quick:
                command.append("--quick")
            try:
                done = subprocess.run(
                    command, capture_output=True, text=True, timeout=SUITE_TIMEOUT_S, check=False
                )
            except subprocess.TimeoutExpired:
                reports[name] = {"failed": f"did not finish in {SUITE_TIMEOUT_S} s"}
                continue
            if done.returncode != 0 or not out.exists():
                tail = (done.stdout + done.stderr)[-3000:]
                reports[name] = {"failed": f"exit {done.returncode}; its output's end:\n{tail}"}
                continue
            reports[name] = json.loads(out.read_text())
        log(f"suite {name}: done")
    return reports


def suite_goals(reports: dict[str, SuiteReport]) -> list[dict[str, Any]]:
    """The suites' goals in the path table's shape (``path`` is the suite's name)."""
    out: list[dict[str, Any]] = []
    for name, report in reports.items():
        if "failed" in report:
            out.append(goal("suite ran", "failed", "ran", False) | {"path": name})
            continue
        out += [{"path": name, **g} for g in report["goals"]]
    return out


def compare_suites(
    old: dict[str, Any], new: dict[str, Any], threshold: float
) -> tuple[list[str], int]:
    """Lines for the suites' metrics that both runs have, and how many got worse."""
    lines: list[str] = []
    worse = 0
    for name, report in new.get("suites", {}).items():
        before = old.get("suites", {}).get(name, {}).get("metrics", {})
        for key, entry in report.get("metrics", {}).items():
            a, b = before.get(key, {}).get("value"), entry["value"]
            if not isinstance(a, int | float) or not isinstance(b, int | float) or not a:
                continue
            change = (b - a) / a
            regressed = -change > threshold if entry["higher_better"] else change > threshold
            worse += regressed
            flag = "  REGRESSION" if regressed else ""
            lines.append(f"{name:<18} {key:<20} {a:>10.2f} {b:>10.2f} {change:>+8.0%}{flag}")
    return lines, worse
