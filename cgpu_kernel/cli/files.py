"""``cgpu-kernel files upload|download|ls``: the ``%cgpu`` magic from a shell or CI.

``cli.build_parser`` calls :func:`register`. Each command runs the ``%cgpu`` line through
``cgpu-kernel run`` (``run.runner``): a session's kernel with ``--session`` (its proxy and
remote kernel stay), else a fresh kernel of ``--kernel``, so the transfer is the proxy's own,
with the same checks, progress line and errors as in a notebook. Local paths are made absolute
here, against the shell's folder (a session's proxy runs in the folder it was started in).
"""

from __future__ import annotations

import argparse
import glob
import os
import posixpath
import shlex
import sys
from typing import Any

from cgpu_kernel.run import report, runner
from cgpu_kernel.run.execution import Output
from cgpu_kernel.run.outcomes import RunResult


def register(commands: Any) -> None:
    """Add ``files`` (with ``upload``, ``download``, ``ls``) to ``commands``."""
    files = commands.add_parser(
        "files",
        help="copy files to and from a cgpu kernel's remote folder",
        description="The %%cgpu magic from the shell: copy files between this folder and the"
        " remote kernel's (see docs/files.md). With --session NAME the session's kernel is"
        " used, else a fresh one of --kernel, which ends with the command.",
    )
    actions = files.add_subparsers(dest="action", required=True, metavar="ACTION")
    upload = actions.add_parser("upload", help="copy a local file, folder or glob up")
    upload.add_argument("local", help="file, folder or glob (quote globs)")
    upload.add_argument("remote", nargs="?", help="where on the remote (default: same path)")
    download = actions.add_parser("download", help="copy a remote file, folder or glob here")
    download.add_argument("remote", help="remote file, folder or glob (last part)")
    download.add_argument("local", nargs="?", help="where here (default: same path)")
    listing = actions.add_parser("ls", help="list a remote folder")
    listing.add_argument("remote", nargs="?", default="", help="folder (default: the kernel's)")
    for parser in (upload, download, listing):
        parser.add_argument("--kernel", metavar="NAME", help="cgpu kernelspec (as for run)")
        parser.add_argument("--session", metavar="NAME", help="the named run session's kernel")
        parser.add_argument("--kernel-timeout", type=float, metavar="SECONDS", help="as for run")
        parser.set_defaults(func=files_command)


def magic_line(args: argparse.Namespace, cwd: str) -> str:
    """The ``%cgpu`` line for ``args``, local paths absolute against ``cwd``."""
    if args.action == "ls":
        return "%cgpu " + shlex.join(["ls", args.remote or "."])
    if args.action == "upload":
        local = os.path.join(cwd, os.path.expanduser(args.local))
        remote = args.remote
        if remote is None:  # the same relative path, as the magic does in the notebook's folder
            given = args.local
            inside = not os.path.isabs(os.path.expanduser(given))
            relative = os.path.relpath(local, cwd).replace(os.sep, "/")
            if glob.has_magic(given):
                folder = posixpath.dirname(relative) if inside else ""
                remote = (folder + "/") if folder and not glob.has_magic(folder) else "./"
            else:
                remote = relative if inside and not relative.startswith("..") else None
        words = ["upload", local] + ([remote] if remote else [])
    else:
        remote = args.remote
        if args.local is not None:
            local = os.path.join(cwd, os.path.expanduser(args.local))
            if args.local.endswith(("/", os.sep)):
                local += os.sep
        else:  # into the folder the same relative path names (the magic's default)
            folder = "" if remote.startswith("/") else posixpath.dirname(remote.rstrip("/"))
            local = os.path.join(cwd, *[p for p in folder.split("/") if p not in ("", ".")])
            local = local.rstrip(os.sep) + os.sep
        real_cwd = os.path.realpath(cwd)
        inside = args.local is None or not os.path.isabs(os.path.expanduser(args.local))
        if inside and os.path.commonpath([real_cwd, os.path.realpath(local)]) != real_cwd:
            raise SystemExit(
                f"cgpu-kernel files: {local} is outside this folder; give an absolute LOCAL"
                " path to write there."
            )
        words = ["download", remote, local]
    return "%cgpu " + shlex.join(words)


def files_command(args: argparse.Namespace) -> int:
    code = magic_line(args, os.getcwd())
    output = Output(stream=True, color=False)
    try:
        options = runner.RunOptions(
            code=code,
            kernel=args.kernel,
            kernel_timeout=args.kernel_timeout,
            session=args.session,
            syntax_check=False,  # a %cgpu line is the proxy's, not Python
            announce=True,
        )
        try:
            result: RunResult = runner.run(options, output)
        except KeyboardInterrupt:
            print("cgpu-kernel: interrupted; nothing was kept.", file=sys.stderr)
            return 130
        if result.exit_status != 0:
            report.print_summary(result, sys.stderr)
    finally:
        output.close()
    return result.exit_status
