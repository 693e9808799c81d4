"""The warm local server: one private jupyter-server kept between ``cgpu-kernel run`` calls.

Why: a ``run`` on the embedded default used to start a jupyter-server of its own and stop it at
the end; that start was most of the run. A warm server stays up between runs, with a spare kernel
started ahead (``spare_kernels``), so a repeated run costs only its own proxy. Each run still gets
a kernel of its own that has run nothing before: variables never carry over.

Who: :class:`~cgpu_kernel.backends.local.LocalBackend` calls :func:`claim` when its kernel should
run on the warm server (option ``local_server = warm``, which ``run`` asks for); the server
itself (``local_server`` in its warm lifetime) writes its record and takes the lock to stop when
idle; ``cgpu-kernel server`` (``cli.server``) and ``cgpu-kernel status`` list and stop them.

Where: ``paths.warm_servers_dir()`` (0700). For each environment key ``K`` (:func:`environment_key`:
kernels inherit the server's environment, so runs from different environments get different
servers): ``K.json``, the record (pid, start time, port, token, idle timeout; 0600, written by the
server once it listens), ``K.lock`` (an ``flock`` held by whoever starts, claims a kernel on, or
stops that server) and ``K.log`` (the server's log, 0600; gone when it stops).

No race leaves two servers or a half-started one: a starter holds the lock from before the start
until its kernel is claimed, and the server inherits that lock and keeps it until its record is
written, so a starter killed half-way still blocks the next run until the record exists. A claim
holds the lock through its start request, so the server (which needs the lock to stop when idle)
never stops between a run finding it and claiming a kernel on it. A record whose server is gone
(SIGKILL), is another process now, does not answer, or refuses its token is replaced, with one
warning in the proxy's log; a probe is bounded by :data:`PROBE_TIMEOUT`, a wait for the lock by
the start timeout, so nothing hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import psutil

from cgpu_kernel import __version__
from cgpu_kernel.backends.jupyter import JupyterServerClient
from cgpu_kernel.backends.server_process import start_server_process, stop_private_server
from cgpu_kernel.exceptions import RemoteError, RemoteUnreachableError
from cgpu_kernel.paths import warm_servers_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no warm server, every kernel gets its own
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: The default of option ``local_server_idle_timeout``: seconds without a run before it stops.
DEFAULT_IDLE_TIMEOUT = 300.0
#: Seconds a warm server's first answer may take before it counts as not answering.
PROBE_TIMEOUT = 3.0
#: Seconds a stop waits for the server's orderly exit (its kernels' too) before SIGKILL.
STOP_TIMEOUT = 10.0
#: Seconds a lock wait may last beyond the start timeout (a server start holds the lock).
LOCK_SLACK = 15.0

#: Variables that differ between runs from one shell without changing what a kernel does: the
#: shell's bookkeeping and prompts, jupyter_client's launcher pid. (``CGPU_*`` are left out too.)
VOLATILE_VARIABLES = frozenset(
    {"PWD", "OLDPWD", "SHLVL", "_", "PS1", "PS2", "PROMPT_COMMAND", "COLUMNS", "LINES"}
    | {"JPY_PARENT_PID", "JPY_SESSION_NAME"}
)
#: Seconds a server being replaced gets to stop before SIGKILL (one that did not answer the
#: probe is likely hung: waiting long for it would only hold up the run).
REPLACE_TIMEOUT = 2.0

T = TypeVar("T")


def supported() -> bool:
    """Warm servers need ``flock`` (POSIX); elsewhere the local backend keeps private ones."""
    return fcntl is not None


def environment_key(env: Mapping[str, str]) -> str:
    """Which warm server a kernel started from ``env`` may use: the hash of the interpreter,
    this package's version and the environment a kernel would inherit (:data:`VOLATILE_VARIABLES`
    and ``CGPU_*`` left out)."""
    kept = sorted(
        (name, value)
        for name, value in env.items()
        if name not in VOLATILE_VARIABLES and not name.startswith("CGPU_")
    )
    text = json.dumps([sys.executable, __version__, kept])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def record_path(key: str) -> Path:
    return warm_servers_dir() / f"{key}.json"


def lock_path(key: str) -> Path:
    return warm_servers_dir() / f"{key}.lock"


def log_path(key: str) -> Path:
    return warm_servers_dir() / f"{key}.log"


@dataclass
class WarmServer:
    """One warm server's record (its ``K.json``); the token is the only secret in it."""

    key: str
    pid: int
    create_time: float
    port: int
    token: str
    idle_timeout: float
    started: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def describe(self) -> str:
        """``pid 123 on 127.0.0.1:45678``: how logs and the CLI name it (never the token)."""
        return f"pid {self.pid} on 127.0.0.1:{self.port}"

    def process(self) -> psutil.Process | None:
        """Its process, if still running: same pid *and* start time (a reused pid is not it)."""
        try:
            process = psutil.Process(self.pid)
            if abs(process.create_time() - self.create_time) > 1.0:
                return None
            return None if process.status() == psutil.STATUS_ZOMBIE else process
        except psutil.Error:
            return None

    def public(self) -> dict[str, Any]:
        """What ``cgpu-kernel server status --json`` prints: the record without its token."""
        return {k: v for k, v in asdict(self).items() if k != "token"} | {"url": self.url}


