"""The ZMQ shell (``proxy.frontend.FrontendSockets``) with real ZMQ sockets and no kernel.

The shell binds a connection file's sockets on ``ipc://`` paths in a temporary folder; the tests
are the frontend, with plain ZMQ sockets and ``jupyter_client``'s ``Session`` (the same signing
every Jupyter frontend uses). No Jupyter server and no remote kernel: what is checked is the
shell's own work -- signatures verified, forged and replayed messages dropped and counted,
outgoing messages signed, iopub held until the first subscription, the heartbeat echoed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
from jupyter_client.session import Session

from cgpu_kernel.core.wire import Message, make_header
from cgpu_kernel.proxy.frontend import FrontendSockets, socket_address

KEY = b"a-signing-key"
PORTS = {"shell_port": 1, "control_port": 2, "stdin_port": 3, "iopub_port": 4, "hb_port": 5}


class Frontend:
    """A frontend's sockets, connected to a bound :class:`FrontendSockets`."""

    def __init__(self, info: dict[str, Any], key: bytes = KEY) -> None:
        self.context = zmq.Context()
        self.session = Session(key=key, check_pid=False)
        self.info = info
        self.sockets: list[zmq.Socket[Any]] = []

    def connect(self, kind: int, port_name: str, identity: bytes = b"") -> zmq.Socket[Any]:
        sock = self.context.socket(kind)
        sock.linger = 0
        if identity:
            sock.setsockopt(zmq.IDENTITY, identity)  # before connecting, or it is not used
        sock.connect(socket_address(self.info, int(self.info[port_name])))
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(linger=0)
        self.context.term()


