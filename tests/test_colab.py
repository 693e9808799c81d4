"""The colab backend against the Colab TEST DOUBLE (``colab_double``) before a real jupyter-server.

What passes here was tested against the double, written from FIELD-NOTES section 4, not against
Colab: the manual checklist for a real runtime is in docs/colab.md.

Backend-level tests drive :class:`ColabBackend` directly with asyncio. Proxy-level tests run the
real proxy (``proxy.kernel.ProxyKernelRun``) in a thread with a ``ColabBackend`` and talk to it
with a real ``jupyter_client``. The kernelspec tests (``--backend colab``) run once the colab
backend is wired into ``proxy.kernel`` and ``kernelspec``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import queue
import re
import stat
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from tornado.httpclient import HTTPRequest
from tornado.websocket import websocket_connect

from cgpu_kernel import kernelspec
from cgpu_kernel.backends.base import KernelHealth
from cgpu_kernel.backends.colab import auth
from cgpu_kernel.backends.colab.backend import ColabBackend
from cgpu_kernel.backends.colab.models import (
    RuntimeProxy,
    check_service_url,
    notebook_hash,
    parse_json,
)
from cgpu_kernel.core.wire import Message, make_header
from cgpu_kernel.exceptions import (
    ColabAuthError,
    ColabDeniedError,
    ColabError,
    ColabNotEntitledError,
    ColabQuotaError,
    ColabTooManyRuntimesError,
    ColabUnavailableError,
    ConfigurationError,
)
from cgpu_kernel.proxy.kernel import ProxyKernelRun
from cgpu_kernel.proxy.options import ProxyKernel

from .colab_double import COLAB_REQUEST_HELPER, ColabDouble
from .conftest import RemoteServer, collect_iopub, install_spec, run_cell, start_kernel, stdout_of

ACCESS_TOKEN = "ya29.test-access-token-" + "x" * 20
WAIT = 60.0


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colab_server(jupyter_server: RemoteServer) -> Iterator[ColabDouble]:
    double = ColabDouble(jupyter_server.url, jupyter_server.token, access_token=ACCESS_TOKEN)
    double.start()
    yield double
    double.stop()


@pytest.fixture
def colab(colab_server: ColabDouble, jupyter_server: RemoteServer) -> Iterator[ColabDouble]:
    colab_server.reset()
    colab_server.proxy_token_ttl = 3600.0
    before = jupyter_server.kernel_ids()
    yield colab_server
    for kernel_id in jupyter_server.kernel_ids() - before:  # a failed test leaves no kernel
        jupyter_server.api("DELETE", f"api/kernels/{kernel_id}")


def make_backend(double: ColabDouble, **options: Any) -> ColabBackend:
    options.setdefault("notebook_key", f"test-{time.monotonic_ns()}")
    options.setdefault("auth_poll_interval", 0.2)
    return ColabBackend(auth.StaticAccessToken(ACCESS_TOKEN), colab_url=double.url, **options)


def run(coroutine: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, 120))


async def eventually(check: Callable[[], bool], timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


# --- assignment ---------------------------------------------------------------------------------


def test_notebook_hash_shape() -> None:
    nbh = notebook_hash("some notebook")
    assert len(nbh) == 44 and "-" not in nbh and nbh.endswith(".")
    assert nbh == notebook_hash("some notebook") != notebook_hash("another")
    assert notebook_hash(None) != notebook_hash(None)


def test_urls_need_tls_and_no_credentials() -> None:
    assert check_service_url("http://127.0.0.1:8/x", "Colab") == "http://127.0.0.1:8/x/"
    for bad in ("http://colab.example.com/", "https://user:pw@colab.example.com/", "ftp://x/"):
        with pytest.raises(ConfigurationError):
            check_service_url(bad, "Colab")
    token = "secret-proxy-token"
    info = {"url": "http://runtime.example.com/", "token": token, "tokenExpiresInSeconds": 5}
    with pytest.raises(ConfigurationError):
        RuntimeProxy.parse(info, "https://colab.research.google.com/")
    info["url"] = "https://runtime.example.com/tun/m/x"
    proxy = RuntimeProxy.parse(info, "https://colab.research.google.com/")
    assert proxy is not None and proxy.url.endswith("/tun/m/x/") and proxy.lifetime == 5
    assert token not in repr(proxy)
    assert parse_json(b')]}\'\n{"a": 1}', "x") == {"a": 1}


def test_assign_fresh_then_reuse_and_release_with_the_last_kernel(
    colab: ColabDouble, jupyter_server: RemoteServer
) -> None:
    async def scenario() -> None:
        first = make_backend(colab, notebook_key="shared notebook")
        second = make_backend(colab, notebook_key="shared notebook")
        try:
            kernel_a = await first.start_kernel()
            assert first.assignment is not None and not first.assignment.reused
            assert len(colab.runtimes) == 1
            assert ("POST", "/tun/m/assign") in colab.calls  # the XSRF two-step

            kernel_b = await second.start_kernel()
            assert second.assignment is not None and second.assignment.reused
            assert second.assignment.endpoint == first.assignment.endpoint
            assert len(colab.runtimes) == 1, "a second runtime was paid for"
            assert {kernel_a, kernel_b} <= jupyter_server.kernel_ids()
            endpoint = second.assignment.endpoint

            await first.shutdown_kernel()
            assert kernel_a not in jupyter_server.kernel_ids()
            assert colab.released == [], "released while another kernel still used it"
            await second.shutdown_kernel()
            assert colab.released == [endpoint]
            await second.shutdown_kernel()  # safe twice
            assert colab.released == [endpoint]
        finally:
            await first.close()
            await second.close()

    run(scenario())


def test_every_call_carries_colab_headers(colab: ColabDouble) -> None:
    async def scenario() -> None:
        backend = make_backend(colab)
        try:
            await backend.start_kernel()
            request = backend.websocket_request("session-1")
            proxy = backend.assignment.proxy if backend.assignment else None
            assert proxy is not None
            assert request.headers["X-Colab-Runtime-Proxy-Token"] == proxy.token
            assert request.headers["X-Colab-Client-Agent"] == "cgpu-kernel"
            assert proxy.token not in request.url  # headers only, never the URL
            assert request.url.startswith(f"ws://127.0.0.1:{colab.port}/runtime/")
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario())
    assert all(h.get("Accept") == "application/json" for h in colab.seen_headers)


@pytest.mark.parametrize(
    ("setup", "error", "advice"),
    [
        (lambda d: setattr(d, "outcome", 1), ColabQuotaError, "no quota"),
        (lambda d: setattr(d, "outcome", 2), ColabQuotaError, "--option gpu-fallback=T4"),
        (lambda d: setattr(d, "outcome", 5), ColabDeniedError, "denied"),
        (lambda d: setattr(d, "assign_status", 412), ColabTooManyRuntimesError, "release"),
        (lambda d: d.unavailable.add("T4"), ColabUnavailableError, "Try again"),
        (lambda d: d.access_tokens.clear(), ColabAuthError, "auth login"),
    ],
    ids=["outcome-1", "outcome-2", "denied", "412-too-many", "503-unavailable", "auth"],
)
def test_assignment_errors_say_what_to_do(
    colab: ColabDouble, setup: Callable[[ColabDouble], None], error: type[Exception], advice: str
) -> None:
    saved = set(colab.access_tokens)
    setup(colab)
    backend = make_backend(colab)
    try:
        with pytest.raises(error, match=re.escape(advice)):
            run(backend.start_kernel())
    finally:
        colab.access_tokens |= saved
        run(backend.close())
    assert colab.runtimes == {}


def test_fallback_only_when_the_user_allowed_it(colab: ColabDouble) -> None:
    colab.unavailable.add("A100")
    strict = make_backend(colab, gpu="a100")
    with pytest.raises(ColabUnavailableError):
        run(strict.start_kernel())
    run(strict.close())
    assert colab.runtimes == {}

    async def scenario() -> None:
        lenient = make_backend(colab, gpu="A100", fallback=["L4", "T4"])
        try:
            await lenient.start_kernel()
            assert lenient.assignment is not None
            # L4 comes on one (high-memory) machine: asked for with no shape (VSC buildAssignUrl)
            assert lenient.assignment.accelerator == "L4"
            assert lenient.assignment.machine_shape == "1"
            assert "shape" not in colab.assign_queries[-1]
        finally:
            await lenient.shutdown_kernel()
            await lenient.close()

    run(scenario())


def test_cpu_runtime_and_bad_accelerator_names(colab: ColabDouble) -> None:
    with pytest.raises(ConfigurationError, match="accelerator"):
        make_backend(colab, gpu="T4&shape=x")

    async def scenario() -> None:
        backend = make_backend(colab, gpu="none")
        try:
            await backend.start_kernel()
            assert backend.assignment is not None
            assert backend.assignment.accelerator == "NONE"
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario())


# --- keep-alive and idleness --------------------------------------------------------------------


def _status(state: str, parent_type: str = "execute_request") -> Message:
    parent = make_header(parent_type, "frontend")
    return Message.build(
        "iopub", make_header("status", "kernel"), parent, content={"execution_state": state}
    )


def test_keep_alive_is_sent_and_stops_when_idle(
    colab: ColabDouble, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)

    async def scenario() -> None:
        backend = make_backend(colab, keep_alive_interval=0.1, idle_timeout=1.0)
        try:
            await backend.start_kernel()
            assert backend.assignment is not None
            endpoint = backend.assignment.endpoint
            await eventually(lambda: colab.keep_alives[endpoint] >= 3)
            await eventually(lambda: backend.keep_alive_paused)
            # announced once before it stopped (colab-vscode keep-alive.ts warns first)
            warnings = [r.getMessage() for r in caplog.records if "stops in" in r.getMessage()]
            assert len(warnings) == 1 and "idle-timeout" in warnings[0], warnings
            stopped_at = colab.keep_alives[endpoint]
            await asyncio.sleep(0.5)
            assert colab.keep_alives[endpoint] == stopped_at, "keep-alive went on while idle"

            # a running cell (busy, seen by observe) is activity: keep-alive resumes
            assert not backend.intercepts(_status("busy"))
            assert backend.keep_alive_paused, "intercepts is a predicate: it changes nothing"
            backend.observe(_status("busy"))
            await eventually(lambda: colab.keep_alives[endpoint] > stopped_at)
            assert backend.idle_for() == 0.0
            assert not backend.keep_alive_paused
            # a long, silent cell keeps the runtime alive past the idle window
            resumed_at = colab.keep_alives[endpoint]
            await eventually(lambda: colab.keep_alives[endpoint] >= resumed_at + 15)
            assert not backend.keep_alive_paused
            # kernel_info traffic is not use; idle after the cell is
            backend.observe(_status("idle", "kernel_info_request"))
            assert backend.idle_for() == 0.0
            backend.observe(_status("idle"))
            await eventually(lambda: backend.keep_alive_paused)
            backend.note_activity()  # the proxy saw an execute_request
            await eventually(lambda: not backend.keep_alive_paused)
        finally:
            await backend.shutdown_kernel()
            await backend.close()
        sent = colab.keep_alives[endpoint]
        await asyncio.sleep(0.3)
        assert colab.keep_alives[endpoint] == sent, "keep-alive outlived the kernel"

    run(scenario())


# --- proxy tokens -------------------------------------------------------------------------------


def test_expired_proxy_token_is_not_a_dead_runtime(colab: ColabDouble) -> None:
    async def scenario() -> None:
        backend = make_backend(colab, token_refresh_margin=0)
        try:
            kernel_id = await backend.start_kernel()
            for status in (404, 401):
                colab.expired_status = status
                colab.expire_proxy_tokens()
                assert await backend.kernel_health() is KernelHealth.ALIVE
                assert await backend.start_kernel() == kernel_id  # same kernel, not a new one
                colab.expire_proxy_tokens()
                await backend.interrupt_kernel()  # retried with a fresh token
                colab.expire_proxy_tokens()
                assert await backend.reauthenticate()
            assert colab.refused_proxy_calls >= 4

            # now the runtime really goes (Colab reclaimed it): GONE, and a fresh one next time
            colab.runtimes.clear()
            assert await backend.kernel_health() is KernelHealth.GONE
            await backend.start_kernel()
            assert len(colab.runtimes) == 1
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario())


def test_proxy_token_renewed_ahead_of_expiry(colab: ColabDouble) -> None:
    colab.proxy_token_ttl = 1.0
    colab.list_proxy_info = False  # renewals come from tun/m/runtime-proxy-token

    async def scenario() -> None:
        backend = make_backend(colab)
        try:
            await backend.start_kernel()
            assert backend.assignment is not None and backend.assignment.proxy is not None
            first = backend.assignment.proxy.token
            await eventually(
                lambda: (
                    backend.assignment is not None
                    and backend.assignment.proxy is not None
                    and backend.assignment.proxy.token != first
                )
            )
            await asyncio.sleep(1.5)  # longer than a token lives: renewed, calls still work
            refused = colab.refused_proxy_calls
            assert await backend.kernel_health() is KernelHealth.ALIVE
            assert colab.refused_proxy_calls == refused
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario())
    assert ("GET", "/tun/m/runtime-proxy-token") in colab.calls


# --- the proxy in a thread ------------------------------------------------------------------------


class ThreadedProxy(ProxyKernelRun):
    def _install_signal_handlers(self) -> None:  # signals belong to the main thread
        return None


@contextmanager
def proxy_kernel(backend: ColabBackend, tmp_path: Path) -> Iterator[BlockingKernelClient]:
    """The real proxy kernel (proxy.kernel) with ``backend``, in a thread; a real client."""
    path, _ = write_connection_file(
        str(tmp_path / "kernel.json"), ip="127.0.0.1", key=os.urandom(16).hex().encode()
    )
    info = json.loads(Path(path).read_text())
    options = ProxyKernel(use_env=False)
    options.startup_timeout = 120.0
    started = threading.Event()
    holder: dict[str, Any] = {}

    def serve() -> None:
        async def main() -> None:
            proxy = ThreadedProxy(options, info, backend)
            holder["proxy"], holder["loop"] = proxy, asyncio.get_running_loop()
            started.set()
            await proxy.run()

        asyncio.run(main())

    thread = threading.Thread(target=serve, name="proxy-kernel", daemon=True)
    thread.start()
    assert started.wait(30)
    kc = BlockingKernelClient()
    kc.load_connection_info(info)
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        yield kc
    finally:
        kc.stop_channels()
        holder["loop"].call_soon_threadsafe(holder["proxy"].stop)
        thread.join(60)
        assert not thread.is_alive()


def test_token_expiring_mid_cell_loses_no_output(
    colab: ColabDouble, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    colab.proxy_token_ttl = 2.0
    colab.close_websockets_on_expiry = True
    backend = make_backend(colab)
    code = "import time\nfor i in range(40):\n    print('line', i, flush=True)\n    time.sleep(0.1)"
    with proxy_kernel(backend, tmp_path) as kc:
        closed_before = colab.websockets_closed_on_expiry
        reply, outputs = run_cell(kc, code, timeout=120)
        assert reply["content"]["status"] == "ok"
        assert stdout_of(outputs) == "".join(f"line {i}\n" for i in range(40))
        assert colab.websockets_closed_on_expiry > closed_before, "no expiry during the cell"
        _, outputs = run_cell(kc, "print('after', i)", timeout=120)
        assert stdout_of(outputs) == "after 39\n"
    assert len(colab.released) == 1
    assert_no_secrets(colab, caplog.text)


def assert_no_secrets(double: ColabDouble, text: str) -> None:
    secrets = {ACCESS_TOKEN, double.jupyter_token, *double.proxy_tokens, *double.xsrf}
    assert text
    leaked = [s for s in secrets if s and s in text]
    assert not leaked, "a token reached the log"


# --- colab_request ------------------------------------------------------------------------------


async def _run_on_kernel(backend: ColabBackend, code: str) -> tuple[list[Message], list[str]]:
    """Execute ``code`` over the channels WebSocket (legacy JSON frames, as the double speaks),
    answering colab_requests the way the relay has the backend answer them."""
    await backend.start_kernel()
    session = "test-session"
    target = backend.websocket_request(session)
    ws = await websocket_connect(HTTPRequest(target.url, headers=dict(target.headers)))

    def send(msg: Message) -> None:
        frame = {
            "channel": msg.channel,
            "header": msg.header,
            "parent_header": msg.parent_header,
            "metadata": msg.metadata,
            "content": msg.content,
        }
        ws.write_message(json.dumps(frame))

    request = Message.build(
        "shell",
        make_header("execute_request", session),
        content={"code": code, "silent": False, "allow_stdin": True, "store_history": False},
    )
    notices: list[str] = []
    outputs: list[Message] = []
    send(request)
    try:
        while True:
            frame = await asyncio.wait_for(ws.read_message(), WAIT)
            assert isinstance(frame, str)
            data = json.loads(frame)
            parts = [data[key] for key in ("header", "parent_header", "metadata", "content")]
            msg = Message.build(data["channel"], *parts)
            backend.observe(msg)
            if backend.intercepts(msg):

                def notify(text: str, *, link: str | None = None) -> None:
                    notices.append(text if link is None else f"{text} {link}")

                content = await backend.answer_kernel_request(msg, notify)
                if content is None:  # fire-and-forget: no answer
                    continue
                send(
                    Message.build(
                        "stdin", make_header("input_reply", session), msg.header, content=content
                    )
                )
                continue
            if msg.parent_id != request.msg_id or msg.channel != "iopub":
                continue
            outputs.append(msg)
            if msg.msg_type == "status" and msg.content.get("execution_state") == "idle":
                return outputs, notices
    finally:
        ws.close()


def _text(outputs: list[Message]) -> str:
    return "".join(m.content.get("text", "") for m in outputs if m.msg_type == "stream")


def _errors(outputs: list[Message]) -> list[str]:
    return [m.content["evalue"] for m in outputs if m.msg_type == "error"]


def call_code(request_type: str, body: dict[str, Any]) -> str:
    """Code that sends one colab_request from the remote kernel and prints the reply's data."""
    return COLAB_REQUEST_HELPER + f"\nprint('reply:', colab_request({request_type!r}, {body!r}))"


