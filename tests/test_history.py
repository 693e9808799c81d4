"""The execution history: what a record holds, the size cap, and ``logs`` / ``logs --stats``."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgpu_kernel.run import history

METADATA = {
    "time",
    "kernel",
    "source",
    "session",
    "duration_ms",
    "status",
    "category",
    "output_bytes",
    "reconnects",
}


@pytest.fixture
def history_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "hist" / "history.jsonl"
    monkeypatch.setenv("CGPU_HISTORY_FILE", str(path))
    monkeypatch.delenv("CGPU_HISTORY_SUPPRESS", raising=False)
    monkeypatch.delenv("CGPU_HISTORY_MAX_BYTES", raising=False)
    yield path


def logs(*args: str, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cgpu_kernel", "logs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=dict(os.environ, CGPU_HISTORY_FILE=str(path)),
    )


#: A known history: 10 executions over 3 sessions.
KNOWN = [
    # kernel, duration, status, category, reconnects, startup, session
    ("k1", 100.0, "ok", None, 0, 2000.0, "s1"),
    ("k1", 200.0, "ok", None, 1, None, "s1"),
    ("k1", 300.0, "error", "runtime", 0, None, "s1"),
    ("k1", 400.0, "ok", None, 2, None, "s1"),
    ("k2", 500.0, "error", "timeout", 0, 4000.0, "s2"),
    ("k2", 600.0, "ok", None, 0, None, "s2"),
    ("k2", 700.0, "error", "import", 0, None, "s2"),
    ("k2", 800.0, "ok", None, 0, None, "s2"),
    ("k3", 900.0, "error", "runtime", 3, 6000.0, "s3"),
    ("k3", 1000.0, "ok", None, 0, None, "s3"),
]


def write_known() -> None:
    for kernel, duration, status, category, reconnects, startup, session in KNOWN:
        history.record_execution(
            kernel, duration, status, category, 10, reconnects, startup, session=session
        )


def test_record_is_private_metadata_only(history_file: Path) -> None:
    history.record_execution("k", 12.5, "error", "memory", 1234, 2, 3000.0)
    assert stat.S_IMODE(history_file.stat().st_mode) == 0o600
    (record,) = history.read_records()
    assert set(record) == METADATA | {"startup_ms"}
    assert record["kernel"] == "k"
    assert record["duration_ms"] == 12.5
    assert (record["status"], record["category"]) == ("error", "memory")
    assert (record["output_bytes"], record["reconnects"], record["startup_ms"]) == (1234, 2, 3000)
    assert record["source"] == "kernel"
    assert record["session"] == f"pid-{os.getpid()}"


def test_run_launched_kernels_do_not_count_twice(
    history_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CGPU_HISTORY_SUPPRESS", "1")
    history.record_execution("k", 1, "ok", None, 0, 0)
    history.record_execution("k", 1, "ok", None, 0, 0, source="run")
    assert [r["source"] for r in history.read_records()] == ["run"]


def test_size_cap_keeps_the_newest_whole_lines(
    history_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CGPU_HISTORY_MAX_BYTES", "4096")
    for index in range(300):
        history.record_execution(f"kernel-{index}", index, "ok", None, 0, 0)
    assert history_file.stat().st_size <= 4096
    lines = history_file.read_bytes().splitlines()
    records = [json.loads(line) for line in lines]  # every line is whole
    assert records[-1]["kernel"] == "kernel-299"
    assert len(records) >= 10
    assert [r["duration_ms"] for r in records] == sorted(r["duration_ms"] for r in records)
    assert stat.S_IMODE(history_file.stat().st_mode) == 0o600


def test_concurrent_writers_lose_nothing(history_file: Path) -> None:
    def write(worker: int) -> None:
        for index in range(50):
            history.record_execution(f"w{worker}", index, "ok", None, 0, 0)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(history.read_records()) == 200


def test_unwritable_history_never_raises(
    history_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CGPU_HISTORY_FILE", str(blocker / "history.jsonl"))
    history.record_execution("k", 1, "ok", None, 0, 0)  # no exception


def test_stats_from_a_known_history(history_file: Path) -> None:
    write_known()
    stats = history.compute_stats(history.read_records())
    assert stats["executions"] == 10
    assert (stats["ok"], stats["errors"]) == (6, 4)
    assert stats["success_rate"] == pytest.approx(0.6)
    assert stats["timeout_rate"] == pytest.approx(0.1)
    assert stats["duration_ms"]["mean"] == pytest.approx(550.0)
    assert stats["duration_ms"]["p95"] == 1000.0  # nearest rank: the 10th of 10
    assert stats["errors_by_category"] == {"import": 1, "runtime": 2, "timeout": 1}
    assert (stats["sessions"], stats["reconnects"]) == (3, 6)
    assert stats["reconnects_per_session"] == pytest.approx(2.0)
    assert stats["startup_ms"] == {"count": 3, "mean": 4000.0, "p95": 6000.0}


def test_percentile_nearest_rank() -> None:
    assert history.percentile([], 0.95) is None
    assert history.percentile([5.0], 0.95) == 5.0
    assert history.percentile(range(1, 21), 0.95) == 19
    assert history.percentile(range(1, 101), 0.95) == 95


def test_logs_cli(history_file: Path) -> None:
    write_known()
    done = logs("-n", "2", "--json", path=history_file)
    assert done.returncode == 0, done.stderr
    assert [r["duration_ms"] for r in json.loads(done.stdout)] == [900.0, 1000.0]

    errors = json.loads(logs("--status", "error", "--json", "-n", "0", path=history_file).stdout)
    assert [r["category"] for r in errors] == ["runtime", "timeout", "import", "runtime"]

    table = logs(path=history_file).stdout.splitlines()
    assert table[0].split() == [
        "time", "kernel", "source", "status", "category", "duration", "wall", "output",
        "reconnects",
    ]  # fmt: skip
    assert len(table) == 11  # the header and 10 records
    assert "timeout" in table[5]

    stats = json.loads(logs("--stats", "--json", path=history_file).stdout)
    assert stats == history.compute_stats(history.read_records())

    text = logs("--stats", path=history_file).stdout
    assert "success rate:      60.0%" in text
    assert "timeout rate:      10.0%" in text
    assert "mean 550 ms, p95 1000 ms" in text
    assert "6 in 3 sessions (2.00 per session)" in text
    assert "runtime" in text
    assert "(code 1002)" in text


def test_logs_on_an_empty_history(history_file: Path) -> None:
    done = logs(path=history_file)
    assert done.returncode == 0
    assert "No executions recorded" in done.stdout
    stats = json.loads(logs("--stats", "--json", path=history_file).stdout)
    assert stats["executions"] == 0
    assert stats["success_rate"] is None


def test_tracker_records_what_the_proxy_saw(history_file: Path) -> None:
    now = [100.0]
    tracker = history.ExecutionTracker("cgpu-x", session="proxy-1", clock=lambda: now[0])
    now[0] = 102.5
    tracker.connected()  # the startup: 2.5 s
    tracker.request("a")
    tracker.output("a", 10)
    tracker.output("other", 99)
    now[0] = 103.0
    tracker.reply("a", {"status": "ok"})
    tracker.output("a", 7)  # output can arrive after the reply (shell and iopub are not ordered)
    assert history.read_records() == []  # recorded at idle, not at the reply
    tracker.idle("a")
    tracker.request("b")
    tracker.connected()  # a reconnect while b runs
    tracker.output("b", 5)
    tracker.idle("b")  # idle before the reply: recorded at the reply
    now[0] = 104.0
    tracker.reply("b", {"status": "error", "ename": "ModuleNotFoundError", "evalue": "x"})
    tracker.reply("unknown", {"status": "ok"})  # not ours: ignored
    tracker.idle("unknown")
    first, second = history.read_records()
    assert (first["duration_ms"], first["status"], first["category"]) == (500.0, "ok", None)
    assert (first["output_bytes"], first["reconnects"], first["startup_ms"]) == (17, 0, 2500.0)
    assert (second["status"], second["category"], second["reconnects"]) == ("error", "import", 1)
    assert "startup_ms" not in second
    assert {first["session"], second["session"], first["source"]} == {"proxy-1", "kernel"}


def test_tracker_records_an_execution_whose_idle_never_came(history_file: Path) -> None:
    now = [0.0]
    tracker = history.ExecutionTracker("cgpu-x", session="proxy-1", clock=lambda: now[0])
    tracker.connected()
    tracker.request("a")
    tracker.reply("a", {"status": "ok"})
    now[0] = 5.0
    tracker.request("b")
    assert history.read_records() == []  # still within the grace
    now[0] = 20.0
    tracker.request("c")
    (record,) = history.read_records()
    assert record["status"] == "ok" and record["duration_ms"] == 0.0
    tracker.reply("b", {"status": "ok"})
    tracker.close()  # the proxy stops: b has its reply, c has not
    assert len(history.read_records()) == 2


def test_deferred_tracker_writes_its_records_in_one_batch(history_file: Path) -> None:
    tracker = history.ExecutionTracker("cgpu-x", session="proxy-1", deferred=True)
    tracker.connected()
    for cell in ("a", "b", "c"):
        tracker.request(cell)
        tracker.reply(cell, {"status": "ok"})
        tracker.idle(cell)
    assert history.read_records() == []  # waiting in memory
    assert len(tracker.unwritten) == 3
    tracker.flush()
    assert [r["status"] for r in history.read_records()] == ["ok", "ok", "ok"]
    assert tracker.unwritten == []
