"""Refusals and failing servers: what the proxy does when the remote says no.

Against real processes: a stock jupyter-server (tornado's 10 MiB limit per WebSocket message)
for messages too big to deliver, and :class:`FrontDoor`, a small HTTP relay in front of a real
jupyter-server that plays a failing server or reverse proxy: it accepts each WebSocket and
closes it at once (close code 1011), or answers every request with 502 Bad Gateway.

* A 20 MB ``execute_request`` and a 24 MB comm message from the frontend: the server closes
  with 1009; the cell gets an error (or a notice) naming the size and the server setting,
  nothing hangs, nothing is re-sent, and the next cell runs.
* A server that accepts and closes at once: the proxy backs off across outages (a handful of
  connections, not thousands), stays near idle, and the cell gets a clear error once the budget
  is spent; the proxy stays up and the next cell runs once the server is well.
* A 502 from a reverse proxy while reconnecting: the kernel is not taken for gone (its variables
  survive), and ``reclaim`` keeps its record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from cgpu_kernel.backends import registry
from cgpu_kernel.backends.http import is_transient, means_gone
from cgpu_kernel.backends.jupyter import JupyterServerClient
from cgpu_kernel.core.actions import Publish, SendToFrontend, SendToRemote
from cgpu_kernel.core.backoff import Backoff, FailureStreak
from cgpu_kernel.core.relay import Relay
from cgpu_kernel.core.wire import Message, make_header
from cgpu_kernel.exceptions import RemoteHTTPError, RemoteUnreachableError
from cgpu_kernel.paths import registry_dir

from .conftest import (
    RemoteServer,
    collect_iopub,
    install_remote_spec,
    install_spec_via,
    run_cell,
    start_jupyter_server,
    start_kernel,
    stdout_of,
)

SETTING = "websocket_max_message_size"
#: what the relay sends right after the server's 101, per failure it plays
AFTER_UPGRADE = {
    "close": b"\x88\x02\x03\xf3",  # a server's close frame (unmasked), code 1011
    # a binary frame that claims 2**63 - 1 bytes: the client refuses it and closes
    "absurd": b"\x82\x7f\x7f\xff\xff\xff\xff\xff\xff\xff",
}
BAD_GATEWAY = (
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/html\r\nContent-Length: 20\r\n"
    b"Connection: close\r\n\r\n<h1>Bad Gateway</h1>"
)


class FrontDoor:
    """An HTTP relay in front of a server, in a thread of its own. ``mode``:

    * ``"pass"``: every byte both ways;
    * ``"close"``: a WebSocket upgrade is let through, and once the server's 101 is passed on
      the relay sends a close frame with code 1011 and drops both sides (REST passes);
    * ``"absurd"``: the same, with a frame header claiming 2**63 - 1 bytes instead;
    * ``"502"``: every request, REST and WebSocket, is answered ``502 Bad Gateway``.

    ``websockets`` counts the upgrades it saw; :meth:`cut` closes every open connection.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.mode = "pass"
        self.websockets = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FrontDoor:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def cut(self) -> None:
        asyncio.run_coroutine_threadsafe(self._cut(), self._loop).result(10)

    async def _cut(self) -> None:
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            upgrade = b"upgrade: websocket" in head.lower()
            if upgrade:
                self.websockets += 1
            if self.mode == "502":
                writer.write(BAD_GATEWAY)
                await writer.drain()
                return
            up_reader, upstream = await asyncio.open_connection("127.0.0.1", self.target_port)
            self._writers.add(upstream)
            upstream.write(head)
            if upgrade and self.mode in AFTER_UPGRADE:
                writer.write(await up_reader.readuntil(b"\r\n\r\n"))  # the 101
                writer.write(AFTER_UPGRADE[self.mode])
                await writer.drain()
                return
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            for each in (writer, upstream):
                if each is not None:
                    each.close()
                    self._writers.discard(each)

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


@pytest.fixture(scope="module")
def stock_server(session_dir: Path) -> Iterator[RemoteServer]:
    """A jupyter-server as installed: tornado's 10 MiB limit per WebSocket message."""
    server = start_jupyter_server(session_dir / "stock-limit")
    yield server
    server.stop()


@contextlib.contextmanager
def proxy_kernel(spec: str) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    km, kc = start_kernel(spec)
    try:
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


@pytest.fixture
def door(jupyter_server: RemoteServer) -> Iterator[FrontDoor]:
    with FrontDoor(jupyter_server.port) as relay:
        yield relay