def test_colab_request_authorized(colab: ColabDouble) -> None:
    async def scenario() -> None:
        backend = make_backend(colab)
        try:
            outputs, notices = await _run_on_kernel(
                backend, call_code("request_auth", {"authType": "dfs_ephemeral"})
            )
            assert _errors(outputs) == []
            assert _text(outputs) == "reply: None\n"
            assert notices == []
            assert backend.assignment is not None
            assert colab.propagated == [(backend.assignment.endpoint, "dfs_ephemeral")]
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario())


@pytest.mark.parametrize(
    ("request_type", "request_body", "mode", "expected"),
    [
        ("request_auth", {"authType": "dfs_ephemeral"}, "error", "could not pass"),
        ("request_auth", {"authType": "mystery"}, "authorized", "cannot answer"),
        ("get_ipython_history", {}, "authorized", "cannot answer"),
    ],
    ids=["propagation-fails", "unknown-auth-type", "unknown-request"],
)
def test_colab_request_errors_reach_the_cell(
    colab: ColabDouble, request_type: str, request_body: dict[str, Any], mode: str, expected: str
) -> None:
    colab.credentials_mode = mode

    async def scenario() -> None:
        backend = make_backend(colab)
        try:
            outputs, notices = await _run_on_kernel(backend, call_code(request_type, request_body))
            (error,) = _errors(outputs)
            assert expected in error  # raised as colabtools' MessageError in the cell
            assert [n for n in notices if expected in n], "no notice in the cell"
            assert colab.propagated == []
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario())


