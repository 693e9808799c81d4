"""The proxy's memory under a fast producer and a slow frontend, end to end.

A real private jupyter-server (the ``local`` backend: its IOPub rate limit off, so nothing is
dropped before the proxy), a real ipykernel printing as fast as it can, a real jupyter_client
frontend. What is measured is the proxy process's peak RSS (``VmHWM``, reset before the cell)
minus its RSS before the cell.

* Past the output budget, whatever the line length, the proxy holds about one message's two
  copies: ipykernel sends 0.2 s of output as *one* stream message (a fast loop makes it as big
  as everything it printed), which the WebSocket library reads whole, and the proxy spools it a
  slice at a time (``core.limits``). 5x the message before.
* With the budget raised so everything is shown, and a frontend that reads slowly, the proxy
  stops reading the WebSocket while the iopub queue is full (``proxy.frontend``): the output
  waits in the server, and the proxy adds a few MB whatever passes (100 MB and more before).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import zmq

from .conftest import install_spec, run_cell, start_kernel

MB = 1024 * 1024

FAST = """
import sys
line = "x" * ({line} - 1) + "\\n"
chunk = line * max(1, 65536 // {line})
for _ in range({total} // len(chunk)):
    sys.stdout.write(chunk)
    {flush}
"""


class PeakRss:
    """The peak RSS of a process over a ``with`` block, from the kernel's own high-water mark
    (``/proc/PID/status`` VmHWM, reset through ``clear_refs``), sampled where that is refused."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.process = psutil.Process(pid)
        self.before = 0
        self.peak = 0

    def _hwm(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def __enter__(self) -> PeakRss:
        self.before = self.process.memory_info().rss
        with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
            refs.write("5")  # resets VmHWM to the current RSS
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak = self._hwm()

    @property
    def added(self) -> int:
        return self.peak - self.before


@pytest.fixture
def fast_kernel(
    kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple]:
    monkeypatch.setenv("CGPU_SPOOL_DIR", str(tmp_path / "spool"))
    km, kc = start_kernel(install_spec(kernel_dir, "cgpu-test-memory", "local"))
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def _spooled(tmp_path: Path) -> int:
    return sum(p.stat().st_size for p in (tmp_path / "spool").glob("*/*"))


@pytest.mark.parametrize("line", [100, 64 * 1024, MB])
def test_a_fast_producer_past_the_budget_costs_two_copies_of_its_message(
    fast_kernel: tuple, tmp_path: Path, line: int
) -> None:
    km, kc = fast_kernel
    run_cell(kc, "1")
    total = 100 * MB
    with PeakRss(km.provisioner.pid) as memory:
        reply, _ = run_cell(kc, FAST.format(line=line, total=total, flush=""), timeout=110)
    assert reply["content"]["status"] == "ok"
    assert _spooled(tmp_path) >= total - 3 * MB  # all but the 2 MB budget, saved
    # ipykernel sent it as one or a few messages of up to 100 MB: at most ~2 copies of that
    assert memory.added < 2.5 * total, memory.added / MB


def test_flushed_lines_past_the_budget_stay_small(fast_kernel: tuple, tmp_path: Path) -> None:
    km, kc = fast_kernel
    run_cell(kc, "1")
    total = 100 * MB
    code = FAST.format(line=64 * 1024, total=total, flush="sys.stdout.flush()")
    with PeakRss(km.provisioner.pid) as memory:
        reply, _ = run_cell(kc, code, timeout=110)
    assert reply["content"]["status"] == "ok"
    assert memory.added < 64 * MB, memory.added / MB


def _slow_frontend(
    kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, total: int, pause: float
) -> tuple[int, int]:
    """A cell shows ``total`` bytes (budget raised) to a frontend that sleeps ``pause`` per
    message and whose own ZMQ reads ahead little (RCVHWM 16): (proxy's added peak, received)."""
    monkeypatch.setenv("CGPU_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("CGPU_MAX_OUTPUT_BYTES", str(4 * total))
    km, _ = start_kernel(install_spec(kernel_dir, "cgpu-test-slow", "local"))
    kc = km.client()
    kc.context.setsockopt(zmq.RCVHWM, 16)  # the client's sockets, made from here on
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        run_cell(kc, "1")
        code = FAST.format(line=64 * 1024, total=total, flush="sys.stdout.flush()")
        received = 0
        with PeakRss(km.provisioner.pid) as memory:
            msg_id = kc.execute(code)
            deadline = time.monotonic() + 110
            while time.monotonic() < deadline:
                msg = kc.get_iopub_msg(timeout=30)
                time.sleep(pause)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                if msg["msg_type"] == "stream":
                    received += len(msg["content"]["text"])
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    break
        return memory.added, received
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_a_slow_frontend_holds_the_remote_back(
    kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    total = 48 * MB
    added, received = _slow_frontend(kernel_dir, tmp_path, monkeypatch, total, pause=0.01)
    assert received == total  # everything shown, nothing dropped
    assert added < 24 * MB, added / MB


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_500_mb_to_a_slow_frontend_stays_bounded(
    kernel_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    total = 500 * MB
    added, received = _slow_frontend(kernel_dir, tmp_path, monkeypatch, total, pause=0.002)
    assert received == total
    assert added < 64 * MB, added / MB