def reply_to(kc: BlockingKernelClient, msg_id: str, deadline: float) -> dict[str, Any]:
    """The shell reply to ``msg_id``; fails the test past ``deadline`` (a hang)."""
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no reply to {msg_id}: the cell hangs"
        try:
            reply = kc.get_shell_msg(timeout=left)
        except Exception:  # queue.Empty
            continue
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def notices(outputs: list[dict[str, Any]]) -> str:
    return "".join(
        m["content"]["text"]
        for m in outputs
        if m["msg_type"] == "stream" and m["content"]["name"] == "stderr"
    )


# --- the decisions, without servers (core.relay, core.backoff, backends.http) -------------------

NOTEBOOK = (b"notebook",)


def frontend_msg(msg_type: str, buffers: list[bytes] | None = None, **content: Any) -> Message:
    return Message.build(
        "shell", make_header(msg_type, "frontend"), {}, {}, content, buffers=list(buffers or [])
    )


def errors_and_notices(actions: list[Any]) -> tuple[list[dict[str, Any]], list[str]]:
    replies = [a.msg.content for a in actions if isinstance(a, SendToFrontend)]
    texts = [
        a.msg.content["text"]
        for a in actions
        if isinstance(a, Publish) and a.msg.msg_type == "stream"
    ]
    return replies, texts


def test_a_1009_refuses_the_largest_message_sent_and_re_sends_the_rest() -> None:
    relay = Relay("proxy")
    relay.remote_connected()
    small = frontend_msg("execute_request", code="1")
    big = frontend_msg("execute_request", code="x" * 3_000_000)
    bigger = frontend_msg("execute_request", code="y" * 5_000_000)
    for msg in (small, big, bigger):
        assert [type(a) for a in relay.frontend_message("shell", NOTEBOOK, msg)] == [SendToRemote]
    # the writes of big and bigger failed with the connection; small was written
    relay.send_failed(relay.inflight[1], connection_alive=False)
    relay.send_failed(relay.inflight[1], connection_alive=False)
    replies, _ = errors_and_notices(relay.remote_closed(1009))
    assert [r["ename"] for r in replies] == ["RemoteMessageTooBig"]
    assert "5.0 MB execute_request" in replies[0]["evalue"]
    assert "websocket_max_message_size" in replies[0]["evalue"]
    assert relay.refused_size == bigger.size
    # on the next connection the 3 MB one goes again (it may be under the limit), once
    sent = [a for a in relay.remote_connected() if isinstance(a, SendToRemote)]
    assert [a.msg.msg_id for a in sent] == [big.msg_id]
    assert {r.msg.msg_id for r in relay.inflight} == {small.msg_id, big.msg_id}
    # one as big as the refused one is refused before it is sent
    again = frontend_msg("execute_request", code="z" * 5_000_000)
    replies, _ = errors_and_notices(relay.frontend_message("shell", NOTEBOOK, again))
    assert "was not sent" in replies[0]["evalue"]


def test_a_large_comm_message_cut_twice_is_refused_with_notices_in_the_cells() -> None:
    relay = Relay("proxy")
    relay.remote_connected()
    cell = frontend_msg("execute_request", code="w = Upload()")
    relay.frontend_message("shell", NOTEBOOK, cell)
    comm_open = Message.build(
        "iopub", make_header("comm_open", "kernel"), cell.header, {}, {"comm_id": "c1"}
    )
    relay.remote_message(comm_open)
    relay.remote_message(
        Message.build("shell", make_header("execute_reply", "k"), cell.header, {}, {"status": "ok"})
    )
    running = frontend_msg("execute_request", code="sleep()")
    relay.frontend_message("shell", NOTEBOOK, running)
    upload = frontend_msg("comm_msg", [b"\0" * 2_000_000], comm_id="c1", data={})
    assert [type(a) for a in relay.frontend_message("shell", NOTEBOOK, upload)] == [SendToRemote]
    assert relay.remote_closed(None) == []  # the first cut: maybe the network, sent again
    relay.remote_disconnected()
    relay.send_failed(relay.inflight[0], connection_alive=False)  # (the running cell's write)
    relay.remote_connected()
    relay.frontend_message("shell", NOTEBOOK, upload)  # the comm message, written again
    refused = relay.remote_closed(None)
    replies, texts = errors_and_notices(refused)
    assert replies == []  # a comm message has no reply: notices instead
    parents = [a.msg.parent_header["msg_id"] for a in refused if isinstance(a, Publish)]
    assert parents == [cell.msg_id, running.msg_id]  # the comm's opener, the running cell
    assert all("2.0 MB comm_msg" in t and "dropped the connection" in t for t in texts)
    relay.remote_connected()
    assert relay.remote_closed(None) == []  # refused once: nothing is sent again