def write_record(server: WarmServer) -> None:
    """Called by the server once it listens: its record, 0600, replaced atomically."""
    path = record_path(server.key)
    scratch = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(asdict(server)))
    os.replace(scratch, path)


def load(key: str) -> WarmServer | None:
    """The record for ``key``, or None (none, or unreadable: then it is replaced)."""
    try:
        data = json.loads(record_path(key).read_text())
        return WarmServer(**data)
    except (OSError, ValueError, TypeError):
        return None


def list_servers() -> list[WarmServer]:
    """Every recorded warm server of this user (running or not: see :meth:`WarmServer.process`)."""
    found = []
    for path in sorted(warm_servers_dir().glob("*.json")):
        server = load(path.stem)
        if server is not None:
            found.append(server)
    return found


def forget(server: WarmServer) -> None:
    """Remove ``server``'s record and log, unless the record is already another server's.
    An unreadable record is removed too: it is replaced."""
    if load(server.key) is None:
        record_path(server.key).unlink(missing_ok=True)
    forget_own(server.key, server.pid)


def forget_own(key: str, pid: int) -> None:
    """Remove the record and log for ``key`` if the record is the server ``pid``'s (a newer
    server's, or a starting one's log, stay). Called by the server as it stops, and by
    :func:`forget`."""
    current = load(key)
    if current is not None and current.pid == pid:
        record_path(key).unlink(missing_ok=True)
        log_path(key).unlink(missing_ok=True)


# --- the lock --------------------------------------------------------------------------------


def open_lock(key: str) -> int:
    return os.open(lock_path(key), os.O_RDWR | os.O_CREAT, 0o600)


def try_lock(descriptor: int) -> bool:
    """Take the exclusive lock on ``descriptor`` if nobody holds it; never waits."""
    assert fcntl is not None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _lock_timeout_error(key: str, waited: float) -> RemoteUnreachableError:
    return RemoteUnreachableError(
        f"Another cgpu-kernel process held the warm local server's lock ({lock_path(key)}) for"
        f" {waited:.0f} s. If no other run is starting, end the cgpu-kernel process that holds"
        " it (the lock goes with it) and run again; CGPU_LOCAL_SERVER=private gives this run a"
        " server of its own."
    )


#: Seconds between two tries of a lock another process holds.
LOCK_POLL = 0.02


def _while_held_elsewhere(descriptor: int, key: str, timeout: float) -> Iterator[None]:
    """Yield (for the caller to sleep its own way) while another process holds the lock on
    ``descriptor``; raise once ``timeout`` has passed. :func:`locked` and
    :func:`locked_blocking` share it, each sleeping as its caller must."""
    deadline = time.monotonic() + timeout
    while not try_lock(descriptor):
        if time.monotonic() > deadline:
            raise _lock_timeout_error(key, timeout)
        yield


@contextlib.asynccontextmanager
async def locked(key: str, timeout: float) -> AsyncIterator[int]:
    """The lock for ``key``, waited for without blocking the event loop (the proxy's)."""
    descriptor = open_lock(key)
    try:
        for _ in _while_held_elsewhere(descriptor, key, timeout):
            await asyncio.sleep(LOCK_POLL)
        yield descriptor
    finally:
        os.close(descriptor)  # releases the lock (the server keeps its inherited copy)


@contextlib.contextmanager
def locked_blocking(key: str, timeout: float) -> Iterator[int]:
    """:func:`locked` for the command line (``cgpu-kernel server stop``)."""
    descriptor = open_lock(key)
    try:
        for _ in _while_held_elsewhere(descriptor, key, timeout):
            time.sleep(LOCK_POLL)
        yield descriptor
    finally:
        os.close(descriptor)