def test_colab_request_needing_the_user_shows_the_url_in_the_cell(
    colab: ColabDouble, tmp_path: Path
) -> None:
    """auth.authenticate_user() as colabtools sends it (iopub, session-only parent): the
    consent link reaches the running cell as HTML and text, the cell goes on once the user
    consented, with one real propagation (colab-vscode ephemeral.ts)."""
    colab.credentials_mode = "needs_user"
    backend = make_backend(colab, auth_wait=120.0)
    code = COLAB_REQUEST_HELPER + "\nprint('reply:', authenticate_user_request())"
    with proxy_kernel(backend, tmp_path) as kc:
        msg_id = kc.execute(code)
        shown = wait_for_consent_link(kc, msg_id)
        assert colab.propagated == []
        with urllib.request.urlopen(shown, timeout=10) as response:  # the user opens it
            assert response.status == 200
        outputs = collect_iopub(kc, msg_id, timeout=WAIT)
        assert "reply: None" in stdout_of(outputs)
        texts = "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")
        assert "access to your Google account granted" in texts
    assert [auth_type for _, auth_type in colab.propagated] == ["auth_user_ephemeral"]
    assert [dry for _, dry in colab.propagation_calls].count(False) == 1, "one real run"


def wait_for_consent_link(kc: BlockingKernelClient, msg_id: str, within: float = 15.0) -> str:
    """The consent URL shown in the cell ``msg_id`` as a display_data (a link in HTML, the URL
    in text/plain), within ``within`` seconds of the request."""
    deadline = time.monotonic() + within
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id or msg["msg_type"] != "display_data":
            continue
        data = msg["content"]["data"]
        found = re.search(r'href="(http://127\.0\.0\.1:\d+/consent/[^"]+)"', data["text/html"])
        assert found, data
        url = found.group(1)
        assert url in data["text/plain"]
        return url