def test_the_failure_streak_carries_across_outages() -> None:
    streak = FailureStreak(Backoff(first=1.0, cap=8.0), uniform=lambda a, b: 0.0)
    assert streak.lost(opened_at=0.0, now=100.0, how="cut") == 0.0  # lived: a blip, at once
    assert streak.next_delay() == 1.0
    assert streak.lost(opened_at=100.5, now=100.6, how="code 1011") == 2.0  # died young
    assert streak.lost(opened_at=103.0, now=103.1, how="code 1011") == 4.0
    assert streak.deadline(10.0, now=104.0) == 110.0  # the budget counts from the first failure
    assert (streak.short_lived, streak.last_close) == (2, "code 1011")
    streak.gave_up()
    assert streak.deadline(10.0, now=200.0) == 210.0  # the user's retry: a fresh budget
    assert streak.lost(opened_at=200.0, now=200.1, how="code 1011") == 8.0  # delays went on
    assert streak.lost(opened_at=201.0, now=300.0, how="cut") == 0.0  # a healthy one resets
    assert streak.next_delay() == 1.0


def test_only_a_404_means_gone() -> None:
    def http(status: int) -> RemoteHTTPError:
        return RemoteHTTPError("GET", "http://h/api/kernels/k", status, "reason")

    assert means_gone(http(404))
    assert not any(means_gone(http(s)) for s in (500, 502, 503, 504, 400, 410, 429))
    assert all(is_transient(http(s)) for s in (500, 502, 503, 504, 408, 429))
    assert not any(is_transient(http(s)) for s in (400, 404, 409))
    assert is_transient(RemoteUnreachableError("no answer"))


# --- messages over the server's limit -----------------------------------------------------------


def test_an_execute_request_over_the_limit_gets_an_error_and_the_next_cell_runs(
    kernel_dir: Path, stock_server: RemoteServer
) -> None:
    spec = install_remote_spec(kernel_dir, "cgpu-test-stock-limit", stock_server)
    with proxy_kernel(spec) as (_km, kc):
        reply, _ = run_cell(kc, "kept = 'before'")
        assert reply["content"]["status"] == "ok"
        started = time.monotonic()
        msg_id = kc.execute("big = '" + "a" * 20_000_000 + "'")
        reply = reply_to(kc, msg_id, started + 60)
        took = time.monotonic() - started
        content = reply["content"]
        assert content["status"] == "error"
        assert content["ename"] == "RemoteMessageTooBig"
        assert "20.0 MB" in content["evalue"] and SETTING in content["evalue"]
        assert "1009" in content["evalue"]
        # the same kernel carries on: its variables, and the next cell
        reply, outputs = run_cell(kc, "print(kept, 'big' in dir())")
        assert reply["content"]["status"] == "ok"
        assert stdout_of(outputs) == "before False\n"
        # A bigger one is refused before it is sent (the limit learned): at once.
        started = time.monotonic()
        msg_id = kc.execute("big = '" + "b" * 25_000_000 + "'")
        reply = reply_to(kc, msg_id, started + 30)
        local = time.monotonic() - started
        assert reply["content"]["ename"] == "RemoteMessageTooBig"
        assert "was not sent" in reply["content"]["evalue"]
        assert "25.0 MB" in reply["content"]["evalue"]
        print(
            f"20 MB refused by the server in {took:.2f} s; 25 MB refused locally in {local:.2f} s"
        )
        reply, outputs = run_cell(kc, "print('after')")
        assert stdout_of(outputs) == "after\n"


def test_a_comm_message_over_the_limit_is_reported_in_the_cells(
    kernel_dir: Path, stock_server: RemoteServer
) -> None:
    spec = install_remote_spec(kernel_dir, "cgpu-test-stock-limit-comm", stock_server)
    with proxy_kernel(spec) as (_km, kc):
        opener_id = kc.execute(
            "from comm import create_comm\n"
            "upload = create_comm(target_name='cgpu-test-upload')\n"
            "print(upload.comm_id)\n"
        )
        opened = collect_iopub(kc, opener_id)
        comm_id = stdout_of(opened).strip()
        assert any(m["msg_type"] == "comm_open" for m in opened)
        running_id = kc.execute("import time\ntime.sleep(5)\nprint('slept')")
        time.sleep(0.5)
        # An upload from the frontend: a comm_msg with a 24 MB binary buffer.
        msg = kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {"chunk": 0}})
        started = time.monotonic()
        kc.session.send(kc.shell_channel.socket, msg, buffers=[b"\0" * 24_000_000])
        outputs: list[dict[str, Any]] = []
        opener_notice = ""
        deadline = started + 60
        while time.monotonic() < deadline:
            got = kc.get_iopub_msg(timeout=deadline - time.monotonic())
            parent = got["parent_header"].get("msg_id")
            if parent == opener_id and got["msg_type"] == "stream":
                opener_notice += got["content"]["text"]
            if parent != running_id:
                continue
            outputs.append(got)
            if got["msg_type"] == "status" and got["content"]["execution_state"] == "idle":
                break
        text = notices(outputs)
        assert "24.0 MB comm_msg" in text and SETTING in text, text
        assert "24.0 MB comm_msg" in opener_notice
        assert stdout_of(outputs) == "slept\n"  # the running cell was not disturbed
        reply = reply_to(kc, running_id, deadline)
        assert reply["content"]["status"] == "ok"
        reply, outputs = run_cell(kc, "print('next')")
        assert stdout_of(outputs) == "next\n"


