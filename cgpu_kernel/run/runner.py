"""``cgpu-kernel run``: execute code once on a cgpu kernel, for shells, scripts and CI.

The run is an ordinary ``jupyter_client`` frontend: it resolves an installed cgpu kernelspec,
checks the code's Python syntax locally (``syntax``), then either launches the proxy kernel from
the kernelspec or attaches to a named session's kernel (``sessions`` keeps those alive), sends
one ``execute_request`` (``execution``), and classifies the outcome into one of the error codes
of ``outcomes``. ``run.cli`` calls :func:`run` and prints the result with ``report``; the same
codes, categories and exit statuses are documented in ``docs/run.md``.
"""

from __future__ import annotations

import os
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import IO, Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import KernelManager

from cgpu_kernel import kernelspec
from cgpu_kernel.exceptions import CgpuError, ConfigurationError
from cgpu_kernel.run import history, sessions
from cgpu_kernel.run.execution import Execution, Output, wait_ready
from cgpu_kernel.run.outcomes import RunResult, suggest
from cgpu_kernel.run.syntax import check_syntax, is_python

#: --kernel-timeout defaults: a fresh kernel (remote start included) and a live session.
FIRST_START_TIMEOUT = 60.0
REUSE_TIMEOUT = 15.0


@dataclass
class RunOptions:
    """What ``cgpu-kernel run`` was asked to do (``run.cli`` builds it from the arguments)."""

    code: str
    kernel: str | None = None
    timeout: float | None = None
    kernel_timeout: float | None = None
    session: str | None = None
    stream: bool = True
    syntax_check: bool = True


def run(options: RunOptions) -> RunResult:
    """One run, start to end; records itself in the history. Never raises a CgpuError."""
    started = time.monotonic()
    result = RunResult(kernel=options.kernel, session=options.session)
    try:
        _run(options, result)
    except CgpuError as exc:
        result.fail(exc.category, exc.ename, str(exc))
    except Exception as exc:  # a bug or an unforeseen failure: still one well-formed result
        result.fail(
            "unknown",
            type(exc).__name__,
            f"cgpu-kernel run failed unexpectedly: {exc}. Please report it with the traceback.",
            traceback_lines=traceback.format_exception(type(exc), exc, exc.__traceback__),
        )
    result.total_ms = (time.monotonic() - started) * 1000
    if result.error is not None:
        result.error["suggestion"] = suggest(
            result.category,
            str(result.error["name"]),
            str(result.error["message"]),
            timeout=options.timeout,
            session=options.session is not None,
        )
        if result.category == "syntax" and "line" in result.error:
            result.error["suggestion"] += (
                " It was checked here and nothing was sent to the kernel; --no-syntax-check"
                " sends it anyway."
            )
    history.record_execution(
        result.kernel or "?",
        result.duration_ms,
        result.status,
        None if result.status == "ok" else result.category,
        result.output_bytes(),
        0,
        result.startup_ms,
        source="run",
        session=f"session:{options.session}" if options.session else f"run-{os.getpid()}",
        queue_ms=result.queue_ms,
    )
    return result


def resolve_kernel(name: str | None) -> tuple[str, dict[str, Any]]:
    """The kernelspec to run on: ``name``, or the first installed cgpu kernelspec."""
    if name is None:
        specs = kernelspec.list_specs()
        if not specs:
            raise ConfigurationError(
                "No cgpu kernelspec is installed. Install one with `cgpu-kernel install`, or name"
                " one with --kernel NAME."
            )
        name = str(specs[0]["name"])
    try:
        spec = KernelSpecManager().get_kernel_spec(name).to_dict()
    except NoSuchKernel:
        raise ConfigurationError(
            f"No kernelspec named {name!r}. `cgpu-kernel list` shows the installed cgpu ones."
        ) from None
    if not kernelspec.is_cgpu_spec(spec):
        raise ConfigurationError(
            f"{name!r} is not a cgpu kernelspec. `cgpu-kernel list` shows the cgpu ones."
        )
    return name, spec


