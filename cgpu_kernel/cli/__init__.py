"""The ``cgpu-kernel`` command: install, list, remove, demo, reclaim -- and the kernel itself.

``python -m cgpu_kernel -f CONNECTION_FILE ...`` (what kernelspecs run) starts the proxy kernel;
everything else is a subcommand. Errors print one line saying what to do and exit with 2.
"""

from __future__ import annotations

import argparse
import asyncio
import difflib
import getpass
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from traitlets import TraitError

from cgpu_kernel import __version__, kernelspec, paths
from cgpu_kernel.backends import registry
from cgpu_kernel.backends.http import safe_url
from cgpu_kernel.backends.jupyter import JupyterServerClient
from cgpu_kernel.config import trait_reference
from cgpu_kernel.exceptions import CgpuError, ConfigurationError
from cgpu_kernel.fast_exit import exit_now
from cgpu_kernel.proxy import spool
from cgpu_kernel.proxy.options import ProxyKernel, check_kernel_variable, read_token

# Two imports stay inside functions, for start-up time only (no cycle needs them): the proxy
# process (`proxy.app`, ~0.1 s) is only for `python -m cgpu_kernel -f ...`, and `cli.demo`
# (nbclient and nbformat, seconds cold) only for `cgpu-kernel demo`. The COMMAND_MODULES are
# imported by `build_parser`, which the kernel launch path never calls.

#: Modules that add subcommands: each has ``register(commands)``, taking the subparsers object
#: and adding parsers whose ``func`` default runs the command (returns the exit code).
COMMAND_MODULES = (
    "cgpu_kernel.run.cli",
    "cgpu_kernel.cli.colab",
    "cgpu_kernel.cli.status",
    "cgpu_kernel.cli.files",
    "cgpu_kernel.cli.server",
)


def _checked_option(option: str) -> str:
    """``NAME=VALUE`` for ``install --option``, validated now rather than at kernel start.

    A ``KERNEL_*`` name is a variable for the remote kernel's start request (``kernel_env``),
    which Enterprise Gateway's process proxies read: ``KERNEL_IMAGE=...`` becomes
    ``--kernel-env=KERNEL_IMAGE=...``.
    """
    name, sep, value = option.strip().lstrip("-").partition("=")
    if name.startswith("KERNEL_"):
        try:
            check_kernel_variable(name)
        except ValueError as exc:
            raise ConfigurationError(f"--option {option!r}: {exc}") from None
        if not sep:
            raise ConfigurationError(f"--option {option!r}: give {name}=VALUE.")
        return f"--kernel-env={name}={value}"
    trait = ProxyKernel.class_traits(config=True).get(name.replace("-", "_"))
    if trait is None or not sep:
        raise ConfigurationError(
            f"--option {option!r}: give NAME=VALUE with a kernel option name;"
            " `cgpu-kernel config-reference` lists them."
        )
    try:
        setattr(ProxyKernel(use_env=False), name.replace("-", "_"), trait.from_string(value))
    except (TraitError, ValueError) as exc:
        raise ConfigurationError(f"--option {option!r}: {exc}") from None
    return f"--{name}={value}"


def _install(args: argparse.Namespace) -> int:
    backend = args.backend
    name = args.name or kernelspec.default_name(backend)
    token_file = args.token_file
    token: str | None = None
    if args.token_stdin:
        token = sys.stdin.readline() if not sys.stdin.isatty() else getpass.getpass("Token: ")
        if not token.strip():
            raise ConfigurationError(
                "--token-stdin read an empty token: give the server's token on stdin (or at the"
                " Token: prompt). Nothing was installed."
            )
    if args.check:
        if backend != "jupyter":
            raise ConfigurationError("--check is for the jupyter backend (it asks the server).")
        _check_server(
            args.url, token.strip() if token else read_token(token_file or ""), args.remote_kernel
        )
    if token is not None:
        token_file = str(kernelspec.save_token(name, token))
    extra = [_checked_option(option) for option in args.option]
    if args.startup_timeout is not None:
        extra.append(f"--startup-timeout={args.startup_timeout}")
    elif backend == "colab":
        extra.append("--startup-timeout=300")  # assigning a runtime can take minutes
    if args.gpu is not None or args.high_memory:
        if backend != "colab":
            raise ConfigurationError("--gpu and --high-memory are for the colab backend.")
        if args.gpu is not None:
            extra.append(f"--gpu={args.gpu}")
        if args.high_memory:
            extra.append("--high-memory=True")
    argv = kernelspec.make_argv(
        backend,
        url=args.url,
        remote_kernel=args.remote_kernel,
        token_file=token_file,
        extra=extra,
    )
    spec = kernelspec.make_kernel_dict(
        argv,
        args.display_name or kernelspec.DEFAULT_DISPLAY_NAMES[backend],
        backend=backend,
        interrupt_mode=args.interrupt_mode,
        provisioner=args.provisioner,
    )
    prefix = sys.prefix if args.sys_prefix else args.prefix
    path = kernelspec.install(spec, name, user=args.user, prefix=prefix)
    print(f"Installed kernelspec {name} in {path}")
    if backend == "jupyter" and not token_file:
        print("The kernel reads the server's token from CGPU_TOKEN in the frontend's environment.")
    return 0