def test_colab_request_times_out_with_a_clear_error(colab: ColabDouble) -> None:
    colab.credentials_mode = "needs_user"

    async def scenario() -> None:
        backend = make_backend(colab, auth_wait=0.5)
        try:
            outputs, notices = await _run_on_kernel(
                backend, call_code("request_auth", {"authType": "dfs_ephemeral"})
            )
            assert any("/consent/" in n for n in notices)
            (error,) = _errors(outputs)
            assert "not granted within" in error
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario())


# --- release ------------------------------------------------------------------------------------


def test_release_on_shutdown_not_on_restart_nor_when_kept(
    colab: ColabDouble, jupyter_server: RemoteServer
) -> None:
    async def scenario() -> None:
        restarting = make_backend(colab, notebook_key="restarted notebook")
        kernel_id = await restarting.start_kernel()
        endpoint = restarting.assignment.endpoint if restarting.assignment else ""
        await restarting.shutdown_kernel(restart=True)
        await restarting.shutdown_kernel()  # the proxy's exit cleanup after a restart
        await restarting.close()
        assert kernel_id not in jupyter_server.kernel_ids()  # a restart means a fresh kernel
        assert colab.released == [] and endpoint in colab.runtimes

        # the restarted proxy (a new process, same notebook) finds the same runtime
        again = make_backend(colab, notebook_key="restarted notebook")
        await again.start_kernel()
        assert again.assignment is not None and again.assignment.reused
        assert again.assignment.endpoint == endpoint
        await again.shutdown_kernel()
        await again.close()
        assert colab.released == [endpoint]

        kept = make_backend(colab, keep_runtime=True)
        await kept.start_kernel()
        await kept.shutdown_kernel()
        await kept.close()
        assert len(colab.runtimes) == 1 and colab.released == [endpoint]

    run(scenario())


# --- auth ---------------------------------------------------------------------------------------


def test_credential_store_is_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    old_umask = os.umask(0o022)
    try:
        path = auth.save_store({"type": "adc"}, tmp_path / "store" / "google.json")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert auth.load_store(path) == {"type": "adc"}
    path.chmod(0o644)
    with pytest.raises(ConfigurationError, match="chmod 600"):
        auth.load_store(path)
    assert auth.logout(path) and not path.exists() and not auth.logout(path)

    monkeypatch.delenv(auth.ACCESS_TOKEN_ENV, raising=False)
    with pytest.raises(ConfigurationError, match="auth login"):
        auth.load_tokens(path)
    monkeypatch.setenv(auth.ACCESS_TOKEN_ENV, ACCESS_TOKEN)
    tokens = auth.load_tokens(path)
    assert run(tokens.access_token()) == ACCESS_TOKEN
    assert ACCESS_TOKEN not in repr(tokens)
    with pytest.raises(ColabAuthError, match=auth.ACCESS_TOKEN_ENV):
        run(tokens.access_token(refresh=True))
    assert ACCESS_TOKEN not in json.dumps(auth.status(path))