def first_start_timeout(spec: dict[str, Any], requested: float | None) -> tuple[float, list[str]]:
    """How long a new kernel may take, and the proxy arguments that say so.

    ``--kernel-timeout`` when given (passed on to the proxy as ``--startup-timeout``); else the
    kernelspec's own ``--startup-timeout`` (a Colab kernelspec's is 300 s), else 60 s.
    """
    if requested:
        return requested, [f"--startup-timeout={requested:g}"]
    argv = [str(a) for a in spec.get("argv", [])]
    value = kernelspec.argv_option(argv, "--startup-timeout", "--ProxyKernel.startup_timeout")
    try:
        return (float(value) if value else FIRST_START_TIMEOUT), []
    except ValueError:
        return FIRST_START_TIMEOUT, []


def _run(options: RunOptions, result: RunResult) -> None:
    kernel_name = options.kernel
    if options.session:
        kernel_name = sessions.kernel_for(options.session, options.kernel)
    name, spec = resolve_kernel(kernel_name)
    result.kernel = name
    if options.syntax_check and is_python(spec):
        problem = check_syntax(options.code)
        if problem is not None:
            where = f"line {problem['line']}, column {problem['column']}"
            result.fail(
                "syntax",
                problem["name"],
                f"{problem['message']} ({where})",
                traceback_lines=problem["traceback"],
            )
            assert result.error is not None
            result.error.update(line=problem["line"], column=problem["column"])
            return
    output = Output(options.stream)
    first_start = first_start_timeout(spec, options.kernel_timeout)
    if options.session:
        _run_in_session(options, name, first_start, result, output)
    else:
        _run_on_fresh_kernel(options, name, first_start, result, output)


def _run_on_fresh_kernel(
    options: RunOptions,
    name: str,
    first_start: tuple[float, list[str]],
    result: RunResult,
    output: Output,
) -> None:
    """Launch the proxy kernel from kernelspec ``name``, run the code, shut the kernel down."""
    kernel_timeout, startup_args = first_start
    km = KernelManager(kernel_name=name)
    launched = time.monotonic()
    # The kernel's own log (and a provisioner's server's) would mix into the run's stderr.
    with tempfile.TemporaryFile() as kernel_log:
        try:
            km.start_kernel(
                env=history.suppressed_env(),  # the run records itself, the kernel must not
                extra_arguments=startup_args,
                stdout=kernel_log,
                stderr=kernel_log,
            )
        except OSError as exc:
            raise ConfigurationError(
                f"Could not launch the kernelspec {name!r}: {exc}. Check its argv with"
                " `jupyter kernelspec list`, or reinstall it with `cgpu-kernel install`."
            ) from None
        kc = km.client()
        try:
            kc.start_channels()
            if wait_ready(kc, kernel_timeout + 10, km.is_alive, result):
                result.startup_ms = (time.monotonic() - launched) * 1000
                Execution(kc, result, output, options.timeout, km.is_alive).run(options.code)
        finally:
            kc.stop_channels()
            if km.has_kernel:
                km.shutdown_kernel(now=not km.is_alive())
            else:
                km.cleanup_resources()
        attach_log_tail(result, kernel_log)


def _run_in_session(
    options: RunOptions,
    kernel: str,
    first_start: tuple[float, list[str]],
    result: RunResult,
    output: Output,
) -> None:
    """``cgpu-kernel run --session NAME``: attach to the session's kernel and run the code.

    ``first_start``: the deadline for a new kernel and the proxy arguments that set it."""
    assert options.session is not None
    begun = time.monotonic()
    state, fresh = sessions.ensure(options.session, kernel, *first_start)
    timeout = first_start[0] if fresh else (options.kernel_timeout or REUSE_TIMEOUT)
    kc = BlockingKernelClient(connection_file=str(state["connection_file"]))
    kc.load_connection_file()

    def alive() -> bool:
        return sessions.host_alive(state)

    try:
        kc.start_channels()
        if not wait_ready(kc, timeout, alive, result):
            return
        result.startup_ms = (time.monotonic() - begun) * 1000
        Execution(kc, result, output, options.timeout, alive).run(options.code)
    finally:
        kc.stop_channels()


def attach_log_tail(result: RunResult, kernel_log: IO[bytes], lines: int = 20) -> None:
    """When the kernel itself failed, the end of its log is the traceback worth showing."""
    if result.error is None or result.category not in ("kernel_lost", "kernel_timeout"):
        return
    kernel_log.seek(0)
    tail = kernel_log.read().decode("utf-8", "replace").splitlines()[-lines:]
    if tail and not result.error["traceback"]:
        result.error["traceback"] = tail