def _check_server(url: str | None, token: str | None, remote_kernel: str | None) -> None:
    """``install --check``: ask the server for its kernelspecs with the token now, so a wrong URL
    or token shows at install rather than at the first cell (raises the backend's own error)."""
    if not url:
        raise ConfigurationError(
            "The jupyter backend needs --url, the remote Jupyter server's base URL."
        )

    async def check() -> None:
        client = JupyterServerClient(url, token, request_timeout=15.0, timeout_option="")
        try:
            specs = await client.call("GET", "api/kernelspecs")
        finally:
            client.close()
        names = sorted(specs.get("kernelspecs", {})) if isinstance(specs, dict) else []
        wanted = remote_kernel or "python3"
        if wanted not in names:
            raise ConfigurationError(
                f"The server at {safe_url(url)} has no kernelspec named {wanted!r} (it has"
                f" {', '.join(names) or 'none'}): give one with --remote-kernel. Nothing was"
                " installed."
            )
        print(f"Checked {safe_url(url)}: the token works and it has the kernelspec {wanted!r}.")

    asyncio.run(check())


def _list(args: argparse.Namespace) -> int:
    specs = kernelspec.list_specs()
    if args.json:
        print(json.dumps(specs, indent=2))
    elif not specs:
        print("No cgpu kernelspecs installed. Add one with `cgpu-kernel install`.")
    else:
        width = max(len(s["name"]) for s in specs)
        for spec in specs:
            print(f"{spec['name']:<{width}}  {spec['backend']:<8} {spec['resource_dir']}")
    return 0


def _remove(args: argparse.Namespace) -> int:
    for name in args.names:
        print(f"Removed {kernelspec.remove(name)}")
    return 0


def _reclaim(args: argparse.Namespace) -> int:
    async def reclaim() -> int:
        urls = sorted({r["url"] for r in registry.records() if not registry.owner_alive(r)})
        if not urls:
            print("No remote kernels left behind by dead cgpu kernels.")
            return 0
        failures = 0
        # the same trust as the kernels that started them: a private CA for an https server
        ca_certs = args.ca_certs or os.environ.get("CGPU_CA_CERTS") or None
        for url in urls:
            # --token-file, CGPU_TOKEN_FILE, the token file of the kernelspec for this server,
            # else CGPU_TOKEN (read_token's fallback)
            token_file = (
                args.token_file
                or os.environ.get("CGPU_TOKEN_FILE", "")
                or kernelspec.token_file_for_url(url)
                or ""
            )
            client = JupyterServerClient(url, read_token(token_file), ca_certs=ca_certs)
            try:
                done = await registry.reclaim_orphans(client)
            finally:
                client.close()
            left = [
                r for r in registry.records() if r["url"] == url and not registry.owner_alive(r)
            ]
            print(f"{safe_url(url)}: deleted {len(done)} kernel(s), {len(left)} left")
            failures += len(left)
        return 1 if failures else 0

    return asyncio.run(reclaim())