def test_stored_sign_in_renews_its_access_token(
    colab: ColabDouble, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(auth.ACCESS_TOKEN_ENV, raising=False)
    refresh_token = "1//test-refresh-token-" + "y" * 20
    colab.refresh_tokens.add(refresh_token)
    path = auth.save_store(
        {
            "type": "authorized_user",
            "client_id": "1234-test.apps.googleusercontent.com",
            "client_secret": "test-client-secret",
            "refresh_token": refresh_token,
        },
        tmp_path / "google.json",
    )
    status = auth.status(path)
    assert status["source"] == "stored" and refresh_token not in json.dumps(status)
    stored = auth.load_tokens(path)
    assert isinstance(stored, auth.GoogleCredentialsTokens)
    # google-auth pins a stored sign-in's token endpoint to Google's own; aim it at the double
    credentials = stored.credentials.with_token_uri(f"{colab.url}token")
    tokens = auth.GoogleCredentialsTokens(credentials, "the stored sign-in")

    async def scenario() -> None:
        backend = ColabBackend(tokens, colab_url=colab.url, notebook_key="stored sign-in")
        try:
            await backend.start_kernel()
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario())
    assert colab.token_refreshes == 1
    assert len(colab.released) == 1


def test_login_with_your_own_oauth_client(
    colab: ColabDouble,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The installed-app flow end to end, with Google's consent page and token endpoint
    stood in by the double (the real ones need a browser and an account)."""
    import webbrowser

    monkeypatch.delenv(auth.ACCESS_TOKEN_ENV, raising=False)
    monkeypatch.setenv("OAUTHLIB_INSECURE_TRANSPORT", "1")  # the stand-ins speak plain http
    client = {
        "installed": {
            "client_id": "1234-test.apps.googleusercontent.com",
            "client_secret": "test-client-secret",
            "auth_uri": f"{colab.url}o/oauth2/auth",
            "token_uri": f"{colab.url}token",
            "redirect_uris": ["http://localhost"],
        }
    }
    secrets_file = tmp_path / "client_secret.json"
    secrets_file.write_text(json.dumps(client))

    class Browser:  # the user's browser: follows the consent redirect to the loopback port
        def open(self, url: str, new: int = 0, autoraise: bool = True) -> bool:
            threading.Thread(target=lambda: urllib.request.urlopen(url, timeout=30).read()).start()
            return True

    monkeypatch.setattr(webbrowser, "get", lambda using=None: Browser())
    store = tmp_path / "store" / "google.json"
    assert auth.login(str(secrets_file), path=store, timeout=60) == store
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    data = json.loads(store.read_text())
    assert data["type"] == "authorized_user" and data["refresh_token"] in colab.refresh_tokens
    assert "token" not in data  # the access token is not stored
    assert "OAUTHLIB_RELAX_TOKEN_SCOPE" not in os.environ
    printed = capsys.readouterr().out
    assert data["refresh_token"] not in printed
    tokens = auth.load_tokens(store)
    assert isinstance(tokens, auth.GoogleCredentialsTokens)
    with pytest.raises(ConfigurationError, match="Desktop app"):
        auth.login(str(tmp_path / "missing.json"), path=store)


# --- CLI ----------------------------------------------------------------------------------------


def test_cli_status_and_release(
    colab: ColabDouble, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cgpu_kernel.cli import build_parser

    monkeypatch.setenv(auth.ACCESS_TOKEN_ENV, ACCESS_TOKEN)
    parser = build_parser()

    def cli(*argv: str) -> tuple[int, str]:
        args = parser.parse_args(list(argv))
        code = args.func(args)
        return code, capsys.readouterr().out

    assert cli("status", "--colab", "--colab-url", colab.url) == (
        0,
        "No Colab runtimes are assigned to this account.\n",
    )
    backend = make_backend(colab)
    run(backend.start_kernel())
    assert backend.assignment is not None
    endpoint = backend.assignment.endpoint
    try:
        code, out = cli("status", "--colab", "--colab-url", colab.url)
        assert code == 0 and endpoint in out and "T4" in out and "1.0/15.0 GiB" in out
        code, out = cli("status", "--colab", "--colab-url", colab.url, "--json")
        (row,) = json.loads(out)
        assert row["kernels"] == 1 and row["idle"] != "?"
        code, out = cli("auth", "status", "--colab-url", colab.url)
        assert code == 0 and ACCESS_TOKEN not in out
        assert "did not say this account's tier (HTTP 403" in out
        colab.user_info = PRO_USER_INFO
        code, out = cli("auth", "status", "--colab-url", colab.url)
        assert code == 0 and "has Colab Pro and may ask for T4, L4, V5E1" in out
        assert cli("release", "--colab-url", colab.url, endpoint) == (0, f"{endpoint}: released\n")
        assert colab.released == [endpoint]
    finally:
        run(backend.shutdown_kernel())
        run(backend.close())


# --- the kernelspec (`--backend colab`), once proxy and kernelspec offer it ------------------

needs_wiring = pytest.mark.skipif(
    "colab" not in kernelspec.BACKENDS,
    reason="the colab backend is not offered by kernelspec",
)


@pytest.fixture
def colab_spec(
    colab: ColabDouble, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    monkeypatch.setenv(auth.ACCESS_TOKEN_ENV, ACCESS_TOKEN)
    yield install_spec(
        kernel_dir,
        "cgpu-test-colab",
        "colab",
        extra=[
            f"--ProxyKernel.colab_url={colab.url}",
            "--ProxyKernel.gpu=T4",
            "--ProxyKernel.keep_alive_interval=1",
            "--log-level=DEBUG",
        ],
    )


@needs_wiring
def test_kernelspec_restart_keeps_the_runtime_shutdown_releases_it(
    colab: ColabDouble, colab_spec: str, capfd: pytest.CaptureFixture[str]
) -> None:
    km, kc = start_kernel(colab_spec)
    try:
        _, outputs = run_cell(kc, "x = 41\nprint('ok')", timeout=120)
        assert stdout_of(outputs) == "ok\n"
        (endpoint,) = colab.runtimes
        km.restart_kernel()
        kc.wait_for_ready(timeout=120)
        _, outputs = run_cell(kc, "print('x' in dir())", timeout=120)
        assert stdout_of(outputs) == "False\n"  # a fresh kernel...
        assert list(colab.runtimes) == [endpoint] and colab.released == []  # ...same runtime
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    deadline = time.monotonic() + WAIT
    while colab.released != [endpoint] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert colab.released == [endpoint]
    kernel_log = capfd.readouterr().err  # both proxy processes, at DEBUG
    assert "keeping the Colab runtime" in kernel_log and "released the Colab runtime" in kernel_log
    assert_no_secrets(colab, kernel_log)


@needs_wiring
def test_nbclient_runs_the_quickstart_through_colab(colab: ColabDouble, colab_spec: str) -> None:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(kernelspec.resource_dir("examples") / "quickstart.ipynb", as_version=4)
    NotebookClient(nb, kernel_name=colab_spec, timeout=120, startup_timeout=120).execute()
    text = "".join(
        o.get("text", "") for cell in nb.cells for o in cell.get("outputs", []) if "text" in o
    )
    assert "Hello from the remote kernel" in text
    assert "squares still here: [49, 64, 81]" in text
    assert len(colab.released) == 1


# --- issue 14: Colab as Google's own clients speak it ------------------------------------------


def test_relay_gives_a_session_only_request_to_the_running_cell() -> None:
    """colabtools' request_auth has parent ``{session}`` only (CT ``_message.py``): the relay
    attributes it to the oldest unanswered execute_request of that session."""
    from cgpu_kernel.core.actions import AnswerRemoteRequest
    from cgpu_kernel.core.relay import Relay

    relay = Relay("proxy", intercept=lambda msg: msg.msg_type == "colab_request")
    relay.remote_connected()
    cells = []
    for session in ("other-frontend", "frontend", "frontend"):
        cell = Message.build(
            "shell", make_header("execute_request", session), content={"code": "x"}
        )
        relay.frontend_message("shell", (b"id",), cell)
        cells.append(cell)

    def asked(parent: dict[str, Any]) -> Message | None:
        request = Message.build(
            "iopub",
            make_header("colab_request", "kernel"),
            parent,
            {"colab_request_type": "request_auth", "colab_msg_id": 1},
            {"request": {"authType": "dfs_ephemeral"}},
        )
        (action,) = relay.remote_message(request)
        assert isinstance(action, AnswerRemoteRequest)
        return action.request.msg if action.request is not None else None

    assert asked({"session": "frontend"}) is cells[1]
    assert asked({"session": "unknown"}) is cells[0]  # no cell of that session: the running one
    assert asked(cells[2].header) is cells[2]  # a full parent: by id
    assert asked({}) is cells[0]


def test_no_shape_for_l4_and_tpus_and_a_pinned_runtime_version(colab: ColabDouble) -> None:
    """VSC ``buildAssignUrl``: ``shape=hm`` only for two-shape accelerators; the double refuses
    it for L4/TPUs. ``runtime_version_label`` goes with every assign call when pinned."""

    async def scenario() -> None:
        for gpu, variant in (("L4", "GPU"), ("V5E1", "TPU"), ("v6e1", "TPU")):
            backend = make_backend(colab, gpu=gpu, high_memory=True, runtime_version="2025.07")
            try:
                await backend.start_kernel()
                query = colab.assign_queries[-1]
                assert "shape" not in query and query["variant"] == variant
                assert query["accelerator"] == gpu.upper()
                assert query["runtime_version_label"] == "2025.07"
            finally:
                await backend.shutdown_kernel()
                await backend.close()
        backend = make_backend(colab, gpu="A100", high_memory=True)
        try:
            await backend.start_kernel()
            assert colab.assign_queries[-1]["shape"] == "hm"
            assert "runtime_version_label" not in colab.assign_queries[-1]
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario())


@pytest.mark.parametrize(
    ("setup", "error", "words"),
    [
        (lambda d: d.not_entitled.add("A100"), ColabNotEntitledError, "entitlement"),
        (lambda d: d.usage_limited.add("A100"), ColabTooManyRuntimesError, "usage limit"),
    ],
    ids=["400-not-entitled", "412-usage-limit"],
)
def test_400_and_412_have_their_meanings_and_fall_back(
    colab: ColabDouble, setup: Callable[[ColabDouble], None], error: type[Exception], words: str
) -> None:
    setup(colab)
    strict = make_backend(colab, gpu="A100")
    with pytest.raises(error) as refused:
        run(strict.start_kernel())
    run(strict.close())
    message = str(refused.value)
    assert words in message and "--option gpu-fallback=T4" in message
    assert "--gpu-fallback" not in message  # `cgpu-kernel install` has no such flag
    assert colab.runtimes == {}

    async def scenario() -> None:
        lenient = make_backend(colab, gpu="A100", fallback=["none"])
        try:
            await lenient.start_kernel()
            assert lenient.assignment is not None and lenient.assignment.accelerator == "NONE"
        finally:
            await lenient.shutdown_kernel()
            await lenient.close()

    run(scenario())


PRO_USER_INFO = {
    # VSC ``api.ts`` ``UserInfoSchema``: enum names on Google's API host
    "subscriptionTier": "SUBSCRIPTION_TIER_PRO",
    "paidComputeUnitsBalance": 87.5,
    "eligibleAccelerators": [
        {"variant": "VARIANT_GPU", "models": ["t4", "L4"]},
        {"variant": "VARIANT_TPU", "models": ["V5E1"]},
    ],
    "ineligibleAccelerators": [{"variant": "VARIANT_GPU", "models": ["H100"]}],
}


def test_a_refusal_says_what_the_account_may_ask_for_when_colab_tells(
    colab: ColabDouble,
) -> None:
    """colab-vscode asks ``v1/user-info`` for the tier and the eligible accelerators; a refusal
    carries them. The host may refuse our token (the double's default, per CLI AGENTS.md):
    then the refusal is the same, without the sentence, and nothing fails because of it."""
    colab.not_entitled.add("H100")
    for info, expected in ((PRO_USER_INFO, True), (None, False)):
        colab.user_info = info
        backend = make_backend(colab, gpu="H100")
        with pytest.raises(ColabNotEntitledError) as refused:
            run(backend.start_kernel())
        run(backend.close())
        message = str(refused.value)
        assert "entitlement" in message
        said = "Colab says this account has Colab Pro and may ask for T4, L4, V5E1 (not: H100)"
        assert (said in message) is expected, message
        assert ("87.5 paid compute units left" in message) is expected
        assert ("GET", "/v1/user-info") in colab.calls
    # asked on Google's API host, which takes no authuser (VSC ``issueRequest``)
    assert colab.user_info_queries and all("authuser" not in q for q in colab.user_info_queries)
    assert colab.runtimes == {}


def test_the_assignment_names_the_tier(
    colab: ColabDouble, caplog: pytest.LogCaptureFixture
) -> None:
    """``subTier`` in an assignment (VSC ``api.ts``: 1 Pro, 2 Pro+, else unknown), named in
    the kernel's log (``auth status`` tells users to look there)."""
    caplog.set_level(logging.INFO)
    colab.sub_tier = 2

    async def scenario() -> None:
        backend = make_backend(colab)
        try:
            await backend.start_kernel()
            assert backend.assignment is not None and backend.assignment.tier == "Colab Pro+"
            assert any("tier Colab Pro+" in r.getMessage() for r in caplog.records)
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario())


def test_proxy_tokens_come_from_the_dedicated_endpoint_never_the_listing(
    colab: ColabDouble,
) -> None:
    """The listing returns the token issued at assignment (old); refreshes use
    ``runtime-proxy-token`` with ``X-Colab-Tunnel: Google`` (the double 400s without it)."""
    colab.proxy_token_ttl = 1.0

    async def scenario() -> None:
        backend = make_backend(colab)
        try:
            await backend.start_kernel()
            assert backend.assignment is not None and backend.assignment.proxy is not None
            first = backend.assignment.proxy.token
            await eventually(lambda: colab.proxy_token_refreshes >= 3)
            listed = (await backend.api.assignments())[0]["runtimeProxyInfo"]["token"]
            assert listed == first, "the double's listing must keep the first token"
            assert backend.assignment.proxy.token != first
            refused = colab.refused_proxy_calls
            assert await backend.kernel_health() is KernelHealth.ALIVE
            assert colab.refused_proxy_calls == refused
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario())


