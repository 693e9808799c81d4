"""``cgpu-kernel auth | release``: Google sign-in and the Colab runtimes of this account.

``cli`` imports this module and calls :func:`register` with its subparsers; ``cgpu-kernel
status`` (:mod:`cgpu_kernel.cli.status`) lists the runtimes with :func:`list_runtimes` and
:func:`print_runtimes`. Every command
returns an exit code; errors raise :class:`~cgpu_kernel.exceptions.CgpuError` (one line saying
what to do). Nothing printed here contains a token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from datetime import datetime, timezone
from typing import Any

from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from cgpu_kernel.backends.colab import auth
from cgpu_kernel.backends.colab.api import (
    CLIENT_AGENT,
    CLIENT_AGENT_ENV,
    CLIENT_AGENT_HEADER,
    PROXY_TOKEN_HEADER,
    ColabAPI,
)
from cgpu_kernel.backends.colab.models import DEFAULT_COLAB_URL, RuntimeProxy, parse_json
from cgpu_kernel.backends.jupyter import JupyterServerClient
from cgpu_kernel.exceptions import CgpuError, RemoteError

COLAB_URL_ENV = "CGPU_COLAB_URL"


def _client_agent() -> str:
    """``X-Colab-Client-Agent`` for the commands: CGPU_COLAB_CLIENT_AGENT, else ours."""
    return os.environ.get(CLIENT_AGENT_ENV, "").strip() or CLIENT_AGENT


def _api(colab_url: str) -> ColabAPI:
    return ColabAPI(auth.load_tokens(), colab_url, client_agent=_client_agent())


def register(commands: Any) -> None:
    """Add ``auth`` and ``release`` to the ``cgpu-kernel`` subcommands."""
    auth_parser = commands.add_parser("auth", help="sign in to Google for the colab backend")
    actions = auth_parser.add_subparsers(dest="auth_command", required=True, metavar="ACTION")
    login = actions.add_parser(
        "login", help="sign in with your own OAuth client (--client-secrets) or with ADC (--adc)"
    )
    how = login.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--client-secrets",
        metavar="FILE",
        help="the JSON of your own 'Desktop app' OAuth client (Google Cloud console)",
    )
    how.add_argument(
        "--adc", action="store_true", help="use Application Default Credentials (gcloud)"
    )
    login.add_argument(
        "--no-browser", action="store_true", help="print the sign-in URL instead of opening it"
    )
    login.add_argument(
        "--port", type=int, default=0, help="loopback port for the redirect (default: any free)"
    )
    login.set_defaults(func=_auth_login)
    auth_status = actions.add_parser(
        "status",
        help="say where the Google credentials come from, and the account's Colab tier",
    )
    add_colab_url(auth_status)
    auth_status.set_defaults(func=_auth_status)
    actions.add_parser("logout", help="forget the stored Google sign-in").set_defaults(
        func=_auth_logout
    )

    release = commands.add_parser("release", help="release (unassign) Colab runtimes")
    add_colab_url(release)
    which = release.add_mutually_exclusive_group(required=True)
    which.add_argument("endpoints", nargs="*", default=[], metavar="ENDPOINT")
    which.add_argument("--all", action="store_true", help="release every runtime of the account")
    release.set_defaults(func=_release)


def add_colab_url(parser: argparse.ArgumentParser) -> None:
    """``--colab-url`` (``status`` and ``release``)."""
    parser.add_argument(
        "--colab-url",
        default=os.environ.get(COLAB_URL_ENV) or DEFAULT_COLAB_URL,
        help=f"Colab's base URL (default {DEFAULT_COLAB_URL}, or {COLAB_URL_ENV})",
    )


# --- auth -------------------------------------------------------------------------------------


def _auth_login(args: argparse.Namespace) -> int:
    if args.adc:
        path = auth.login_adc()
        print(f"Using Application Default Credentials (recorded in {path}).")
    else:
        path = auth.login(args.client_secrets, open_browser=not args.no_browser, port=args.port)
        print(f"Signed in. Credentials stored in {path} (mode 600).")
    return 0


def _auth_status(args: argparse.Namespace) -> int:
    info = auth.status()
    print(info["detail"])
    if "file" in info:
        print(f"store: {info['file']}")
    if info["source"] in ("none", "error"):
        return 1
    print(asyncio.run(_tier(args.colab_url)))
    return 0


async def _tier(colab_url: str) -> str:
    """The account's tier and what it may ask for, or why that is not known (Google's API
    host may refuse our tokens: google-colab-cli AGENTS.md). Never fails the command."""
    api = _api(colab_url)
    try:
        return (await api.user_info()).describe()
    except RemoteError as exc:
        why = f"HTTP {exc.status}" if exc.status else "no answer"
        return (
            f"Colab's user-info service ({api.gapi_url}) did not say this account's tier"
            f" ({why}; google-colab-cli found it refusing ordinary user tokens). A refused"
            " accelerator's error names what Colab allows when it can, and the kernel's log"
            " names the tier of each runtime it is assigned."
        )
    finally:
        api.close()


def _auth_logout(args: argparse.Namespace) -> int:
    if auth.logout():
        print(
            f"Forgot the stored Google sign-in ({auth.credentials_path()}). To revoke it at"
            " Google too, visit https://myaccount.google.com/permissions."
        )
    else:
        print("There was no stored Google sign-in.")
    return 0


# --- status and release -----------------------------------------------------------------------


def print_runtimes(rows: list[dict[str, Any]], as_json: bool, *, hint: bool = True) -> int:
    """The runtimes :func:`list_runtimes` found, as a table (or JSON); the exit status."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("No Colab runtimes are assigned to this account.")
        return 0
    header = ("ENDPOINT", "ACCELERATOR", "SHAPE", "KERNELS", "IDLE", "GPU MEMORY")
    table = [header] + [
        (
            r["endpoint"],
            r["accelerator"],
            r["shape"],
            str(r["kernels"]),
            r["idle"],
            r["gpu_memory"],
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)))
    if not hint:
        return 0
    print(
        "Attach a kernel to one with `cgpu-kernel install --backend colab --option"
        " colab-endpoint=ENDPOINT` (an attached runtime is never released at shutdown)."
    )
    return 0