def _outputs(args: argparse.Namespace) -> int:
    configured = args.spool_dir or os.environ.get("CGPU_SPOOL_DIR")
    root = Path(configured) if configured else paths.default_spool_root()
    if args.action == "clean":
        removed = spool.clean(root, max_age_days=args.older_than, max_total_bytes=1 << 62)
        print(f"Deleted {len(removed)} saved output file(s) from {root}")
        return 0
    files = spool.spooled_files(root)
    if args.action == "show":
        if not files:
            print(f"No saved outputs in {root}.", file=sys.stderr)
            return 1
        wanted = args.name or files[-1].name
        matches = [p for p in files if p.name == wanted or str(p) == wanted]
        if not matches:
            print(
                f"No saved output named {wanted!r}; `cgpu-kernel outputs` lists them.",
                file=sys.stderr,
            )
            return 1
        with matches[-1].open("rb") as handle:
            while chunk := handle.read(1 << 20):
                sys.stdout.buffer.write(chunk)
        return 0
    rows = [
        {"path": str(p), "bytes": p.stat().st_size, "modified": p.stat().st_mtime} for p in files
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"No saved outputs in {root}.")
    else:
        for row in rows:
            print(f"{row['bytes']:>14,}  {row['path']}")
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    rows = trait_reference(ProxyKernel)
    print("| Option | Type | Default | Environment | Description |")
    print("|---|---|---|---|---|")
    for row in rows:
        env = f"`{row['env']}`" if row["env"] else ""
        print(f"| `{row['option']}` | {row['type']} | `{row['default']}` | {env} | {row['help']} |")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from cgpu_kernel.cli.demo import run_demo  # lazy: start-up time (see the top)

    return run_demo(args.notebook, timeout=args.timeout)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cgpu-kernel",
        description="Use a remote GPU kernel (Colab, any Jupyter server) from any Jupyter tool.",
    )
    parser.add_argument("--version", action="version", version=f"cgpu-kernel {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    install = commands.add_parser("install", help="install a kernelspec")
    where = install.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true", help="install into sys.prefix")
    where.add_argument("--prefix", help="install into PREFIX/share/jupyter/kernels")
    install.add_argument(
        "--name",
        help="kernelspec name (default: cgpu-local, cgpu-jupyter, or colab-gpu for colab)",
    )
    install.add_argument("--display-name", help="name shown in kernel pickers")
    install.add_argument(
        "--backend",
        choices=kernelspec.BACKENDS,
        default="local",
        help="local: a private Jupyter server on this machine; jupyter: any Jupyter server or"
        " gateway (--url); colab: a Google Colab runtime (default: %(default)s)",
    )
    install.add_argument("--url", help="remote Jupyter server base URL (jupyter backend)")
    install.add_argument("--remote-kernel", help="kernelspec on the remote (default python3)")
    install.add_argument("--token-file", help="file holding the remote server's token")
    install.add_argument(
        "--token-stdin",
        action="store_true",
        help="read the token from stdin into a private 0600 file and use that",
    )
    install.add_argument(
        "--interrupt-mode",
        choices=("message", "signal"),
        default="message",
        help="how frontends interrupt the kernel: message (interrupt_request, relayed to the"
        " remote) or signal (SIGINT to the proxy) (default: %(default)s)",
    )
    install.add_argument(
        "--startup-timeout",
        type=float,
        help="seconds the remote kernel may take to be ready (default 60; 300 for colab)",
    )
    install.add_argument(
        "--provisioner",
        nargs="?",
        const="cgpu-provisioner",
        help="let jupyter_client frontends manage the runtime (cgpu-provisioner); VS Code"
        " ignores it",
    )
    install.add_argument(
        "--gpu", help="colab: accelerator (T4, L4, A100, H100, a TPU such as V28, or none)"
    )
    install.add_argument("--high-memory", action="store_true", help="colab: high-memory machine")
    install.add_argument(
        "--check",
        action="store_true",
        help="jupyter backend: ask the server now (URL, token, remote kernelspec) and install"
        " nothing if it fails; off by default, so an offline install still works",
    )
    install.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any kernel option baked into the kernelspec, e.g. max-output-bytes=5000000"
        " (repeatable; `cgpu-kernel config-reference` lists them), or a KERNEL_* variable for"
        " the remote kernel's start request, e.g. KERNEL_IMAGE=... for Enterprise Gateway",
    )
    install.set_defaults(func=_install)

    listing = commands.add_parser("list", help="list installed cgpu kernelspecs")
    listing.add_argument("--json", action="store_true", help="print a JSON list instead")
    listing.set_defaults(func=_list)

    remove = commands.add_parser("remove", help="remove cgpu kernelspecs")
    remove.add_argument(
        "names",
        nargs="+",
        metavar="NAME",
        help="kernelspec to remove (`cgpu-kernel list` shows them); a token file that"
        " `install --token-stdin` saved for it is deleted too",
    )
    remove.set_defaults(func=_remove)

    demo = commands.add_parser(
        "demo", help="run examples/quickstart.ipynb through the proxy on a private local server"
    )
    demo.add_argument("--notebook", help="notebook to run instead of the quickstart")
    demo.add_argument("--timeout", type=float, default=120.0, help="seconds per cell")
    demo.set_defaults(func=_demo)

    reclaim = commands.add_parser(
        "reclaim", help="delete remote kernels left running by cgpu kernels that were killed"
    )
    reclaim.add_argument(
        "--token-file",
        help="token file (default: CGPU_TOKEN_FILE, else the token file of the installed"
        " kernelspec for that server, else CGPU_TOKEN)",
    )
    reclaim.add_argument(
        "--ca-certs",
        help="CA bundle (PEM) to verify an https server with (else CGPU_CA_CERTS)",
    )
    reclaim.set_defaults(func=_reclaim)

    outputs = commands.add_parser(
        "outputs", help="list, print or clean output held back by the output limits"
    )
    outputs.add_argument("action", nargs="?", choices=("list", "show", "clean"), default="list")
    outputs.add_argument("name", nargs="?", help="file name or path for `show` (default: newest)")
    outputs.add_argument("--json", action="store_true")
    outputs.add_argument(
        "--older-than",
        type=float,
        default=7.0,
        help="`clean` deletes files older than this many days (default 7; 0: all)",
    )
    outputs.add_argument(
        "--spool-dir", help="spool folder (default: CGPU_SPOOL_DIR, else the kernel's default)"
    )
    outputs.set_defaults(func=_outputs)

    reference = commands.add_parser("config-reference", help="print the option table (Markdown)")
    reference.set_defaults(func=_config_reference)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(commands)
    return parser


