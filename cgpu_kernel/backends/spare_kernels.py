"""The warm local server's kernel manager: one kernel started ahead of each start request.

Loaded by ``local_server`` in its warm lifetime (``--ServerApp.kernel_manager_class``), never by
a private server. A new ipykernel takes half a second or more to answer; a ``cgpu-kernel run``
on a warm server should not wait for it. So after each start request this manager starts one
*spare* kernel, for the same kernelspec in the same folder, and hands it to the next request
that asks for exactly that. A spare has run nothing, so every run still gets a fresh kernel of
its own (variables never carry over): only the wait is moved to before the request. Their
IPython history is kept in memory (:meth:`SpareKernelManager._history_in_memory` says why).

Kernels handed out are *claimed*. The warm server counts them for its idle timeout, and deletes
one whose proxy has been gone (no WebSocket open on it) for the idle timeout: a proxy
killed with SIGKILL cannot delete its kernel, and a kernel nobody uses must not keep the server
up for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import Any

from jupyter_server.services.kernels.kernelmanager import AsyncMappingKernelManager

#: Seconds the next spare waits at most for the kernel just claimed to answer.
SPARE_WAIT_LIMIT = 30.0

#: jupyter-server's manager, untyped where it matters here (its methods are mostly unannotated)
_Manager: Any = AsyncMappingKernelManager


class SpareKernelManager(_Manager):  # type: ignore[misc]
    """jupyter-server's kernel manager, plus the spare kernel and the claimed ones (above)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: the spare being started or ready, and the (kernelspec, folder) it was started for
        self._spare: asyncio.Task[str] | None = None
        self._spare_for: tuple[str, str] | None = None
        #: whether the spare's own start has begun (it first waits for the last claim to answer)
        self._spare_launching = False
        #: claimed kernel id -> when it last had a WebSocket open (or was handed out)
        self.claimed: dict[str, float] = {}
        #: deletes still under way (a DELETE is answered before the kernel has exited)
        self._closing: set[asyncio.Task[None]] = set()

    async def start_kernel(
        self, *, kernel_id: str | None = None, path: str | None = None, **kwargs: Any
    ) -> str:
        """Called by jupyter-server's ``POST /api/kernels``: the spare when it fits, else a new
        kernel; either way a new spare is started for the next request."""
        name = str(kwargs.pop("kernel_name", None) or self.default_kernel_name)
        cwd = self.cwd_for_path(path) if path is not None else str(self.root_dir)
        if kernel_id is not None:  # a kernel of a given id (proxies never ask): no spare
            taken = await self._launch(name, cwd, kernel_id)
            self.claimed[taken] = time.monotonic()
            return taken
        taken = await self._take_spare(name, cwd) or await self._launch(name, cwd)
        self.claimed[taken] = time.monotonic()
        if self._spare is not None:  # another request started one meanwhile: one spare only
            self._drop(self._spare)
        self._spare_for, self._spare_launching = (name, cwd), False
        self._spare = asyncio.create_task(self._launch_after(taken, name, cwd))
        return taken

    async def _launch_after(self, claimed: str, name: str, cwd: str) -> str:
        """The next spare, once the kernel just claimed has answered (left "starting", which
        jupyter-server reads from its status messages): a kernel's start is a burst of CPU, and
        two at once on a small machine slow down the one a run is waiting for. A spare handed
        out has answered already (it was started long before), so then this wait is short."""
        deadline = time.monotonic() + SPARE_WAIT_LIMIT
        while claimed in self and time.monotonic() < deadline:
            if getattr(self.get_kernel(claimed), "execution_state", None) != "starting":
                break
            await asyncio.sleep(0.05)
        self._spare_launching = True
        return await self._launch(name, cwd)

    async def _launch(self, name: str, cwd: str, kernel_id: str | None = None) -> str:
        # PWD as the kernel's folder: the server's own is the folder of the run that started it
        env = dict(os.environ, PWD=cwd)
        started: str = await super().start_kernel(
            kernel_id=kernel_id,
            kernel_name=name,
            cwd=cwd,
            env=env,
            extra_arguments=self._history_in_memory(name),
        )
        return started

    def _history_in_memory(self, name: str) -> list[str]:
        """IPython's history in memory, as nbclient has it: a spare starting beside a running
        kernel made the two open one ``history.sqlite`` at once, and IPython, finding it
        "corrupt", moved it aside and printed so into the run's output. Only for ipykernel
        kernelspecs (another kernel would not take the option)."""
        try:
            spec = self.kernel_spec_manager.get_kernel_spec(name)
        except Exception:  # an unknown name fails in the start itself, with jupyter's error
            return []
        if "ipykernel" not in " ".join(spec.argv):
            return []
        return ["--HistoryManager.hist_file=:memory:"]

    async def _take_spare(self, name: str, cwd: str) -> str | None:
        task, wanted = self._spare, self._spare_for
        launching, self._spare_launching = self._spare_launching, False
        self._spare = self._spare_for = None
        if task is None:
            return None
        if not task.done() and not launching:
            # still waiting for the kernel claimed before it (whose proxy may never connect):
            # a start of our own is quicker than that wait
            task.cancel()
            return None
        try:
            kernel_id = await task
        except Exception as exc:  # a spare that failed to start: start one for this request
            self.log.warning("the spare kernel did not start: %s", exc)
            return None
        if wanted != (name, cwd):
            self._close_later(kernel_id)  # started for another folder or kernelspec
            return None
        if kernel_id not in self or not await self.get_kernel(kernel_id).is_alive():
            return None
        return kernel_id

    def _drop(self, task: asyncio.Task[str]) -> None:
        """Shut down the kernel ``task`` starts, once it has (or cancel it while it waits)."""
        if not self._spare_launching:
            task.cancel()
            return

        def started(done: asyncio.Task[str]) -> None:
            if not done.cancelled() and done.exception() is None:
                self._close_later(done.result())

        task.add_done_callback(started)

    def _close_later(self, kernel_id: str) -> None:
        task = asyncio.create_task(super().shutdown_kernel(kernel_id))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def shutdown_kernel(
        self, kernel_id: str, now: bool = False, restart: bool = False
    ) -> None:
        """Called by ``DELETE /api/kernels/ID`` (and restarts). A claimed kernel's delete is
        answered at once and finished in the background: the proxy that asked is about to exit,
        and the kernel's own orderly exit (its atexit handlers) should not hold it up."""
        if kernel_id in self.claimed and not restart:
            self._check_kernel_id(kernel_id)  # an unknown id still answers 404
            del self.claimed[kernel_id]
            self._close_later(kernel_id)
            return
        self.claimed.pop(kernel_id, None)
        await super().shutdown_kernel(kernel_id, now=now, restart=restart)

    async def shutdown_all(self, now: bool = False) -> None:
        """Called by jupyter-server when it stops: the spare being started, the deletes under
        way, then every kernel."""
        if self._spare is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._spare
            self._spare = None
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        self.claimed.clear()
        await super().shutdown_all(now=now)

    async def delete_orphans(self, grace: float) -> None:
        """Delete claimed kernels without a WebSocket for ``grace`` seconds (their proxy died).
        Called by the warm server's idle watch; a kernel that is gone is forgotten."""
        now = time.monotonic()
        for kernel_id, last_seen in list(self.claimed.items()):
            if kernel_id not in self:
                self.claimed.pop(kernel_id, None)
            elif self.kernel_model(kernel_id).get("connections", 0):
                self.claimed[kernel_id] = now
            elif now - last_seen > grace:
                self.log.warning(
                    "deleting kernel %s: nothing has been connected to it for %.0f s (its proxy"
                    " is gone)",
                    kernel_id,
                    grace,
                )
                await self.shutdown_kernel(kernel_id)