async def receive(sock: zmq.Socket[Any], timeout: float = 5.0) -> list[bytes]:
    """One multipart message, waiting without blocking the loop the shell runs on."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            return list(sock.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("nothing arrived") from None
            await asyncio.sleep(0.005)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError("the condition never held")
        await asyncio.sleep(0.005)


class Running:
    """A bound shell with its read loops running, and what they handed on."""

    def __init__(self, shell: FrontendSockets) -> None:
        self.shell = shell
        self.received: list[tuple[str, tuple[bytes, ...], Message]] = []
        self.subscriptions: list[bytes] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loops = self.shell.loops(
            lambda channel, ids, msg: self.received.append((channel, ids, msg)),
            self.subscriptions.append,
        )
        self.tasks = [asyncio.ensure_future(loop) for loop in loops]

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture
def info(tmp_path: Path) -> dict[str, Any]:
    return {"transport": "ipc", "ip": str(tmp_path / "kernel"), "key": KEY.decode(), **PORTS}


def with_shell(
    info: dict[str, Any], body: Callable[[Running, Frontend], Awaitable[None]]
) -> FrontendSockets:
    """Bind a shell for ``info``, run ``body`` with it and a frontend, close both."""
    shell = FrontendSockets(info, Session(key=KEY, check_pid=False))
    shell.bind()

    async def main() -> None:
        running = Running(shell)
        running.start()
        frontend = Frontend(info)
        try:
            await asyncio.wait_for(body(running, frontend), 20)
        finally:
            await running.stop()
            frontend.close()

    try:
        asyncio.run(main())
    finally:
        shell.close()
    return shell


def own_message(code: str = "1") -> Message:
    return Message.build(
        "shell", make_header("execute_reply", "proxy"), {}, {}, {"status": "ok", "code": code}
    )


# --- in: verification ---------------------------------------------------------------------------


def test_a_signed_message_is_verified_and_handed_on(info: dict[str, Any]) -> None:
    async def body(running: Running, frontend: Frontend) -> None:
        shell = frontend.connect(zmq.DEALER, "shell_port", identity=b"frontend-1")
        sent = frontend.session.send(shell, "execute_request", content={"code": "x = 1"})
        await until(lambda: bool(running.received))
        channel, identities, msg = running.received[0]
        assert channel == "shell"
        assert identities == (b"frontend-1",)
        assert msg.msg_id == sent["header"]["msg_id"]
        assert msg.content == {"code": "x = 1"}

    shell = with_shell(info, body)
    assert shell.rejected == 0


def test_forged_unsigned_and_replayed_messages_are_dropped(
    info: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    async def body(running: Running, frontend: Frontend) -> None:
        control = frontend.connect(zmq.DEALER, "control_port")
        session = frontend.session
        forged = session.serialize(session.msg("shutdown_request", content={}))
        forged[1] = b"0" * 64  # a signature made without the key
        control.send_multipart(forged)
        unsigned = session.serialize(session.msg("shutdown_request", content={}))
        unsigned[1] = b""
        control.send_multipart(unsigned)
        genuine = session.serialize(session.msg("interrupt_request", content={}))
        control.send_multipart(genuine)
        control.send_multipart(genuine)  # the same signature again: a replay
        wrong_key = Session(key=b"another key", check_pid=False)
        control.send_multipart(wrong_key.serialize(wrong_key.msg("shutdown_request")))
        last = session.send(control, "kernel_info_request")
        await until(lambda: len(running.received) == 2)
        await asyncio.sleep(0.05)  # nothing else trickles in
        assert [m.msg_type for _, _, m in running.received] == [
            "interrupt_request",
            "kernel_info_request",
        ]
        assert running.received[1][2].msg_id == last["header"]["msg_id"]

    with caplog.at_level("WARNING", "cgpu_kernel.proxy.frontend"):
        shell = with_shell(info, body)
    assert shell.rejected == 4
    reasons = caplog.text
    for reason in ("Invalid Signature", "Unsigned Message", "Duplicate Signature"):
        assert reason in reasons


def test_a_copied_signature_does_not_get_the_genuine_message_rejected(
    info: dict[str, Any],
) -> None:
    """A forgery carrying the genuine signature arrives first: the genuine one still passes."""

    async def body(running: Running, frontend: Frontend) -> None:
        shell = frontend.connect(zmq.DEALER, "shell_port")
        session = frontend.session
        genuine = session.serialize(session.msg("execute_request", content={"code": "ok"}))
        forged = list(genuine)
        forged[-1] = b'{"code": "evil"}'
        shell.send_multipart(forged)
        shell.send_multipart(genuine)
        await until(lambda: bool(running.received))
        await asyncio.sleep(0.05)
        assert [m.content for _, _, m in running.received] == [{"code": "ok"}]

    assert with_shell(info, body).rejected == 1


def test_malformed_frames_are_rejected_not_forwarded(info: dict[str, Any]) -> None:
    async def body(running: Running, frontend: Frontend) -> None:
        stdin = frontend.connect(zmq.DEALER, "stdin_port")
        stdin.send_multipart([b"no delimiter", b"at all"])
        stdin.send_multipart([b"<IDS|MSG>", b"sig"])  # too few frames
        session = frontend.session
        bad_json = session.msg("input_reply", content={})
        parts = session.serialize(bad_json)
        parts[-1] = b"{not json"
        parts[1] = session.sign(parts[2:6])  # properly signed, but the content is no JSON
        stdin.send_multipart(parts)
        session.send(stdin, "input_reply", content={"value": "typed"})
        await until(lambda: bool(running.received))
        await asyncio.sleep(0.05)
        assert [m.content for _, _, m in running.received] == [{"value": "typed"}]

    assert with_shell(info, body).rejected == 3


# --- out: signing -------------------------------------------------------------------------------


def test_replies_are_signed_and_routed_to_the_sender(info: dict[str, Any]) -> None:
    async def body(running: Running, frontend: Frontend) -> None:
        shell = frontend.connect(zmq.DEALER, "shell_port", identity=b"frontend-2")
        frontend.session.send(shell, "kernel_info_request")
        await until(lambda: bool(running.received))
        _, identities, _ = running.received[0]
        reply = own_message("reply")
        running.shell.send("shell", identities, reply)
        frames = await receive(shell)
        _, signed = frontend.session.feed_identities(frames)
        # ``deserialize`` checks the HMAC with the frontend's key: raises if it is wrong.
        parsed = frontend.session.deserialize(signed)
        assert parsed["header"]["msg_id"] == reply.msg_id
        assert parsed["content"] == {"status": "ok", "code": "reply"}

    with_shell(info, body)


def test_stdin_waits_for_a_late_frontend_socket_in_order_then_gives_up(
    info: dict[str, Any], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A frontend's stdin socket that connects after the kernel asked (its sockets connect on
    their own) gets every waiting message, in order; for one that never connects, the message
    is dropped after ``STDIN_WAIT`` with a warning, and later ones are not held behind it."""
    from cgpu_kernel.proxy import frontend as frontend_module

    async def body(running: Running, frontend: Frontend) -> None:
        asks = [own_message(f"ask {n}") for n in range(3)]
        for ask in asks:
            running.shell.send("stdin", (b"late-frontend",), ask)
        await asyncio.sleep(0.3)  # retried meanwhile: nobody there
        stdin = frontend.connect(zmq.DEALER, "stdin_port", identity=b"late-frontend")
        got = []
        for _ in asks:
            _, signed = frontend.session.feed_identities(await receive(stdin))
            got.append(frontend.session.deserialize(signed)["header"]["msg_id"])
        assert got == [ask.msg_id for ask in asks]

        monkeypatch.setattr(frontend_module, "STDIN_WAIT", 0.2)
        running.shell.send("stdin", (b"never-connects",), own_message("lost"))
        after = own_message("after")
        running.shell.send("stdin", (b"late-frontend",), after)
        _, signed = frontend.session.feed_identities(await receive(stdin))
        assert frontend.session.deserialize(signed)["header"]["msg_id"] == after.msg_id
        assert "was dropped" in caplog.text

    with caplog.at_level("WARNING"):
        with_shell(info, body)


