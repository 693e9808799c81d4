"""``cgpu-kernel status``: every installed cgpu kernelspec, where it points, whether that
answers, and the kernels it has running.

``cli`` imports this module (``COMMAND_MODULES``) and calls :func:`register`. One row per
kernelspec, whatever its backend:

* ``local``: the target is a private server started with each kernel (or the warm server
  ``cgpu-kernel run`` keeps, listed below the table: ``cli.server``), so there is nothing to
  reach beforehand; its kernels are the proxies of this kernelspec running on this machine.
* ``jupyter``: the server at its ``--url`` (never with a token), asked for ``api/kernels``
  with the kernelspec's own token (its token file, else ``CGPU_TOKEN``) and a short timeout;
  its kernels are the ones that server runs.
* ``colab``: Colab at its URL, asked for this account's runtimes; its kernels are the
  runtimes (accelerator, idle time, GPU memory: the table ``status --colab`` prints alone).

The exit status is 1 when a kernelspec's target does not answer, else 0, so a script can ask.
Nothing printed here contains a token.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

import psutil
from jupyter_client.kernelspec import KernelSpecManager

from cgpu_kernel import kernelspec
from cgpu_kernel.backends.http import safe_url
from cgpu_kernel.backends.jupyter import JupyterServerClient
from cgpu_kernel.cli import colab, server
from cgpu_kernel.exceptions import CgpuError
from cgpu_kernel.proxy.options import read_token

#: Seconds the reachability check of one server may take (``--timeout``).
PROBE_TIMEOUT = 3.0
LOCAL_TARGET = "private server on 127.0.0.1, started with each kernel"


@dataclass
class SpecStatus:
    """One kernelspec's row (and its ``--json`` object)."""

    name: str
    backend: str
    target: str
    #: True: it answered; False: it did not (``detail`` says why); None: nothing to reach
    reachable: bool | None
    detail: str = ""
    kernels: list[dict[str, Any]] = field(default_factory=list)


def register(commands: Any) -> None:
    """Add ``status`` to the ``cgpu-kernel`` subcommands."""
    status = commands.add_parser(
        "status",
        help="every installed cgpu kernelspec: backend, target, reachable, running kernels"
        " (Colab: runtimes, accelerator, GPU memory)",
        description="One row per installed cgpu kernelspec: its backend, its target (the"
        " server URL, without a token), whether the target answers now, and the kernels it"
        " has running. Exit status 1 when a target does not answer.",
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--timeout",
        type=float,
        default=PROBE_TIMEOUT,
        help=f"seconds each server may take to answer (default {PROBE_TIMEOUT:g})",
    )
    status.add_argument(
        "--colab",
        action="store_true",
        help="only this Google account's Colab runtimes (endpoint, accelerator, shape, kernels,"
        " idle time, GPU memory), whatever kernelspecs are installed",
    )
    colab.add_colab_url(status)
    status.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    if args.colab:
        return colab.print_runtimes(asyncio.run(colab.list_runtimes(args.colab_url)), args.json)
    specs = kernelspec.list_specs()
    rows = asyncio.run(_statuses(specs, args.timeout, args.colab_url))
    warm = server.describe_servers() if any(r.backend == "local" for r in rows) else []
    if args.json:
        print(
            json.dumps(
                {"kernelspecs": [asdict(row) for row in rows], "warm_servers": warm}, indent=2
            )
        )
    elif not rows:
        print("No cgpu kernelspecs installed. Add one with `cgpu-kernel install`.")
    else:
        _print_table(rows)
        for row in warm:
            print(server.format_server(row) + " (`cgpu-kernel server stop` stops it)")
    return 1 if any(row.reachable is False for row in rows) else 0


async def _statuses(
    specs: list[dict[str, Any]], timeout: float, colab_url: str
) -> list[SpecStatus]:
    argvs = {spec["name"]: _argv(spec["name"]) for spec in specs}
    running = _running_proxies(argvs)
    checks = [
        _one(spec["name"], spec["backend"], argvs[spec["name"]], timeout, colab_url)
        for spec in specs
    ]
    rows = list(await asyncio.gather(*checks))
    for row in rows:
        if row.backend == "local":
            row.kernels = running.get(row.name, [])
    return rows


def _argv(name: str) -> list[str]:
    try:
        return [str(a) for a in KernelSpecManager().get_kernel_spec(name).argv]
    except Exception:  # a broken kernelspec is shown as such, not as a traceback
        return []