def test_keep_alive_that_is_never_answered_keeps_its_cadence_quietly(
    colab: ColabDouble, caplog: pytest.LogCaptureFixture
) -> None:
    """CLI AGENTS.md (verified live): the runtime often never answers; a read time-out is a
    ping sent. Short timeout, no warning, cadence from each ping's start."""
    caplog.set_level(logging.DEBUG)

    async def scenario(answer_every: int) -> None:
        colab.keep_alive_answer_every = answer_every
        colab.keep_alive_times.clear()
        backend = make_backend(colab, keep_alive_interval=0.4, keep_alive_timeout=0.25)
        try:
            await backend.start_kernel()
            await eventually(lambda: backend.keep_alives_sent >= 6)
            times = colab.keep_alive_times[:6]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert max(gaps) < 0.4 + 0.2, gaps  # 0.4 s apart, not 0.4 + the 0.25 s wait
            assert backend.keepalive.unanswered >= (5 if answer_every == 0 else 2)
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario(0))
    run(scenario(2))
    alarming = [r for r in caplog.records if "keep-alive" in r.getMessage()]
    assert all(r.levelno < logging.WARNING for r in alarming), [r.getMessage() for r in alarming]


def test_client_agent_is_a_setting_and_a_refusal_names_it(
    colab: ColabDouble, monkeypatch: pytest.MonkeyPatch
) -> None:
    colab.allowed_agents = {"colab-cli"}  # the double's stand-in for a refused agent
    backend = make_backend(colab)
    with pytest.raises(ColabError) as refused:
        run(backend.start_kernel())
    run(backend.close())
    assert "colab-client-agent" in str(refused.value) and "CGPU_COLAB_CLIENT_AGENT" in str(
        refused.value
    )

    monkeypatch.setenv("CGPU_COLAB_CLIENT_AGENT", "colab-cli")
    options = ProxyKernel()
    assert options.colab_client_agent == "colab-cli"

    async def scenario() -> None:
        backend = make_backend(colab, client_agent=options.colab_client_agent)
        try:
            await backend.start_kernel()
            request = backend.websocket_request("s")
            assert request.headers["X-Colab-Client-Agent"] == "colab-cli"
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    run(scenario())
    assert colab.seen_headers[-1]["X-Colab-Client-Agent"] == "colab-cli"


