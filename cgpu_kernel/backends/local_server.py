"""The jupyter-server behind the ``local`` backend.

Run as ``python -m cgpu_kernel.backends.local_server`` (by ``server_process``), in one of two
lifetimes:

* ``--parent-pid PID``: a *private* server, which stops -- shutting its kernels down -- as soon
  as the proxy that started it is gone, even if that proxy was killed with SIGKILL.
* ``--warm-record PATH --idle-timeout S --lock-fd N``: the *warm* server that ``cgpu-kernel
  run`` keeps between runs (``warm_server`` describes the record and the lock). It keeps a spare
  kernel started ahead (``spare_kernels``), writes its record once it listens, then lets go of
  the lock it inherited from its starter; it stops after S seconds without a claimed kernel
  (taking the lock, so that no run is claiming one meanwhile), and deletes a claimed kernel
  nothing has been connected to for S seconds (its proxy was killed).

Either way it binds 127.0.0.1 on a port the OS picks, takes its token from ``JUPYTER_TOKEN`` in
its environment (never argv) and removes it from there before any kernel starts (kernels must
not see it), and prints ``{"port": N}`` on stdout once it listens. The server's IOPub rate
limits are off: they drop output ("IOPub data rate exceeded"), and a proxy must not lose what a
cell prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

# jsonschema (imported by jupyter_server through jupyter_events) checks the "iri" format with
# rfc3987_syntax when it is installed, which builds a Lark grammar on import: 1.1 s of a 2 s
# start on two shared cores. Nothing this server validates is an IRI; without the module
# jsonschema leaves that one format unchecked (its import is optional there).
sys.modules.setdefault("rfc3987_syntax", None)  # type: ignore[arg-type]

import psutil  # noqa: E402
from jupyter_server.serverapp import ServerApp  # noqa: E402
from tornado.ioloop import PeriodicCallback  # noqa: E402

from cgpu_kernel.backends import warm_server  # noqa: E402
from cgpu_kernel.backends.spare_kernels import SpareKernelManager  # noqa: E402

#: Lets 100 MB comm buffers through (tornado's default cap is 10 MiB).
MAX_WEBSOCKET_MESSAGE = 1 << 30


#: Seconds between the warm server's looks at its kernels (idle timeout, orphans).
WATCH_INTERVAL = 0.5

log = logging.getLogger("cgpu_kernel.local_server")


@dataclass
class WarmLifetime:
    """The warm server's own arguments (see the module's text)."""

    record: str
    idle_timeout: float
    lock_fd: int

    @property
    def key(self) -> str:
        return os.path.basename(self.record).removesuffix(".json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    lifetime = parser.add_mutually_exclusive_group(required=True)
    lifetime.add_argument("--parent-pid", type=int, help="private: stop when this process ends")
    lifetime.add_argument("--warm-record", help="warm: write the record here once listening")
    parser.add_argument("--idle-timeout", type=float, default=warm_server.DEFAULT_IDLE_TIMEOUT)
    parser.add_argument("--lock-fd", type=int, default=-1, help="warm: the starter's lock")
    parser.add_argument("--root-dir", required=True)
    args = parser.parse_args(argv)
    warm = None
    parent = None
    if args.warm_record:
        warm = WarmLifetime(args.warm_record, args.idle_timeout, args.lock_fd)
    else:
        parent = psutil.Process(args.parent_pid)

    # A private runtime dir keeps this server out of `jupyter server list`; it goes with the
    # server (one was left behind per run before, in the system's temporary folder).
    runtime_dir = tempfile.mkdtemp(prefix="cgpu-local-server-")
    os.environ["JUPYTER_RUNTIME_DIR"] = runtime_dir
    try:
        _serve(args.root_dir, parent, warm)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)
        if warm is not None:
            _forget_own_record(warm)


def _serve(root_dir: str, parent: psutil.Process | None, warm: WarmLifetime | None) -> None:
    """Run the server until it is stopped (SIGTERM), its proxy is gone, or it was idle."""
    app = ServerApp()
    extra = (
        [f"--ServerApp.kernel_manager_class={SpareKernelManager.__module__}.SpareKernelManager"]
        if warm is not None
        else []
    )
    app.initialize(
        argv=[
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port=0",
            "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False",
            "--ServerApp.log_level=WARN",
            f"--ServerApp.root_dir={root_dir}",
            "--ZMQChannelsWebsocketConnection.iopub_data_rate_limit=0",
            "--ZMQChannelsWebsocketConnection.iopub_msg_rate_limit=0",
            "--ServerApp.tornado_settings="
            + json.dumps({"websocket_max_message_size": MAX_WEBSOCKET_MESSAGE}),
            "--ServerApp.allow_root=True",
            *extra,
        ],
        new_httpserver=True,
        find_extensions=False,
    )
    # The identity provider has read it; kernels inherit this environment and must not see it.
    token = os.environ.pop("JUPYTER_TOKEN", "")
    app.start_app()

    def announce() -> None:
        # jupyter-server binds its port in a callback queued during initialize(); this one runs
        # after it, so the port is announced only once connections are accepted (and never if
        # binding failed: the server exits first).
        if warm is not None:
            try:
                _write_own_record(warm, app.port, token)
            except OSError as exc:  # its starter then reads no port and shows this log
                log.error("cannot write the warm server's record %s: %s", warm.record, exc)
                app.stop()
                return
        print(json.dumps({"port": app.port}), flush=True)
        # From here on, stdout (inherited by kernels, which may print at the C level) is
        # stderr: the proxy stops reading the pipe, and a full pipe would block a kernel.
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    app.io_loop.add_callback(announce)

    if parent is not None:

        def stop_when_orphaned() -> None:
            if not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE:
                watchdog.stop()
                app.stop()

        watchdog = PeriodicCallback(stop_when_orphaned, WATCH_INTERVAL * 1000)
    else:
        assert warm is not None
        watch = IdleWatch(app, warm)
        watchdog = PeriodicCallback(watch.check, WATCH_INTERVAL * 1000)
        watch.watchdog = watchdog
    watchdog.start()
    app.start_ioloop()


def _write_own_record(warm: WarmLifetime, port: int, token: str) -> None:
    """The record, then the lock inherited from the starter goes (see ``warm_server``)."""
    me = psutil.Process()
    warm_server.write_record(
        warm_server.WarmServer(
            key=warm.key,
            pid=me.pid,
            create_time=me.create_time(),
            port=port,
            token=token,
            idle_timeout=warm.idle_timeout,
            started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        )
    )
    if warm.lock_fd >= 0:
        os.close(warm.lock_fd)  # closing, not unlocking: the starter's copy keeps it held


def _forget_own_record(warm: WarmLifetime) -> None:
    warm_server.forget_own(warm.key, os.getpid())


class IdleWatch:
    """The warm server's periodic look at its kernels: orphans deleted, idle stop."""

    def __init__(self, app: ServerApp, warm: WarmLifetime) -> None:
        self.app = app
        self.warm = warm
        self.last_claimed = time.monotonic()
        self.checking = False
        self.watchdog: PeriodicCallback | None = None

    @property
    def manager(self) -> SpareKernelManager:
        manager = self.app.kernel_manager
        assert isinstance(manager, SpareKernelManager)
        return manager

    async def check(self) -> None:
        if self.checking:
            return
        self.checking = True
        try:
            manager = self.manager
            await manager.delete_orphans(self.warm.idle_timeout)
            now = time.monotonic()
            if manager.claimed:
                self.last_claimed = now
            elif now - self.last_claimed >= self.warm.idle_timeout:
                self._stop_if_unclaimed()
        finally:
            self.checking = False

    def _stop_if_unclaimed(self) -> None:
        descriptor = warm_server.open_lock(self.warm.key)
        try:
            if not warm_server.try_lock(descriptor):
                return  # a run is claiming a kernel (or starting): look again next time
            if self.manager.claimed:
                return
            _forget_own_record(self.warm)
        finally:
            os.close(descriptor)
        log.warning("no kernel for %g s: the warm local server stops", self.warm.idle_timeout)
        if self.watchdog is not None:
            self.watchdog.stop()
        self.app.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
