"""The ``run``, ``sessions`` and ``logs`` subcommands (registered by ``cli.build_parser``).

``cli`` imports this module and calls :func:`register` with its subparsers object; each parser
sets ``func`` to a function taking the parsed namespace and returning the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import IO, Any

from cgpu_kernel.run import history, report, runner, sessions
from cgpu_kernel.run.execution import Output
from cgpu_kernel.run.outcomes import BY_CATEGORY, ERROR_CODES, RunResult


def register(commands: Any) -> None:
    """Add ``run``, ``sessions`` and ``logs`` to ``commands`` (argparse's subparsers object)."""
    run = commands.add_parser(
        "run",
        help="run Python code on a cgpu kernel (from the shell or CI)",
        description="Run code on a cgpu kernel and exit with a status that says what happened"
        " (see docs/run.md for the error codes). Each run starts a fresh kernel unless"
        " --session NAME is given.",
        epilog="error codes (JSON errorCode -> exit status):\n"
        + "\n".join(
            f"  {e.code:>4} {e.category:<15} exit {e.exit_status:>2}  {e.meaning}"
            for e in ERROR_CODES
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "code",
        nargs="?",
        help="the code to run; '-' reads it from stdin; the path of an existing file runs that"
        " file (like -f)",
    )
    run.add_argument("-f", "--file", help="read the code from FILE ('-': stdin)")
    run.add_argument(
        "--kernel",
        metavar="NAME",
        help="cgpu kernelspec (default: cgpu-local when installed, else the first local-backend"
        " one, else the first installed; the one used is printed on stderr)",
    )
    run.add_argument("--json", action="store_true", help="print one JSON document at the end")
    run.add_argument(
        "--max-output",
        type=int,
        metavar="CHARS",
        help="hold back stream output past CHARS characters per run (saved to the spool; the"
        " JSON says truncated and where). Default: no limit, every byte is delivered",
    )
    run.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=0.0,
        help="seconds the code may run before it is interrupted (error 1003); 0: no limit",
    )
    run.add_argument(
        "--kernel-timeout",
        type=float,
        metavar="SECONDS",
        help="seconds to wait for the kernel to be ready (default: the kernelspec's own"
        f" --startup-timeout, else {runner.FIRST_START_TIMEOUT:g}, for a new kernel;"
        f" {runner.REUSE_TIMEOUT:g} for a running session)",
    )
    run.add_argument(
        "--session", metavar="NAME", help="run in the named kernel kept alive between runs"
    )
    run.add_argument(
        "--no-syntax-check",
        dest="syntax_check",
        action="store_false",
        help="send the code without checking its Python syntax here first",
    )
    run.set_defaults(func=run_command)

    session_parser = commands.add_parser("sessions", help="list or stop named run sessions")
    actions = session_parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="list sessions")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=sessions_list)
    stopping = actions.add_parser("stop", help="stop sessions (their remote kernels are deleted)")
    stopping.add_argument("names", nargs="*", metavar="NAME")
    stopping.add_argument("--all", action="store_true", help="stop every session")
    stopping.set_defaults(func=sessions_stop)

    logs = commands.add_parser("logs", help="show the local execution history and statistics")
    logs.add_argument("-n", type=int, default=20, help="how many records (default 20; 0: all)")
    logs.add_argument("--status", choices=("ok", "error"), help="only records with this status")
    logs.add_argument("--json", action="store_true", help="JSON instead of a table")
    logs.add_argument("--stats", action="store_true", help="statistics over the whole history")
    logs.set_defaults(func=logs_command)


def read_code(args: argparse.Namespace) -> str | None:
    """The code to run, or None when it was given in two ways (or none).

    A single argument naming an existing file (one line, no newline) runs that file, as
    ``-f`` would: ``cgpu-kernel run train.py`` means the script, not the expression."""
    if args.file and args.code is not None:
        return None
    if args.file:
        if args.file == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        return Path(args.file).read_text(encoding="utf-8")
    if args.code == "-":
        return sys.stdin.buffer.read().decode("utf-8")
    if names_file(args.code):
        args.file = args.code
        return Path(args.code).read_text(encoding="utf-8")
    return args.code  # type: ignore[no-any-return]


def names_file(code: str | None) -> bool:
    """Whether the code argument is really the path of an existing file."""
    if not code or "\n" in code or len(code) > 4096:
        return False
    try:
        return Path(code).is_file()
    except (OSError, ValueError):
        return False


