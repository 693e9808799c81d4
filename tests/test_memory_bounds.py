"""The proxy's memory under a fast producer and a slow frontend, end to end.

A real private jupyter-server (the ``local`` backend: its IOPub rate limit off, so nothing is
dropped before the proxy), a real ipykernel printing as fast as it can, a real jupyter_client
frontend. What is measured is the proxy process's peak RSS (``VmHWM``, reset before the cell)
minus its RSS before the cell.

* Past the output budget, whatever the line length, the proxy adds a few MB: ipykernel would
  send 0.2 s of output as *one* stream message (a fast loop made it as big as everything it
  printed, and the proxy held it twice: 5x before, 2x after the first changes of issue 19);
  the journal agent in the kernel sends its output once 1 MiB waits (``bound_streams``), and
  the proxy spools it a slice at a time (``core.limits``).
* With the budget raised so everything is shown, and a frontend that reads slowly, the proxy
  stops reading the WebSocket while the iopub queue is full (``proxy.frontend``): the output
  waits in the server, and the proxy adds a few MB whatever passes (100 MB and more before).
* One large part of a message, both directions (issue 19): a code string, a header, a comm
  buffer, each held about as often as the floor says (docs/benchmarks.md): the code twice
  (ZMQ's frame or its text, and its parse), the header three times (the request's bytes and
  parse, and the reply arriving), the buffer once or twice. Before: 6x, 7x, 2.3x.

The pieces behind those figures are checked here too, without a kernel: the WebSocket reader
hands a large frame over without copying it, the frontend shell frees ZMQ's frame of a large
content once it has its text.
"""

from __future__ import annotations

import json
import random
import time
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq
from jupyter_client.session import Session
from websockets.frames import Frame, Opcode
from websockets.uri import parse_uri

from cgpu_kernel.core.wire import DELIMITER, TextPart, make_header
from cgpu_kernel.proxy.connection import HANDOVER_MIN, _HandoverReader, _Protocol
from cgpu_kernel.proxy.frontend import TEXT_MIN, FrontendSockets

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
) -> Iterator[tuple[Any, Any]]:
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
def test_a_fast_producer_past_the_budget_stays_small_whatever_its_lines(
    fast_kernel: tuple[Any, Any], tmp_path: Path, line: int
) -> None:
    km, kc = fast_kernel
    run_cell(kc, "1")
    total = 100 * MB
    with PeakRss(km.provisioner.pid) as memory:
        reply, _ = run_cell(kc, FAST.format(line=line, total=total, flush=""), timeout=110)
    assert reply["content"]["status"] == "ok"
    assert _spooled(tmp_path) >= total - 3 * MB  # all but the 2 MB budget, saved
    # messages of ~1 MiB (the kernel's streams bounded): 8-12 MB measured for 100-500 MB;
    # one message of everything before (200-250 MB here)
    assert memory.added < 48 * MB, memory.added / MB


def test_flushed_lines_past_the_budget_stay_small(
    fast_kernel: tuple[Any, Any], tmp_path: Path
) -> None:
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
        with PeakRss(km.provisioner.pid) as memory:  # type: ignore[union-attr]
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


# --- the pieces, without a kernel ------------------------------------------------------------


def test_the_websocket_reader_hands_a_large_frame_over_without_copying_it() -> None:
    ws = _Protocol(parse_uri("ws://example.invalid/api/kernels/k/channels"))
    assert isinstance(ws.reader, _HandoverReader)  # installed before any byte was fed
    reader = _HandoverReader()
    size = 2 * HANDOVER_MIN
    parse = reader.read_exact(size)
    next(parse)
    reader.feed_data(b"a" * (size - 10))
    next(parse)  # still waiting
    reader.feed_data(b"b" * 10 + b"next frame")
    buffer = reader.buffer
    with pytest.raises(StopIteration) as done:
        next(parse)
    got = done.value.value
    assert got is buffer and len(got) == size and got.endswith(b"b" * 10)  # the buffer itself
    assert reader.buffer == b"next frame"  # what followed starts the next buffer
    small = reader.read_exact(4)  # below HANDOVER_MIN: the library's copy, as ever
    with pytest.raises(StopIteration) as done:
        next(small)
    assert done.value.value == b"next" and reader.buffer == b" frame"


def test_a_received_frame_is_not_kept_by_the_librarys_frame() -> None:
    """``_frame`` takes the payload out of the library's ``Frame`` (its parser holds the last
    frame until the next one: a large message was held that long)."""
    from cgpu_kernel.proxy.connection import RemoteChannels

    class Channels(RemoteChannels):
        def __init__(self) -> None:  # no loop, no socket: only the frame handling
            self.subprotocol = "v1.kernel.websocket.jupyter.org"
            self.delivered: list[Any] = []
            self.malformed = 0
            self.where = "test"
            self._partial = []
            self._ws = None

        def _deliver(self, msg: Any) -> None:
            self.delivered.append(msg)

    from cgpu_kernel.core.wire import Message, to_ws_v1

    msg = Message.build("iopub", make_header("stream", "s"), {}, {}, {"text": "x" * 100_000})
    frame = Frame(Opcode.BINARY, bytearray(to_ws_v1(msg)))
    channels = Channels()
    channels._frame(frame)
    assert frame.data == b"" and channels.delivered[0].content == {"text": "x" * 100_000}