def test_iopub_is_held_until_the_first_subscription(info: dict[str, Any]) -> None:
    async def body(running: Running, frontend: Frontend) -> None:
        early = [own_message(str(i)) for i in range(3)]
        for msg in early:
            running.shell.publish(msg)  # nobody subscribed: ZMQ would drop these
        iopub = frontend.connect(zmq.SUB, "iopub_port")
        iopub.setsockopt(zmq.SUBSCRIBE, b"")
        await until(lambda: bool(running.subscriptions))
        assert running.subscriptions == [b""]
        got = []
        for _ in early:
            topic_and_ids, signed = frontend.session.feed_identities(await receive(iopub))
            assert topic_and_ids == [b"execute_reply"]  # the topic is the message type
            got.append(frontend.session.deserialize(signed))
        assert [m["header"]["msg_id"] for m in got] == [m.msg_id for m in early]
        assert got[0]["content"]["code"] == "0"

    with_shell(info, body)


# --- heartbeat ----------------------------------------------------------------------------------


def test_heartbeat_echoes(info: dict[str, Any]) -> None:
    async def body(running: Running, frontend: Frontend) -> None:
        heartbeat = frontend.connect(zmq.REQ, "hb_port")
        for ping in (b"ping", b"\x00\x01 binary"):
            heartbeat.send(ping)
            assert await receive(heartbeat) == [ping]

    with_shell(info, body)


# --- out: flow control on iopub -----------------------------------------------------------------


def test_a_slow_iopub_frontend_pushes_back_and_loses_nothing(info: dict[str, Any]) -> None:
    """ZMQ's queue towards a frontend that does not keep up is bounded: past it what is published
    waits in the shell, ``on_flow(True)`` tells the proxy to stop reading the remote, and once the
    frontend has read, everything arrives in order and ``on_flow(False)`` lets the remote in."""

    async def body(running: Running, frontend: Frontend) -> None:
        flow: list[bool] = []
        running.shell.on_flow = flow.append
        frontend.context.setsockopt(zmq.RCVHWM, 4)  # a frontend that reads little ahead
        iopub = frontend.connect(zmq.SUB, "iopub_port")
        iopub.setsockopt(zmq.SUBSCRIBE, b"")
        await until(lambda: bool(running.subscriptions))
        text = "x" * 65_535 + "\n"
        sent = []
        for _ in range(300):  # 19 MB: more than the queue, the socket and the frontend hold
            msg = Message.build("iopub", make_header("stream", "proxy"), {}, {}, {"text": text})
            sent.append(msg.msg_id)
            running.shell.publish(msg)
        assert flow and flow[-1] is True
        assert running.shell.iopub_full
        got = []
        while len(got) < len(sent):
            frames = await receive(iopub)
            got.append(json.loads(frames[3])["msg_id"])
        assert got == sent  # nothing dropped, nothing reordered
        await until(lambda: flow[-1] is False)
        assert not running.shell.iopub_full

    with_shell(info, body)