def color_allowed(stream: IO[str]) -> bool:
    """ANSI colours only for a terminal, and never with NO_COLOR set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def run_command(args: argparse.Namespace) -> int:
    result: RunResult | None = None
    try:
        code = read_code(args)
    except (OSError, UnicodeDecodeError) as exc:
        result = RunResult(kernel=args.kernel, session=args.session).fail(
            "configuration", "UsageError", f"Cannot read the code: {exc}."
        )
        code = None
    if result is None and code is None:
        result = RunResult(kernel=args.kernel, session=args.session).fail(
            "configuration",
            "UsageError",
            "Give the code as an argument, with -f FILE, or '-' to read it from stdin (one of"
            " them).",
        )
    if args.max_output is not None and args.max_output < 0:
        result = RunResult(kernel=args.kernel, session=args.session).fail(
            "configuration", "UsageError", "--max-output is a number of characters, 0 or more."
        )
    output = Output(stream=not args.json, color=color_allowed(sys.stderr))
    try:
        if result is None:
            assert code is not None
            options = runner.RunOptions(
                code=code,
                kernel=args.kernel,
                timeout=args.timeout or None,
                kernel_timeout=args.kernel_timeout,
                session=args.session,
                stream=not args.json,
                syntax_check=args.syntax_check,
                max_output=args.max_output,
                announce=True,
            )
            try:
                result = runner.run(options, output)
            except KeyboardInterrupt:
                print("cgpu-kernel: interrupted; the kernel was shut down.", file=sys.stderr)
                return 130
        if args.json:
            report.write_json(result, sys.stdout, output)
        else:
            report.print_summary(result, sys.stderr)
    finally:
        output.close()
    return result.exit_status


def sessions_list(args: argparse.Namespace) -> int:
    found = sessions.list_sessions()
    if args.json:
        print(json.dumps(found, indent=2))
    elif not found:
        print("No sessions. `cgpu-kernel run --session NAME CODE` starts one.")
    else:
        for state in found:
            alive = "running" if state["alive"] else "dead"
            print(f"{state['name']}  {state['kernel']}  pid {state['pid']}  {alive}  since"
                  f" {state.get('started', '?')}")  # fmt: skip
    return 0


def sessions_stop(args: argparse.Namespace) -> int:
    names = [s["name"] for s in sessions.list_sessions()] if args.all else args.names
    if not names and not args.all:
        print("Name the sessions to stop, or give --all.", file=sys.stderr)
        return 2
    for name in names:
        stopped = sessions.stop(name)
        print(f"Stopped session {name}" if stopped else f"Session {name} was not running")
    return 0


def _format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _format_rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def logs_command(args: argparse.Namespace) -> int:
    records = history.read_records()
    if args.status:
        records = [r for r in records if r.get("status") == args.status]
    if args.stats:
        stats = history.compute_stats(records)
        if args.json:
            print(json.dumps(stats, indent=2))
        else:
            print_stats(stats)
        return 0
    shown = records[-args.n :] if args.n > 0 else records
    if args.json:
        print(json.dumps(shown, indent=2))
        return 0
    if not shown:
        print(f"No executions recorded in {history.history_path()}.")
        return 0
    rows = [
        (
            str(r.get("time", "?")),
            str(r.get("kernel", "?")),
            str(r.get("source", "?")),
            str(r.get("status", "?")),
            str(r.get("category") or ""),
            _format_ms(r.get("duration_ms")),
            _format_ms(r.get("total_ms")),
            f"{r.get('output_bytes', 0)} B",
            str(r.get("reconnects", 0)),
        )
        for r in shown
    ]
    header = (
        "time", "kernel", "source", "status", "category", "duration", "wall", "output",
        "reconnects",
    )  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    right = {5, 6, 7, 8}  # numbers line up on the right
    for row in [header, *rows]:
        cells = [
            cell.rjust(width) if index in right else cell.ljust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        print("  ".join(cells).rstrip())
    return 0


def print_stats(stats: dict[str, Any]) -> None:
    print(f"executions:        {stats['executions']} ({stats['ok']} ok, {stats['errors']} errors)")
    print(f"success rate:      {_format_rate(stats['success_rate'])}")
    print(f"timeout rate:      {_format_rate(stats['timeout_rate'])}")
    duration = stats["duration_ms"]
    print(
        f"duration:          mean {_format_ms(duration['mean'])}, p95 {_format_ms(duration['p95'])}"
    )
    startup = stats["startup_ms"]
    print(
        f"kernel startup:    mean {_format_ms(startup['mean'])}, p95 {_format_ms(startup['p95'])}"
        f" ({startup['count']} starts)"
    )
    per = stats["reconnects_per_session"]
    print(
        f"reconnects:        {stats['reconnects']} in {stats['sessions']} sessions"
        f" ({'-' if per is None else f'{per:.2f}'} per session)"
    )
    errors = stats["errors_by_category"]
    print("errors by category:" + ("" if errors else " none"))
    for category, count in errors.items():
        code = BY_CATEGORY[category].code if category in BY_CATEGORY else "?"
        print(f"  {category:<15} {count:>5}  (code {code})")
