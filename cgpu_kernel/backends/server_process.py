"""Starting and stopping a ``local_server`` process (a private or a warm local Jupyter server).

Called by the ``local`` backend (a private server per proxy), by ``warm_server`` (one kept
between runs) and by the provisioner. The server's token travels in its environment
(``JUPYTER_TOKEN``), never in argv; it says its port on stdout once it accepts connections.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from cgpu_kernel.exceptions import RemoteUnreachableError


async def start_server_process(
    lifetime: Sequence[str],
    token: str,
    *,
    stderr: Any,
    timeout: float,
    env: Mapping[str, str] | None = None,
    log_tail: Callable[[], str] | None = None,
    pass_fds: Sequence[int] = (),
) -> tuple[subprocess.Popen[bytes], int]:
    """Start ``local_server`` with the arguments ``lifetime`` (``--parent-pid ...`` or
    ``--warm-record ...``); the process and the port it listens on.

    A server that does not report its port in ``timeout`` -- or whose wait is cancelled, by a
    startup deadline say -- is stopped, so a later attempt starts afresh. ``subprocess.Popen``,
    not asyncio's: on Windows the proxy runs a selector event loop (pyzmq needs one), which
    cannot start subprocesses.
    """
    environment = dict(os.environ if env is None else env, JUPYTER_TOKEN=token)
    for variable in ("CGPU_TOKEN", "CGPU_TOKEN_FILE"):
        environment.pop(variable, None)
    server = subprocess.Popen(
        [sys.executable, "-m", "cgpu_kernel.backends.local_server", *lifetime],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=environment,
        cwd="/",  # kernels get their folder from the start request; this one must not be held
        start_new_session=True,  # a Ctrl-C meant for the frontend's terminal must not reach it
        pass_fds=tuple(pass_fds),
    )
    assert server.stdout is not None
    try:
        line = await asyncio.wait_for(asyncio.to_thread(server.stdout.readline), timeout)
        port = int(json.loads(line)["port"])
    except BaseException as exc:
        await stop_private_server(server)
        if not isinstance(exc, asyncio.TimeoutError | ValueError | KeyError | TypeError):
            raise
        ending = f" Its log ends: {log_tail()}" if log_tail else ""
        raise RemoteUnreachableError(
            "The local Jupyter server did not start. Check that jupyter-server and"
            f" ipykernel are installed in {sys.executable}'s environment.{ending}"
        ) from None
    finally:
        server.stdout.close()  # it prints nothing more there (see local_server)
    return server, port


async def start_private_server(
    root_dir: str,
    token: str,
    *,
    stderr: Any,
    timeout: float,
    log_tail: Callable[[], str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """A server for this process alone, serving ``root_dir``: it stops when this process is
    gone (used by the ``local`` backend's private lifetime and by the provisioner)."""
    return await start_server_process(
        ["--parent-pid", str(os.getpid()), "--root-dir", os.path.abspath(root_dir)],
        token,
        stderr=stderr,
        timeout=timeout,
        log_tail=log_tail,
    )


async def stop_private_server(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the server then shuts its kernels down), SIGKILL after 5 s."""
    if server.poll() is not None:
        return
    server.terminate()
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.to_thread(server.wait)), 5.0)
    except asyncio.TimeoutError:
        server.kill()
        await asyncio.to_thread(server.wait)