# --- a server that accepts the WebSocket and closes it at once ---------------------------------


@pytest.mark.parametrize(
    ("failure", "seen_as"),
    [("close", "1011"), pytest.param("absurd", "connection lost", marks=pytest.mark.slow)],
)
def test_a_server_that_closes_at_once_gets_backoff_then_a_clear_error(
    kernel_dir: Path, door: FrontDoor, jupyter_server: RemoteServer, failure: str, seen_as: str
) -> None:
    spec = install_spec_via(
        kernel_dir, "cgpu-test-closes-at-once", door.url, jupyter_server, "--reconnect-budget=10"
    )
    with proxy_kernel(spec) as (km, kc):
        run_cell(kc, "x = 7")
        proxy = psutil.Process(km.provisioner.process.pid)  # type: ignore[union-attr]
        door.mode = failure
        before, cpu_before = door.websockets, sum(proxy.cpu_times()[:2])
        started = time.monotonic()
        door.cut()
        msg_id = kc.execute("print(x)")
        reply = reply_to(kc, msg_id, started + 30)
        took = time.monotonic() - started
        connections = door.websockets - before
        cpu = sum(proxy.cpu_times()[:2]) - cpu_before
        print(f"{connections} connections and {cpu:.2f} s of CPU in {took:.1f} s, then the error")
        content = reply["content"]
        assert content["ename"] == "RemoteConnectionLost", content
        assert "closed it within" in content["evalue"] and seen_as in content["evalue"]
        assert 3 <= connections < 30
        # the 10 s budget counts from the first connection that died young: this test's first
        # one may be it, if it was opened under 5 s before the cut
        assert 4 < took < 25
        assert cpu < 0.25 * took  # near idle while the server fails
        # the proxy stays up; once the server is well, the next cell finds the same kernel
        door.mode = "pass"
        reply, outputs = run_cell(kc, "print(x)", timeout=60)
        assert stdout_of(outputs) == "7\n"


# --- 502 from a reverse proxy ------------------------------------------------------------------


def test_a_502_from_a_reverse_proxy_while_reconnecting_is_not_a_lost_kernel(
    kernel_dir: Path, door: FrontDoor, jupyter_server: RemoteServer
) -> None:
    spec = install_spec_via(kernel_dir, "cgpu-test-bad-gateway", door.url, jupyter_server)
    with proxy_kernel(spec) as (_km, kc):
        run_cell(kc, "x = 42")
        kernels = jupyter_server.kernel_ids()
        door.mode = "502"
        door.cut()
        msg_id = kc.execute("print(x)")
        time.sleep(4)  # health checks and upgrades all answered 502 meanwhile
        door.mode = "pass"
        outputs = collect_iopub(kc, msg_id, timeout=60)
        reply = reply_to(kc, msg_id, time.monotonic() + 30)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert stdout_of(outputs) == "42\n"
        told = notices(outputs)  # "lost the connection ...", "reconnected ...": fine
        assert "variables" not in told and "fresh" not in told, told
        assert jupyter_server.kernel_ids() == kernels  # no fresh kernel was started


def test_reclaim_keeps_its_record_on_a_502(door: FrontDoor, jupyter_server: RemoteServer) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    async def reclaim() -> list[str]:
        client = JupyterServerClient(door.url, jupyter_server.token)
        try:
            return await registry.reclaim_orphans(client)
        finally:
            client.close()

    record = registry_dir() / "remote-kernel-cgpu-test-orphan.json"
    orphan = {"pid": dead.pid, "create_time": 1.0, "url": door.url, "kernel_id": "cgpu-test-orphan"}
    record.write_text(json.dumps(orphan))
    try:
        door.mode = "502"
        assert asyncio.run(reclaim()) == []
        assert record.exists()  # a 502 says nothing about the kernel: tried again next time
        door.mode = "pass"
        assert asyncio.run(reclaim()) == ["cgpu-test-orphan"]
        assert not record.exists()  # the server's 404: really gone
    finally:
        record.unlink(missing_ok=True)