# --- finding, starting and replacing ------------------------------------------------------------


async def problem_with(server: WarmServer) -> str | None:
    """Why ``server`` cannot be used (its process is gone, it does not answer on its port, or
    the port answers something else or refuses its token); None when it answered as itself."""
    if server.process() is None:
        return "is gone (its process is not running)"
    client = JupyterServerClient(server.url, server.token, request_timeout=PROBE_TIMEOUT)
    try:
        status = await client.call("GET", "api/status", timeout=PROBE_TIMEOUT)
    except RemoteError as exc:
        return f"did not answer as itself on its port ({exc})"
    finally:
        client.close()
    if not isinstance(status, dict) or "started" not in status:
        return "answered on its port, but not as a Jupyter server"
    return None


def terminate(server: WarmServer, timeout: float = STOP_TIMEOUT) -> bool:
    """Stop ``server``'s process if it still runs: SIGTERM (it stops its kernels), SIGKILL
    after ``timeout`` (then its kernels too). False when it was not running."""
    process = server.process()
    if process is None:
        return False
    try:
        kernels = process.children(recursive=True)
        process.terminate()
        try:
            process.wait(timeout)
        except psutil.TimeoutExpired:
            process.kill()
            process.wait(5)
            for kernel in kernels:
                with contextlib.suppress(psutil.Error):
                    kernel.kill()
    except psutil.NoSuchProcess:
        pass
    return True


async def claim(
    key: str,
    env: Mapping[str, str],
    *,
    idle_timeout: float,
    start_timeout: float,
    use: Callable[[WarmServer], Awaitable[T]],
) -> T:
    """``use(server)`` on the warm server for ``key`` (started first if needed), under its lock.

    ``use`` starts the kernel (its start request is part of the claim, see the module's text).
    A recorded server that cannot be used is stopped if it still runs and replaced."""
    async with locked(key, start_timeout + LOCK_SLACK) as descriptor:
        server = load(key)
        if server is not None:
            problem = await problem_with(server)
            if problem is None:
                return await use(server)
            log.warning(
                "the warm local server (%s) %s: starting a new one", server.describe(), problem
            )
            await asyncio.to_thread(terminate, server, REPLACE_TIMEOUT)
            forget(server)
        server = await _start(key, env, idle_timeout, start_timeout, descriptor)
        return await use(server)


async def _start(
    key: str, env: Mapping[str, str], idle_timeout: float, start_timeout: float, lock: int
) -> WarmServer:
    """Start the warm server for ``key``; it inherits ``lock`` (see the module's text)."""
    token = secrets.token_urlsafe(32)
    where = log_path(key)
    descriptor = os.open(where, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)

    def log_tail() -> str:
        lines = where.read_text(errors="replace").strip().splitlines()[-5:]
        return " | ".join(lines) or "(empty)"

    with os.fdopen(descriptor, "wb") as log_file:
        process, port = await start_server_process(
            [
                "--warm-record",
                str(record_path(key)),
                "--idle-timeout",
                f"{idle_timeout:g}",
                "--lock-fd",
                str(lock),
                "--root-dir",
                "/",  # each kernel is started in its run's folder (the start request's path)
            ],
            token,
            env=env,
            stderr=log_file,
            timeout=start_timeout,
            log_tail=log_tail,
            pass_fds=(lock,),
        )
    server = load(key)
    if server is None or server.pid != process.pid or server.port != port:
        await stop_private_server(process)
        raise RemoteUnreachableError(
            f"The warm local server started but did not write its record {record_path(key)}."
            f" Its log ends: {log_tail()}"
        )
    log.info(
        "started a warm local server (%s); it stops after %g s without a kernel"
        " (`cgpu-kernel server stop` stops it now)",
        server.describe(),
        idle_timeout,
    )
    return server


def stop_all(timeout: float = STOP_TIMEOUT) -> list[tuple[WarmServer, bool]]:
    """Stop every warm server of this user (``cgpu-kernel server stop``): each one and whether
    it was running. Each is stopped under its lock, so no run claims a kernel on it meanwhile."""
    stopped = []
    for server in list_servers():
        with locked_blocking(server.key, timeout + LOCK_SLACK):
            current = load(server.key)
            if current is None:
                continue  # it stopped by itself meanwhile
            stopped.append((current, terminate(current, timeout)))
            forget(current)
    return stopped