# --- through the installed kernelspec ------------------------------------------------------------


def _define_helper(kc: BlockingKernelClient) -> None:
    reply, _ = run_cell(kc, COLAB_REQUEST_HELPER, timeout=120)
    assert reply["content"]["status"] == "ok"


@needs_wiring
def test_kernelspec_drive_mount_consent_reaches_the_running_cell(
    colab: ColabDouble, colab_spec: str
) -> None:
    """drive.mount()'s request as colabtools sends it: the consent link shows in the running
    cell within seconds, and the answer comes inside drive.mount's own 120 s."""
    colab.credentials_mode = "needs_user"
    km, kc = start_kernel(colab_spec)
    try:
        _define_helper(kc)
        asked = time.monotonic()
        msg_id = kc.execute("print('reply:', drive_mount_request())")
        url = wait_for_consent_link(kc, msg_id)
        assert time.monotonic() - asked < 15
        with urllib.request.urlopen(url, timeout=10) as response:  # the user consents
            assert response.status == 200
        outputs = collect_iopub(kc, msg_id, timeout=WAIT)
        assert time.monotonic() - asked < 100
        assert stdout_of(outputs) == "reply: None\n"
        assert [m for m in outputs if m["msg_type"] == "error"] == []
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert [auth_type for _, auth_type in colab.propagated] == ["dfs_ephemeral"]
    assert [dry for _, dry in colab.propagation_calls].count(False) == 1