async def _one(
    name: str, backend: str, argv: list[str], timeout: float, colab_url: str
) -> SpecStatus:
    if backend == "local":
        return SpecStatus(name, backend, LOCAL_TARGET, None, "nothing to reach before a start")
    if backend == "colab":
        url = kernelspec.argv_option(argv, "--colab-url", "--ProxyKernel.colab_url") or colab_url
        return await _colab(name, url)
    url = kernelspec.argv_option(argv, "--url", "--ProxyKernel.url") or os.environ.get(
        "CGPU_URL", ""
    )
    if not url:
        return SpecStatus(name, backend, "?", False, "no --url in the kernelspec (reinstall it)")
    return await _jupyter(name, backend, url, argv, timeout)


async def _jupyter(
    name: str, backend: str, url: str, argv: list[str], timeout: float
) -> SpecStatus:
    row = SpecStatus(name, backend, safe_url(url), False)
    token_file = kernelspec.argv_option(argv, "--token-file", "--ProxyKernel.token_file") or ""
    verify = kernelspec.argv_option(argv, "--validate-cert", "--ProxyKernel.validate_cert")
    ca_certs = kernelspec.argv_option(argv, "--ca-certs", "--ProxyKernel.ca_certs")
    try:
        client = JupyterServerClient(
            url,
            read_token(token_file or os.environ.get("CGPU_TOKEN_FILE", "")),
            validate_cert=(verify or "true").lower() not in ("false", "0", "no"),
            ca_certs=ca_certs or os.environ.get("CGPU_CA_CERTS") or None,
            request_timeout=timeout,
            timeout_option="`cgpu-kernel status --timeout`",
        )
    except CgpuError as exc:
        row.detail = str(exc)
        return row
    try:
        models = await client.call("GET", "api/kernels")
    except CgpuError as exc:
        row.detail = str(exc)
        return row
    finally:
        client.close()
    row.reachable = True
    row.kernels = [
        {
            "id": str(model.get("id")),
            "name": str(model.get("name")),
            "state": str(model.get("execution_state")),
        }
        for model in (models if isinstance(models, list) else [])
        if isinstance(model, dict)
    ]
    return row


async def _colab(name: str, url: str) -> SpecStatus:
    row = SpecStatus(name, "colab", safe_url(url), False)
    try:
        row.kernels = await colab.list_runtimes(url)
    except CgpuError as exc:
        row.detail = str(exc)
        return row
    row.reachable = True
    return row


def _running_proxies(argvs: dict[str, list[str]]) -> dict[str, list[dict[str, Any]]]:
    """This user's proxy processes launched from each kernelspec: their command line is
    the kernelspec's argv with the connection file filled in (jupyter_client also puts its
    own interpreter in place of a bare ``python``)."""
    found: dict[str, list[dict[str, Any]]] = {}
    me = psutil.Process().username()
    for process in psutil.process_iter(["pid", "cmdline", "username"]):
        if process.info.get("username") != me:
            continue
        cmdline = process.info.get("cmdline") or []
        for name, argv in argvs.items():
            if argv and _launched_from(argv, cmdline):
                found.setdefault(name, []).append({"pid": process.info["pid"], "state": "running"})
    return found


def _launched_from(argv: list[str], cmdline: list[str]) -> bool:
    if len(argv) != len(cmdline) or not cmdline:
        return False
    first = os.path.basename(argv[0])
    if argv[0] != cmdline[0] and not (first.startswith("python") and cmdline[0] == sys.executable):
        return False
    return all(
        want == got or "{connection_file}" in want
        for want, got in zip(argv[1:], cmdline[1:], strict=True)
    )


def _kernels_cell(row: SpecStatus) -> str:
    if row.reachable is False:
        return "-"
    if row.backend == "local":
        pids = ", ".join(str(k["pid"]) for k in row.kernels)
        return f"{len(row.kernels)} running" + (f" (pid {pids})" if pids else "")
    if row.backend == "colab":
        return f"{len(row.kernels)} runtime(s)"
    states = ", ".join(f"{k['name']} {k['state']}" for k in row.kernels)
    return f"{len(row.kernels)}" + (f": {states}" if states else "")


def _print_table(rows: list[SpecStatus]) -> None:
    reach = {True: "yes", False: "no", None: "-"}
    header = ("KERNELSPEC", "BACKEND", "TARGET", "REACHABLE", "KERNELS")
    table = [header] + [
        (r.name, r.backend, r.target, reach[r.reachable], _kernels_cell(r)) for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    for row in rows:
        if row.reachable is False:
            print(f"{row.name}: {row.detail}")
        elif row.backend == "colab" and row.kernels:
            print(f"{row.name}: Colab runtimes at {row.target}")
            colab.print_runtimes(row.kernels, as_json=False, hint=False)
    if any(r.backend == "colab" for r in rows):
        print("(`cgpu-kernel status --colab` lists only the account's Colab runtimes.)")
