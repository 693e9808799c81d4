"""A spool that cannot be written (a full disk, a folder that cannot be made) loses no word about
it: the cell is told what was lost and why, and never reads "saved in full" for bytes not on disk.

Unit level: the spool writer with an injected ``ENOSPC`` (a short write, then the error), and
the output limits' accounting. End to end (root only): the spool on a 2 MB tmpfs and a 20 MB
cell through a real ``jupyter_client`` frontend, the local backend's jupyter-server and ipykernel.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgpu_kernel.core.limits import Budgets, OutputLimiter, Show, Spool, SpoolFailure
from cgpu_kernel.core.relay import Relay
from cgpu_kernel.core.wire import Message, make_header
from cgpu_kernel.proxy import spool

from .conftest import install_spec, run_cell, start_kernel

MB = 1024 * 1024
CELL = {"msg_id": "cell-1", "msg_type": "execute_request"}


def stream(text: str) -> Message:
    header = make_header("stream", "k")
    return Message.build("iopub", header, CELL, {}, {"name": "stdout", "text": text})


def idle() -> Message:
    header = make_header("status", "k")
    return Message.build("iopub", header, CELL, {}, {"execution_state": "idle"})


class FillingDisk:
    """``os.write`` on a disk with ``room`` bytes left: short writes up to it, then ENOSPC."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.real_write = os.write

    def __call__(self, descriptor: int, data: bytes | memoryview) -> int:
        if self.room == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = self.real_write(descriptor, bytes(data[: self.room]))
        self.room -= written
        return written


def test_spool_writer_reports_a_full_disk_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = spool.SpoolWriter(tmp_path / "run")
    assert writer.write("cell-stdout.txt", b"a" * 100) is None
    monkeypatch.setattr(spool.os, "write", FillingDisk(room=30))
    failure = writer.write("cell-stdout.txt", b"b" * 100)
    assert failure is not None
    assert (failure.saved, failure.lost, failure.first) == (30, 70, True)
    assert "No space left on device" in failure.reason and "cell-stdout.txt" in failure.reason
    # later writes to the failed file are not attempted: the file stays an exact prefix
    monkeypatch.undo()
    later = writer.write("cell-stdout.txt", b"c" * 50)
    assert later is not None and (later.saved, later.lost, later.first) == (0, 50, False)
    writer.close()
    assert (tmp_path / "run" / "cell-stdout.txt").read_bytes() == b"a" * 100 + b"b" * 30
    assert (writer.written, writer.lost) == (130, 120)


def test_spool_writer_reports_a_folder_it_cannot_make(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the spool root should be")
    writer = spool.SpoolWriter(blocker / "run")
    failure = writer.write("cell-stdout.txt", b"x" * 10)
    assert failure is not None and (failure.saved, failure.lost) == (0, 10)
    assert "Not a directory" in failure.reason or "exists" in failure.reason


def test_limiter_never_claims_saved_in_full_for_lost_bytes() -> None:
    limiter = OutputLimiter(Budgets(max_stream_bytes=50, tail_lines=2), "proxy", "/spool")
    relay = Relay("proxy", limiter=limiter)
    lines = [f"line {i:03d}\n" for i in range(100)]  # 9 bytes each
    told: list[str] = []
    on_disk = 0
    shown = 0
    room = 200
    for line in lines:
        for decision in limiter.process(stream(line)):
            if isinstance(decision, Spool):
                saved = min(room, len(decision.data))
                room -= saved
                on_disk += saved
                if saved < len(decision.data):  # what the shell reports for a short write
                    failure = SpoolFailure(
                        decision.name, saved, len(decision.data) - saved, "No space left"
                    )
                    for action in relay.spool_failed(failure):
                        told.append(action.msg.content["text"])  # type: ignore[union-attr]
            elif decision.msg.content.get("name") == "stderr":
                told.append(decision.msg.content["text"])
            else:
                shown += len(decision.msg.content["text"])
    assert len(told) == 2  # the limit passed, then the failure, once
    assert "could not save" in told[1] and "No space left" in told[1]
    summary = limiter.process(idle())[0]
    assert isinstance(summary, Show)
    text = summary.msg.content["text"]
    assert "saved in full" not in text and "LOST" in text and "No space left" in text
    saved, lost = (int(n) for n in re.findall(r"\((\d+) bytes\)", text))
    assert shown == 50  # the budget
    assert saved == on_disk == 200
    assert shown + saved + lost == sum(len(line) for line in lines)
    assert text.endswith("line 098\nline 099\n")  # the tail is still shown


def test_limiter_still_says_saved_in_full_when_it_was() -> None:
    limiter = OutputLimiter(Budgets(max_stream_bytes=50), "proxy", "/spool")
    for i in range(100):
        limiter.process(stream(f"line {i:03d}\n"))
    summary = limiter.process(idle())[0]
    assert isinstance(summary, Show)
    assert "saved in full to /spool/cell-1-stdout.txt" in summary.msg.content["text"]


# --- end to end: the spool on a full filesystem ---------------------------------------------


@pytest.fixture
def tiny_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 2 MB tmpfs as the spool root (CGPU_SPOOL_DIR), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (the ENOSPC unit tests above still run)")
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
        check=False,
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        monkeypatch.setenv("CGPU_SPOOL_DIR", str(folder))
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


FLOOD_20MB = """
import sys
for block in range(20):
    sys.stdout.write("".join(f"{block:02d}:{i:05d} " + "x" * 90 + "\\n" for i in range(10_486)))
    sys.stdout.flush()
"""
LINE = 100  # bytes per printed line
PRINTED = 20 * 10_486 * LINE  # 20.0 MB


def printed() -> bytes:
    """What FLOOD_20MB prints."""
    return "".join(
        f"{block:02d}:{i:05d} " + "x" * 90 + "\n" for block in range(20) for i in range(10_486)
    ).encode()


def test_20_mb_cell_on_a_2_mb_spool_says_what_was_lost(kernel_dir: Path, tiny_spool: Path) -> None:
    km, kc = start_kernel(install_spec(kernel_dir, "cgpu-test-disk-full", "local"))
    try:
        reply, outputs = run_cell(kc, FLOOD_20MB, timeout=300)
        texts = {
            name: [
                m["content"]["text"]
                for m in outputs
                if m["msg_type"] == "stream" and m["content"]["name"] == name
            ]
            for name in ("stdout", "stderr")
        }
        notices = "".join(texts["stderr"])
        assert "could not save held-back output" in notices
        assert "No space left on device" in notices
        summary = texts["stdout"][-1]
        assert "saved in full" not in summary
        assert "LOST because the spool could not be written" in summary
        assert "No space left on device" in summary
        saved, lost = (int(n) for n in re.findall(r"\((\d+) bytes\)", summary))
        files = [p for p in tiny_spool.glob("*/*") if p.is_file()]
        on_disk = sum(p.stat().st_size for p in files)
        head = "".join(texts["stdout"][:-1])
        # every byte printed is shown, on disk, or counted as lost in the notice
        assert on_disk == saved
        assert len(head) + saved + lost == PRINTED
        assert lost > 15 * MB and saved <= 2 * MB  # the tmpfs holds 2 MB
        # shown then on disk: exactly the output's first bytes, in order, nothing in between
        kept = head.encode() + files[0].read_bytes()
        assert kept == printed()[: len(kept)]
        assert summary.endswith("19:10485 " + "x" * 90 + "\n")  # the tail is still shown
        assert reply["content"]["status"] == "ok"  # the cell ran; the loss is the spool's
        # the proxy is still serving
        reply, outputs = run_cell(kc, "print('still here')")
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