def _signed_frames(session: Session, content: bytes) -> list[zmq.Frame]:
    header = json.dumps(make_header("execute_request", session.session)).encode()
    parts = [header, b"{}", b"{}", content]
    return [zmq.Frame(f) for f in [b"id", DELIMITER, session.sign(parts), *parts]]


@pytest.mark.parametrize("code", ["x" * TEXT_MIN, "é" * TEXT_MIN])
def test_a_large_content_takes_the_place_of_its_zmq_frame(code: str) -> None:
    shell = FrontendSockets({}, Session(key=b"secret", check_pid=False))
    try:
        content = json.dumps({"code": code, "silent": False}, ensure_ascii=False).encode()
        frames = _signed_frames(shell.session, content)
        zmq_frame = weakref.ref(frames[-1])
        identities, msg = shell.verify("shell", frames)
        assert identities == [b"id"]
        assert isinstance(msg.parts[3], TextPart) and len(msg.parts[3]) == len(content)
        assert zmq_frame() is None  # ZMQ's copy is gone: the text holds the content now
        assert msg.content["code"] == code and msg.wire_parts[3] == content
        # the HMAC was checked over ZMQ's frame: a forged content is still refused
        forged = _signed_frames(shell.session, content)
        forged[-1] = zmq.Frame(content.replace(b'"silent": false', b'"silent": true '))
        with pytest.raises(Exception, match="Invalid Signature"):
            shell.verify("shell", forged)
    finally:
        shell.close()


# --- one large part of a message, end to end ---------------------------------------------------

#: Sizes big enough that the proxy's own few MB of noise is a small part of the ratio.
PART = 40 * MB
HEADER = 10 * MB


@pytest.fixture(scope="module")
def parts_kernel(kernel_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CGPU_SPOOL_DIR", str(tmp_path_factory.mktemp("spool")))
        km, kc = start_kernel(install_spec(kernel_dir, "cgpu-test-parts", "local"))
        try:
            run_cell(kc, "1")
            yield km, kc
        finally:
            kc.stop_channels()
            km.shutdown_kernel()


def _until(get: Any, done: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done(get(timeout=max(0.1, deadline - time.monotonic()))):
        pass


def _idle_of(msg_id: str) -> Any:
    return lambda m: (
        m["parent_header"].get("msg_id") == msg_id
        and m["msg_type"] == "status"
        and m["content"]["execution_state"] == "idle"
    )


def test_a_large_code_string_is_held_twice_at_most(parts_kernel: Any) -> None:
    km, kc = parts_kernel
    with PeakRss(km.provisioner.pid) as memory:
        msg_id = kc.execute("pass  # " + "x" * PART)
        _until(kc.get_shell_msg, lambda m: m["parent_header"].get("msg_id") == msg_id)
        _until(kc.get_iopub_msg, _idle_of(msg_id))
    # its frame or its text, and its parse: 2.0x measured (6.0x before, 3.0x parsed beside
    # the frame); the remote's echo (execute_input) is not parsed for its count
    assert memory.added < 2.4 * PART, memory.added / PART


def test_a_large_header_is_held_three_times_at_most(parts_kernel: Any) -> None:
    km, kc = parts_kernel
    msg = kc.session.msg("execute_request", {"code": "pass", "silent": False})
    msg["header"]["padding"] = "h" * HEADER
    msg_id = msg["header"]["msg_id"]
    with PeakRss(km.provisioner.pid) as memory:
        kc.shell_channel.send(msg)
        _until(kc.get_shell_msg, lambda m: m["parent_header"].get("msg_id") == msg_id)
        _until(kc.get_iopub_msg, _idle_of(msg_id))
    # the request's bytes and parse, one reply arriving: 3.0x measured (7.0x before)
    assert memory.added < 3.6 * HEADER, memory.added / HEADER


def test_a_large_comm_buffer_is_held_about_once(parts_kernel: Any) -> None:
    from benchmarks.run import ECHO_TARGET, SETUP_CODE

    km, kc = parts_kernel
    run_cell(kc, SETUP_CODE)
    comm_id = uuid.uuid4().hex
    kc.session.send(
        kc.shell_channel.socket,
        "comm_open",
        {"comm_id": comm_id, "target_name": ECHO_TARGET, "data": {}},
    )
    payload = random.randbytes(PART)
    with PeakRss(km.provisioner.pid) as memory:
        kc.session.send(
            kc.shell_channel.socket, "comm_msg", {"comm_id": comm_id, "data": {}}, buffers=[payload]
        )
        echoed: dict[str, Any] = {}

        def is_echo(m: dict[str, Any]) -> bool:
            echoed.update(m)
            return bool(m["msg_type"] == "comm_msg" and m["content"].get("comm_id") == comm_id)

        _until(kc.get_iopub_msg, is_echo)
    assert bytes(echoed["buffers"][0]) == payload
    # ZMQ's frame, then the WebSocket frame it comes back in: 1.0-1.3x measured (2.3x before)
    assert memory.added < 1.7 * PART, memory.added / PART