async def list_runtimes(colab_url: str) -> list[dict[str, Any]]:
    """This account's runtimes, each with its kernels, idle time and GPU memory."""
    api = _api(colab_url)
    try:
        rows = []
        for item in await api.assignments():
            endpoint = str(item.get("endpoint", "?"))
            shape = item.get("machineShape")
            row: dict[str, Any] = {
                "endpoint": endpoint,
                "accelerator": str(item.get("accelerator") or "none"),
                "shape": "high-memory" if shape in (1, "1", "HIGHMEM") else "standard",
                "kernels": "?",
                "idle": "?",
                "gpu_memory": "?",
            }
            try:
                # the dedicated endpoint, never the listing's token (it may be the old one)
                proxy = await api.proxy_token(endpoint)
                if proxy is not None:
                    row.update(await _runtime_details(proxy))
            except CgpuError as exc:
                row["error"] = str(exc)
            rows.append(row)
        return rows
    finally:
        api.close()


async def _runtime_details(proxy: RuntimeProxy) -> dict[str, Any]:
    """Kernels and idle time from the runtime's Jupyter API; GPU memory from its resources."""
    client = JupyterServerClient(
        proxy.url,
        None,
        extra_headers={PROXY_TOKEN_HEADER: proxy.token, CLIENT_AGENT_HEADER: _client_agent()},
    )
    details: dict[str, Any] = {}
    try:
        kernels = await client.call("GET", "api/kernels")
        if isinstance(kernels, list):
            details["kernels"] = len(kernels)
            busy = any(k.get("execution_state") == "busy" for k in kernels)
            seen = [_parse_time(k.get("last_activity")) for k in kernels]
            latest = max((t for t in seen if t is not None), default=None)
            if busy:
                details["idle"] = "busy"
            elif latest is not None:
                idle = (datetime.now(timezone.utc) - latest).total_seconds()
                details["idle"] = _duration(max(idle, 0.0))
        try:
            response = await AsyncHTTPClient().fetch(
                client.http_request(proxy.url + "api/colab/resources", request_timeout=20.0)
            )
            details["gpu_memory"] = _gpu_memory(parse_json(response.body, "the runtime"))
        except (HTTPClientError, OSError, RemoteError):
            details["gpu_memory"] = "n/a"
    finally:
        client.close()
    return details


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def _gpu_memory(resources: Any) -> str:
    """``used/total GiB`` from Colab's resources answer (``gpu`` or ``gpus``)."""
    if not isinstance(resources, dict):
        return "n/a"
    meters = resources.get("gpus") or [resources.get("gpu")]
    parts = []
    for meter in meters if isinstance(meters, list) else []:
        if not isinstance(meter, dict):
            continue
        used = meter.get("usage", meter.get("memoryUsedBytes"))
        limit = meter.get("limit", meter.get("memoryTotalBytes"))
        if isinstance(used, int | float) and isinstance(limit, int | float) and limit > 0:
            parts.append(f"{used / 2**30:.1f}/{limit / 2**30:.1f} GiB")
    return ", ".join(parts) or "no GPU"


def _release(args: argparse.Namespace) -> int:
    return asyncio.run(_release_async(args.colab_url, list(args.endpoints), args.all))


async def _release_async(colab_url: str, endpoints: list[str], everything: bool) -> int:
    api = _api(colab_url)
    try:
        if everything:
            endpoints = [str(item.get("endpoint")) for item in await api.assignments()]
            if not endpoints:
                print("No Colab runtimes are assigned to this account.")
                return 0
        failed = 0
        for endpoint in endpoints:
            try:
                await api.unassign(endpoint)
            except CgpuError as exc:
                print(f"{endpoint}: not released: {exc}")
                failed += 1
            else:
                print(f"{endpoint}: released")
        return 1 if failed else 0
    finally:
        api.close()
