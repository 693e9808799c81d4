"""Named sessions: a proxy kernel kept alive between ``cgpu-kernel run --session NAME`` calls.

A run is a short-lived process, and the proxy kernel stops when the process that launched it
exits (it watches its parent, so no remote kernel is left running). A session therefore gets its
own small *host* process (``python -m cgpu_kernel.run.sessions host ...``), detached from the
terminal, which launches the proxy with ``jupyter_client``'s ``KernelManager`` and keeps it
until ``cgpu-kernel sessions stop NAME``. Runs attach to the kernel through its connection file
(``runner`` calls :func:`kernel_for` and :func:`ensure`, then runs the code as on any kernel);
this module only starts, finds and stops sessions, and knows nothing of how code is run.

Everything lives in ``<state dir>/sessions/`` (beside
``cgpu_kernel.backends.registry.registry_dir()``), private to the user: ``NAME.json`` (host
pid, kernel, connection file; no secret), ``NAME.connection`` (the connection file, 0600: it
holds the signing key), ``NAME.log`` (the host's and kernel's log) and ``NAME.lock``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
from jupyter_client.manager import KernelManager

from cgpu_kernel.exceptions import ConfigurationError, RemoteError
from cgpu_kernel.paths import sessions_dir
from cgpu_kernel.run import history

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
STOP_TIMEOUT = 30.0


def check_name(name: str) -> str:
    if not NAME.fullmatch(name):
        raise ConfigurationError(
            f"{name!r} is not a session name: use letters, digits, '.', '_' or '-' (at most 64)."
        )
    return name


def state_path(name: str) -> Path:
    return sessions_dir() / f"{check_name(name)}.json"


def connection_path(name: str) -> Path:
    return sessions_dir() / f"{check_name(name)}.connection"


def log_path(name: str) -> Path:
    return sessions_dir() / f"{check_name(name)}.log"


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """One run at a time decides whether session ``name`` must be started."""
    descriptor = os.open(sessions_dir() / f"{check_name(name)}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def load(name: str) -> dict[str, Any] | None:
    try:
        data = json.loads(state_path(name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "pid" in data else None


def host_alive(state: dict[str, Any]) -> bool:
    """The session's host process still runs (same pid *and* start time: no pid reuse)."""
    try:
        process = psutil.Process(int(state["pid"]))
        same = abs(process.create_time() - float(state.get("create_time", 0))) < 1.0
        return bool(same and process.status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, ValueError, TypeError, KeyError):
        return False


def _forget(name: str) -> None:
    for path in (state_path(name), connection_path(name)):
        path.unlink(missing_ok=True)


def list_sessions() -> list[dict[str, Any]]:
    """Every recorded session, with ``alive`` telling whether its host still runs."""
    found = []
    for path in sorted(sessions_dir().glob("*.json")):
        state = load(path.stem)
        if state is not None:
            found.append(dict(state, alive=host_alive(state)))
    return found


def kernel_for(name: str, requested: str | None) -> str | None:
    """The kernelspec a run in session ``name`` uses: the live session's, else ``requested``."""
    state = load(name)
    if state is None or not host_alive(state):
        return requested
    if requested is not None and requested != state["kernel"]:
        raise ConfigurationError(
            f"Session {name!r} runs the kernel {state['kernel']!r}, not {requested!r}. Omit"
            f" --kernel, or stop it first with `cgpu-kernel sessions stop {name}`."
        )
    return str(state["kernel"])


def ensure(
    name: str, kernel: str, start_timeout: float, startup_args: list[str]
) -> tuple[dict[str, Any], bool]:
    """The live session ``name`` (starting its host if needed); True when freshly started.

    ``startup_args`` are passed on to the proxy (``--startup-timeout=...``, or nothing)."""
    with _lock(name):
        state = load(name)
        if state is not None and host_alive(state):
            return state, False
        _forget(name)
        log = log_path(name)
        descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as log_file:
            host = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cgpu_kernel.run.sessions",
                    "host",
                    name,
                    "--kernel",
                    kernel,
                    *[f"--proxy-arg={arg}" for arg in startup_args],
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # not stopped by the terminal's Ctrl-C or hang-up
                env=history.suppressed_env(),  # the runs record themselves, not the kernel
            )
        deadline = time.monotonic() + start_timeout + 10
        while time.monotonic() < deadline:
            state = load(name)
            if state is not None:
                return state, True
            if host.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:].strip()
                raise RemoteError(
                    f"The session {name!r} could not start its kernel {kernel!r}:"
                    f" {tail or 'no log'}. See {log}."
                )
            time.sleep(0.1)
        host.terminate()
        raise RemoteError(f"The session {name!r} did not start within {start_timeout:g} s.")


def stop(name: str, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop session ``name``: its proxy deletes the remote kernel. False if it was not running."""
    with _lock(name):
        state = load(name)
        if state is None:
            if not log_path(name).exists():
                raise ConfigurationError(
                    f"No session named {name!r}. `cgpu-kernel sessions list` shows them."
                )
            log_path(name).unlink(missing_ok=True)  # what a session that died left
            return False
        alive = host_alive(state)
        if alive:
            process = psutil.Process(int(state["pid"]))
            process.terminate()
            try:
                process.wait(timeout)
            except psutil.TimeoutExpired:
                # The proxy notices its parent is gone and deletes its remote kernel itself.
                process.kill()
        _forget(name)
        log_path(name).unlink(missing_ok=True)
        return alive


def host(name: str, kernel: str, proxy_args: list[str]) -> int:
    """The session's host process: launch the proxy kernel, keep it until told to stop."""
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    km = KernelManager(kernel_name=kernel, connection_file=str(connection_path(name)))
    km.start_kernel(env=dict(os.environ), extra_arguments=proxy_args)
    me = psutil.Process()
    state = {
        "name": name,
        "kernel": kernel,
        "pid": me.pid,
        "create_time": me.create_time(),
        "kernel_pid": getattr(km.provisioner, "pid", None),
        "connection_file": str(connection_path(name)),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "log": str(log_path(name)),
    }
    scratch = state_path(name).with_name(f"{name}.json.tmp")
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(state))
    os.replace(scratch, state_path(name))
    try:
        while not stopping.is_set() and km.is_alive():
            stopping.wait(1.0)
    finally:
        if km.is_alive():
            km.shutdown_kernel()  # the proxy deletes its remote kernel
        else:
            km.cleanup_resources()
        current = load(name)
        if current is not None and current.get("pid") == me.pid:
            _forget(name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cgpu_kernel.run.sessions")
    commands = parser.add_subparsers(dest="command", required=True)
    host_parser = commands.add_parser("host", help="(internal) host session NAME's kernel")
    host_parser.add_argument("name")
    host_parser.add_argument("--kernel", required=True)
    host_parser.add_argument("--proxy-arg", action="append", default=[], help="for the proxy")
    args = parser.parse_args(argv)
    return host(check_name(args.name), args.kernel, args.proxy_arg)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
