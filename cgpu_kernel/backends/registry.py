"""Records of the remote kernels this machine's proxies started, so none is left running.

A proxy killed with SIGKILL cannot delete its remote kernel. Each proxy therefore writes a small
record (owner pid and start time, server URL, kernel id; never a token) when it starts a remote
kernel and removes it after deleting the kernel. Whoever comes next to the same server -- a new
proxy kernel, or ``cgpu-kernel reclaim`` -- deletes the kernels whose owner is dead.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

import psutil

from cgpu_kernel.backends.http import means_gone
from cgpu_kernel.exceptions import RemoteError
from cgpu_kernel.paths import registry_dir

log = logging.getLogger(__name__)


class RESTClient(Protocol):
    """What reclaiming needs of a Jupyter REST client
    (:class:`cgpu_kernel.backends.jupyter.JupyterServerClient`, which imports this module)."""

    @property
    def base_url(self) -> str: ...

    async def call(
        self, method: str, path: str, body: Any = None, *, timeout: float | None = None
    ) -> Any: ...


def _record_path(kernel_id: str) -> Path:
    return registry_dir() / f"remote-kernel-{kernel_id}.json"


def record(base_url: str, kernel_id: str) -> None:
    me = psutil.Process()
    data = {"pid": me.pid, "create_time": me.create_time(), "url": base_url, "kernel_id": kernel_id}
    descriptor = os.open(_record_path(kernel_id), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(json.dumps(data))


def forget(base_url: str, kernel_id: str) -> None:
    _record_path(kernel_id).unlink(missing_ok=True)


def records() -> list[dict[str, Any]]:
    found = []
    for path in sorted(registry_dir().glob("remote-kernel-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            log.warning("ignoring unreadable record %s", path)
            continue
        if isinstance(data, dict) and {"pid", "url", "kernel_id"} <= data.keys():
            found.append(data)
    return found


def owner_alive(data: dict[str, Any]) -> bool:
    """Whether the proxy that wrote ``data`` still runs: its pid exists, was started when the
    record says (not a reused pid), and is not a zombie -- a SIGKILLed proxy its frontend has
    not reaped yet (nbclient and papermill reap only when they exit) is dead, and its remote
    kernel is reclaimed."""
    try:
        process = psutil.Process(int(data["pid"]))
        if abs(process.create_time() - float(data.get("create_time", 0))) >= 1.0:
            return False
        return bool(process.status() != psutil.STATUS_ZOMBIE)
    except (psutil.Error, ValueError, TypeError):
        return False


async def reclaim_orphans(client: RESTClient) -> list[str]:
    """Delete the remote kernels on ``client``'s server whose proxy died; their ids."""
    reclaimed = []
    for data in records():
        if data["url"] != client.base_url or owner_alive(data):
            continue
        kernel_id = str(data["kernel_id"])
        try:
            await client.call("DELETE", f"api/kernels/{quote(kernel_id)}")
        except RemoteError as exc:
            if not means_gone(exc):
                # unreachable, refused, or a 5xx (a reverse proxy's 502): the kernel may well
                # be running; keep the record, the next reclaim tries again
                log.warning("could not reclaim orphaned remote kernel %s: %s", kernel_id, exc)
                continue
            # already gone (404): nothing left to reclaim
        forget(client.base_url, kernel_id)
        log.info("reclaimed remote kernel %s left by dead proxy pid %s", kernel_id, data["pid"])
        reclaimed.append(kernel_id)
    return reclaimed