@needs_wiring
def test_kernelspec_authenticate_user_when_already_authorized(
    colab: ColabDouble, colab_spec: str
) -> None:
    km, kc = start_kernel(colab_spec)
    try:
        _define_helper(kc)
        _, outputs = run_cell(kc, "print('reply:', authenticate_user_request())", timeout=120)
        assert stdout_of(outputs) == "reply: None\n"
        assert [m["msg_type"] for m in outputs if m["msg_type"] in ("stream", "display_data")] == [
            "stream"
        ]  # just the print: no notice
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert [dry for _, dry in colab.propagation_calls] == [True, False]


STRAY_STDIN = """
import time, zmq
time.sleep(1.0)
_kernel = get_ipython().kernel
_stray = []
while _kernel.stdin_socket.poll(0):
    _stray.append(_kernel.session.recv(_kernel.stdin_socket)[1])
print('stray:', len(_stray))
"""


@needs_wiring
def test_kernelspec_shell_command_leaves_a_clean_cell(colab: ColabDouble, colab_spec: str) -> None:
    """`!echo hi` traffic (CT ``_system_commands.py``): cell_display_stdin, cell_update_stdin,
    cell_remove_stdin without colab_msg_id get no reply and no notice."""
    km, kc = start_kernel(colab_spec)
    try:
        _define_helper(kc)
        reply, outputs = run_cell(kc, "shell_command('echo hi')" + STRAY_STDIN, timeout=120)
        assert reply["content"]["status"] == "ok"
        shown = [m for m in outputs if m["msg_type"] in ("stream", "display_data", "error")]
        assert [m["content"].get("text") for m in shown] == ["hi\n", "stray: 0\n"], shown
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


@needs_wiring
def test_kernelspec_two_hour_session_compressed(
    colab: ColabDouble, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proxy tokens live 2 s instead of an hour; 8 s of cells = several lifetimes, each renewed
    from the dedicated endpoint while the listing keeps the first token."""
    monkeypatch.setenv(auth.ACCESS_TOKEN_ENV, ACCESS_TOKEN)
    colab.proxy_token_ttl = 2.0
    colab.close_websockets_on_expiry = True
    name = install_spec(
        kernel_dir,
        "cgpu-test-colab-long",
        "colab",
        extra=[f"--ProxyKernel.colab_url={colab.url}", "--ProxyKernel.keep_alive_interval=1"],
    )
    km, kc = start_kernel(name)
    try:
        started = time.monotonic()
        count = 0
        while time.monotonic() - started < 8:
            reply, outputs = run_cell(kc, f"n = {count}\nprint(n * 2)", timeout=120)
            assert reply["content"]["status"] == "ok" and stdout_of(outputs) == f"{count * 2}\n"
            count += 1
            time.sleep(0.5)
        reply, outputs = run_cell(
            kc, "import time\nfor i in range(30):\n    print(i, flush=True)\n    time.sleep(0.1)"
        )
        assert stdout_of(outputs) == "".join(f"{i}\n" for i in range(30))
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert colab.proxy_token_refreshes >= 4
    assert sum(colab.keep_alives.values()) >= 5
    assert len(colab.released) == 1


@needs_wiring
def test_kernelspec_attaches_to_an_existing_runtime_and_leaves_it(
    colab: ColabDouble,
    kernel_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cgpu_kernel.cli import build_parser

    runtime = colab.add_runtime("T4")  # started in Colab in a browser
    monkeypatch.setenv(auth.ACCESS_TOKEN_ENV, ACCESS_TOKEN)
    args = build_parser().parse_args(["status", "--colab", "--colab-url", colab.url])
    assert args.func(args) == 0
    assert runtime.endpoint in capsys.readouterr().out
    name = install_spec(
        kernel_dir,
        "cgpu-test-colab-attach",
        "colab",
        extra=[
            f"--ProxyKernel.colab_url={colab.url}",
            f"--ProxyKernel.colab_endpoint={runtime.endpoint}",
        ],
    )
    calls_before = len(colab.calls)
    km, kc = start_kernel(name)
    try:
        _, outputs = run_cell(kc, "print('attached')", timeout=120)
        assert stdout_of(outputs) == "attached\n"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    time.sleep(1.0)
    assert list(colab.runtimes) == [runtime.endpoint] and colab.released == []
    assert ("POST", "/tun/m/assign") not in colab.calls[calls_before:], "it assigned one"


@needs_wiring
def test_kernelspec_idle_warning_reaches_the_frontend(
    colab: ColabDouble, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before keep-alive stops (colab-vscode ``keep-alive.ts`` asks the user first) the notice
    goes to the frontend once: in the output of the last cell sent, which frontends that show
    late output (``jupyter console``) display, with how to keep the runtime."""
    monkeypatch.setenv(auth.ACCESS_TOKEN_ENV, ACCESS_TOKEN)
    name = install_spec(
        kernel_dir,
        "cgpu-test-colab-idle",
        "colab",
        extra=[
            f"--ProxyKernel.colab_url={colab.url}",
            "--ProxyKernel.keep_alive_interval=0.5",
            "--ProxyKernel.idle_timeout=6",  # warned 1.5 s (a quarter) before it stops
        ],
    )
    km, kc = start_kernel(name)
    try:
        reply, _ = run_cell(kc, "print('in use')", timeout=120)
        cell = reply["parent_header"]["msg_id"]
        notices: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not notices:
            with contextlib.suppress(queue.Empty):
                msg = kc.get_iopub_msg(timeout=1)
                text = msg["content"].get("text", "")
                if msg["msg_type"] == "stream" and "keep-alive" in text:
                    notices.append(msg)
        assert notices, "the coming stop was never told to the frontend"
        (notice,) = notices
        assert notice["parent_header"]["msg_id"] == cell
        assert "stops in" in notice["content"]["text"]
        assert "--option idle-timeout=SECONDS" in notice["content"]["text"]
        # once per idle stretch: no second notice while it stays idle
        time.sleep(3)
        again = []
        while True:
            try:
                again.append(kc.get_iopub_msg(timeout=0.5))
            except queue.Empty:
                break
        assert not [m for m in again if "keep-alive" in m["content"].get("text", "")]
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
