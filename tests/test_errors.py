"""A remote that fails: each failure is a clear error in the cell, and the kernel stays up."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .conftest import (
    RemoteServer,
    free_port,
    install_remote_spec,
    install_spec,
    run_cell,
    start_kernel,
)


def error_of(name: str, code: str = "1 + 1") -> tuple[dict, bool]:
    km, kc = start_kernel(name)
    try:
        reply, outputs = run_cell(kc, code, timeout=60)
        errors = [m["content"] for m in outputs if m["msg_type"] == "error"]
        assert reply["content"]["status"] == "error"
        assert errors and errors[0]["evalue"] == reply["content"]["evalue"]
        return reply["content"], km.is_alive()
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_unreachable_remote(kernel_dir: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("some-secret-token")
    url = f"http://127.0.0.1:{free_port()}/lab/"
    name = install_spec(
        kernel_dir, "cgpu-test-unreachable", "jupyter", url=url, token_file=token_file
    )
    content, alive = error_of(name)
    assert alive
    assert content["ename"] == "RemoteUnreachable"
    assert "Could not reach the Jupyter server at http://127.0.0.1" in content["evalue"]
    assert "some-secret-token" not in content["evalue"]


def test_wrong_token(kernel_dir: Path, jupyter_server: RemoteServer, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("wrong-token")
    name = install_spec(
        kernel_dir, "cgpu-test-wrongtoken", "jupyter", url=jupyter_server.url, token_file=token_file
    )
    content, alive = error_of(name)
    assert alive
    assert content["ename"] == "RemoteAuthenticationFailed"
    assert "refused our credentials" in content["evalue"]
    assert "CGPU_TOKEN" in content["evalue"]
    assert "wrong-token" not in content["evalue"]


def test_unknown_remote_kernelspec(kernel_dir: Path, jupyter_server: RemoteServer) -> None:
    name = install_remote_spec(
        kernel_dir,
        "cgpu-test-nospec",
        jupyter_server,
        remote_kernel="no-such-kernel",
    )
    content, _ = error_of(name)
    assert content["ename"] == "RemoteKernelSpecNotFound"
    assert "no kernelspec named 'no-such-kernel'" in content["evalue"]
    assert "python3" in content["evalue"]  # says what is available


class _NotJupyter(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"<html>this is not a jupyter server</html>"
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def garbage_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotJupyter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def test_server_answering_garbage(kernel_dir: Path, garbage_server: str) -> None:
    name = install_spec(kernel_dir, "cgpu-test-garbage", "jupyter", url=garbage_server)
    content, alive = error_of(name)
    assert alive
    assert content["ename"] == "RemoteProtocolError"
    assert "not the JSON of a Jupyter server API" in content["evalue"]


def test_startup_deadline(kernel_dir: Path, silent_server: str) -> None:
    name = install_spec(
        kernel_dir,
        "cgpu-test-deadline",
        "jupyter",
        url=silent_server,
        extra=["--startup-timeout=3"],
    )
    content, alive = error_of(name)
    assert alive
    assert content["ename"] == "RemoteStartupTimeout"
    assert "not ready within 3 s" in content["evalue"]


def test_misconfigured_kernel_stays_up(kernel_dir: Path) -> None:
    """A jupyter kernelspec without a URL (say, hand-edited) explains itself in the cell."""
    from cgpu_kernel import kernelspec

    argv = [*kernelspec.make_argv("local")[:5], "--backend", "jupyter"]
    spec = kernelspec.make_kernel_dict(argv, "broken", backend="jupyter")
    kernelspec.write_kernel_spec(spec, kernel_dir / "kernels" / "cgpu-test-nourl")
    content, alive = error_of("cgpu-test-nourl")
    assert alive
    assert "needs the server's URL" in content["evalue"]


def test_kernel_recovers_when_remote_comes_back(kernel_dir: Path, tmp_path: Path) -> None:
    """First cell fails (no server yet); the server starts; the next cell runs."""
    from .conftest import start_jupyter_server

    port_holder = socket.socket()
    port_holder.bind(("127.0.0.1", 0))
    port = port_holder.getsockname()[1]
    port_holder.close()
    token_file = tmp_path / "token"
    token_file.write_text("tok")
    name = install_spec(
        kernel_dir,
        "cgpu-test-later",
        "jupyter",
        url=f"http://127.0.0.1:{port}/",
        token_file=token_file,
    )
    km, kc = start_kernel(name)
    server = None
    try:
        reply, _ = run_cell(kc, "1")
        assert reply["content"]["ename"] == "RemoteUnreachable"
        server = start_jupyter_server(tmp_path / "late", port=port, token="tok")
        reply, _outputs = run_cell(kc, "print('back')", timeout=60)
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
        if server is not None:
            server.stop()


def test_renewed_token_file_takes_effect_without_restart(
    kernel_dir: Path, jupyter_server: RemoteServer, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("expired-token")
    name = install_spec(
        kernel_dir, "cgpu-test-renew", "jupyter", url=jupyter_server.url, token_file=token_file
    )
    km, kc = start_kernel(name)
    try:
        reply, _ = run_cell(kc, "1")
        assert reply["content"]["ename"] == "RemoteAuthenticationFailed"
        token_file.write_text(jupyter_server.token)
        reply, _outputs = run_cell(kc, "print('renewed')")
        assert reply["content"]["status"] == "ok"
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_bad_environment_value_is_shown_in_the_cell(
    jupyter_spec: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CGPU_MAX_QUEUE", "lots")
    content, alive = error_of(jupyter_spec)
    assert alive
    assert content["ename"] == "CgpuConfigurationError"
    assert "CGPU_MAX_QUEUE='lots'" in content["evalue"]


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--ping-interval=often"], "'ping_interval' trait of a ProxyKernel instance expected"),
        (["--log-level=LOUD"], "'log_level' trait"),
        # (an option the proxy does not own is the kernel's: tests/test_kernel_options.py)
        (["--backend=nowhere"], "Error loading argument ProxyKernel.backend"),
    ],
)
def test_bad_kernel_command_line_is_shown_in_the_cell(
    kernel_dir: Path, extra: list[str], says: str
) -> None:
    """A hand-edited kernel.json: the kernel comes up and says what is wrong, instead of dying
    at launch (which frontends answer by restarting it in a loop)."""
    name = install_spec(kernel_dir, "cgpu-test-badargv", "jupyter", url="http://127.0.0.1:9")
    spec_file = kernel_dir / "kernels" / name / "kernel.json"
    spec = json.loads(spec_file.read_text())
    spec["argv"].extend(extra)
    spec_file.write_text(json.dumps(spec))
    content, alive = error_of(name)
    assert alive
    assert content["ename"] == "CgpuConfigurationError"
    assert says in content["evalue"] and "cgpu-kernel install" in content["evalue"]


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ("c.ProxyKernel.max_queue = 'lots'\n", "'max_queue' trait"),
        ("c.ProxyKernel.max_queue = (\n", "could not be loaded"),
    ],
)
def test_bad_config_file_is_shown_in_the_cell(
    kernel_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    config: str,
    says: str,
) -> None:
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "cgpu_kernel_config.py").write_text(config)
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(config_dir))
    name = install_spec(kernel_dir, "cgpu-test-badconfig", "jupyter", url="http://127.0.0.1:9")
    content, alive = error_of(name)
    assert alive
    assert says in content["evalue"]
    assert "cgpu_kernel_config.py" in content["evalue"]


def test_local_server_cut_short_by_the_deadline_is_replaced() -> None:
    """A startup deadline that fires while the private server starts leaves nothing behind."""
    import asyncio

    import psutil

    from cgpu_kernel.backends.local import LocalBackend

    def servers() -> list[psutil.Process]:
        return [
            p for p in psutil.Process().children()
            if "cgpu_kernel.backends.local_server" in " ".join(p.cmdline())
        ]  # fmt: skip

    async def scenario() -> str:
        backend = LocalBackend()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(backend.start_kernel(), 0.2)
            assert servers() == []
            kernel_id = await asyncio.wait_for(backend.start_kernel(), 60)
            assert len(servers()) == 1
            return kernel_id
        finally:
            await backend.shutdown_kernel()
            await backend.close()

    assert asyncio.run(scenario())
    assert servers() == []
