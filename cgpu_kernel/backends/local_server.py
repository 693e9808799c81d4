"""The private jupyter-server behind the ``local`` backend.

Run as ``python -m cgpu_kernel.backends.local_server``.

Binds 127.0.0.1 on a port the OS picks, takes its token from ``JUPYTER_TOKEN`` in its
environment (never argv), prints ``{"port": N}`` on stdout once it listens, and stops -- shutting
its kernels down -- as soon as the proxy that started it is gone, even if that proxy was killed
with SIGKILL. The server's IOPub rate limits are off: they drop output ("IOPub data rate
exceeded"), and a proxy must not lose what a cell prints.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

import psutil
from jupyter_server.serverapp import ServerApp
from tornado.ioloop import PeriodicCallback

#: Lets 100 MB comm buffers through (tornado's default cap is 10 MiB).
MAX_WEBSOCKET_MESSAGE = 1 << 30


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--root-dir", required=True)
    args = parser.parse_args(argv)
    parent = psutil.Process(args.parent_pid)

    # A private runtime dir keeps this server out of `jupyter server list`; it goes with the
    # server (one was left behind per run before, in the system's temporary folder).
    runtime_dir = tempfile.mkdtemp(prefix="cgpu-local-server-")
    os.environ["JUPYTER_RUNTIME_DIR"] = runtime_dir
    try:
        _serve(args.root_dir, parent)
    finally:
        shutil.rmtree(runtime_dir, ignore_errors=True)


def _serve(root_dir: str, parent: psutil.Process) -> None:
    """Run the server until it is stopped (SIGTERM) or its proxy is gone."""
    app = ServerApp()
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
        ],
        new_httpserver=True,
        find_extensions=False,
    )
    app.start_app()

    def announce() -> None:
        # jupyter-server binds its port in a callback queued during initialize(); this one runs
        # after it, so the port is announced only once connections are accepted (and never if
        # binding failed: the server exits first).
        print(json.dumps({"port": app.port}), flush=True)
        # From here on, stdout (inherited by kernels, which may print at the C level) is
        # stderr: the proxy stops reading the pipe, and a full pipe would block a kernel.
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    app.io_loop.add_callback(announce)

    def stop_when_orphaned() -> None:
        if not parent.is_running() or parent.status() == psutil.STATUS_ZOMBIE:
            watchdog.stop()
            app.stop()

    watchdog = PeriodicCallback(stop_when_orphaned, 500)
    watchdog.start()
    app.start_ioloop()


if __name__ == "__main__":
    main(sys.argv[1:])