def _is_kernel_launch(args: list[str]) -> bool:
    """True for ``-f CONNECTION_FILE ...`` (a frontend starting the kernel), not a subcommand."""
    if not args or not args[0].startswith("-"):
        return False  # a subcommand
    return kernelspec.argv_option(args, *kernelspec.CONNECTION_FILE_OPTIONS) is not None


def main(argv: list[str] | None = None) -> None:
    args_list = sys.argv[1:] if argv is None else argv
    if _is_kernel_launch(args_list):
        from cgpu_kernel.proxy.app import launch_kernel  # lazy: start-up time (see the top)

        launch_kernel(args_list)
        return
    parser = build_parser()
    if not args_list:  # a bare `cgpu-kernel`: what it can do, not a usage error
        parser.print_help()
        raise SystemExit(0)
    _refuse_unknown_command(parser, args_list[0])
    args = parser.parse_args(args_list)
    try:
        code: Any = args.func(args)
    except CgpuError as exc:
        print(f"cgpu-kernel: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except BrokenPipeError:
        code = _closed_pipe()
    except KeyboardInterrupt:
        print("\ncgpu-kernel: interrupted.", file=sys.stderr)
        raise SystemExit(130) from None
    if args.command == "run" and isinstance(code, int):
        exit_now(code)  # its kernel is shut down and its result printed (see fast_exit)
    raise SystemExit(code)


def _refuse_unknown_command(parser: argparse.ArgumentParser, first: str) -> None:
    """A mistyped subcommand gets "did you mean" (argparse only lists the choices)."""
    if first.startswith("-"):
        return
    commands = next(
        (a for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
        None,
    )
    if commands is None or first in commands.choices:
        return
    close = difflib.get_close_matches(first, list(commands.choices), n=1)
    hint = f" Did you mean `cgpu-kernel {close[0]}`?" if close else ""
    print(
        f"cgpu-kernel: unknown command {first!r}.{hint} `cgpu-kernel --help` lists them.",
        file=sys.stderr,
    )
    raise SystemExit(2)


def _closed_pipe() -> int:
    """Our stdout's reader went away (``| head``): a normal end, as for any command-line tool.

    stdout is pointed at /dev/null so that the interpreter's last flush cannot fail too (it
    would print "Exception ignored ... BrokenPipeError"). Exit status 0: the reader had all
    it wanted."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    finally:
        os.close(devnull)
    return 0
