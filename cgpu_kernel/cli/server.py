"""``cgpu-kernel server status`` and ``cgpu-kernel server stop``: the warm local servers.

``cli`` imports this module (``COMMAND_MODULES``) and calls :func:`register`. A warm server is
the jupyter-server ``cgpu-kernel run`` keeps between runs on the local backend
(``backends.warm_server``); it stops by itself after its idle timeout, and these commands show
it and stop it sooner. Nothing printed here contains its token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

from cgpu_kernel.backends import warm_server
from cgpu_kernel.backends.jupyter import JupyterServerClient
from cgpu_kernel.exceptions import CgpuError


def register(commands: Any) -> None:
    """Add ``server status`` and ``server stop`` to the ``cgpu-kernel`` subcommands."""
    server = commands.add_parser(
        "server",
        help="show or stop the warm local server that `cgpu-kernel run` keeps between runs",
        description="`cgpu-kernel run` on the local backend keeps a private jupyter-server on"
        " 127.0.0.1 between runs, so that the next run does not wait for one to start. It stops"
        " by itself after its idle timeout (CGPU_LOCAL_SERVER_IDLE_TIMEOUT, default"
        f" {warm_server.DEFAULT_IDLE_TIMEOUT:g} s without a run).",
    )
    actions = server.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="the warm servers running, if any")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.set_defaults(func=_status)
    stop = actions.add_parser("stop", help="stop every warm server now (their kernels too)")
    stop.set_defaults(func=_stop)


def describe_servers() -> list[dict[str, Any]]:
    """Every recorded warm server, without its token: ``running`` and, for one that answers,
    ``kernels`` (the spare started ahead included). Also used by ``cgpu-kernel status``."""
    rows = []
    for server in warm_server.list_servers():
        row = server.public() | {"running": server.process() is not None, "kernels": None}
        if row["running"]:
            row["kernels"] = asyncio.run(_kernel_count(server))
        rows.append(row)
    return rows


async def _kernel_count(server: warm_server.WarmServer) -> int | None:
    client = JupyterServerClient(server.url, server.token, request_timeout=3.0)
    try:
        models = await client.call("GET", "api/kernels", timeout=3.0)
    except CgpuError:
        return None
    finally:
        client.close()
    return len(models) if isinstance(models, list) else None


def format_server(row: dict[str, Any]) -> str:
    """One line for a warm server (``server status`` and ``status`` print it)."""
    if not row["running"]:
        return (
            f"warm local server pid {row['pid']}: not running (a stale record; the next run"
            " replaces it)"
        )
    kernels = "? (it did not answer)" if row["kernels"] is None else str(row["kernels"])
    return (
        f"warm local server pid {row['pid']} on {row['url']} since {row['started']}:"
        f" kernels {kernels} (the spare started ahead included); it stops after"
        f" {row['idle_timeout']:g} s without a run"
    )


def _status(args: argparse.Namespace) -> int:
    rows = describe_servers()
    if args.json:
        print(json.dumps({"warm_servers": rows}, indent=2))
    elif not rows:
        print("No warm local server running. `cgpu-kernel run` starts one when it needs it.")
    else:
        for row in rows:
            print(format_server(row))
        print("(`cgpu-kernel server stop` stops it now.)")
    return 0


def _stop(args: argparse.Namespace) -> int:
    stopped = warm_server.stop_all()
    if not stopped:
        print("No warm local server was running.")
    for server, was_running in stopped:
        what = "Stopped" if was_running else "Removed the stale record of"
        print(f"{what} the warm local server {server.describe()}")
    return 0
