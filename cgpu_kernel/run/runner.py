"""``cgpu-kernel run``: execute code once on a cgpu kernel, for shells, scripts and CI.

The run is an ordinary ``jupyter_client`` frontend: it resolves an installed cgpu kernelspec,
checks the code's Python syntax locally (``syntax``), then either launches the proxy kernel from
the kernelspec or attaches to a named session's kernel (``sessions`` keeps those alive), sends
one ``execute_request`` (``execution``), and classifies the outcome into one of the error codes
of ``outcomes``. ``run.cli`` calls :func:`run` and prints the result with ``report``; the same
codes, categories and exit statuses are documented in ``docs/run.md``. A fresh run's proxy on
the local backend uses the warm local server (:func:`proxy_env`, ``backends.warm_server``).
"""

from __future__ import annotations

import contextlib
import difflib
import io
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import IO, Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import KernelManager

from cgpu_kernel import kernelspec
from cgpu_kernel.backends.base import LAUNCH_SLACK
from cgpu_kernel.backends.http import safe_url
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
    #: --max-output: stream characters a cell may write before the proxy holds the rest back
    #: (saved in its spool, said in the JSON); None: no limit, every byte is delivered.
    max_output: int | None = None
    #: say on stderr which kernelspec runs the code (the CLI does; tests of the API need not)
    announce: bool = False


#: What "no limit" is for the proxy's output limits under ``run``: they protect notebook
#: frontends; a shell redirect or a CI log wants every byte.
NO_LIMIT = 1 << 62


def output_limit_args(max_output: int | None) -> list[str]:
    """Proxy arguments for ``run``'s output limits: off unless ``--max-output`` asked for one
    (then for stream output only; rich outputs are never held back under ``run``)."""
    stream_limit = NO_LIMIT if max_output is None else max_output
    return [
        f"--max-output-bytes={stream_limit}",
        f"--max-rich-output-bytes={NO_LIMIT}",
        f"--max-rich-item-bytes={NO_LIMIT}",
    ]


def run(options: RunOptions, output: Output | None = None) -> RunResult:
    """One run, start to end; records itself in the history. Never raises a CgpuError.

    ``output`` receives what the code writes as it arrives (the CLI passes one so that
    ``report.write_json`` can copy the captured streams); by default one is made here.
    A BrokenPipeError (our stdout's reader went away) is raised after the kernel is shut down.
    """
    started = time.monotonic()
    result = RunResult(kernel=options.kernel, session=options.session)
    own_output = output is None
    if output is None:
        output = Output(options.stream)
    resolved: dict[str, Any] = {}
    try:
        _run(options, result, output, resolved)
    except BrokenPipeError:
        raise
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
    result.notices = output.notices
    result.streamed_bytes = output.bytes_written
    if own_output and not options.stream:  # nobody will read the capture: keep it in the result
        result.stdout = (output.read("stdout") or io.StringIO()).read()
        result.stderr = (output.read("stderr") or io.StringIO()).read()
        result.streamed_bytes = 0
    if own_output:
        output.close()
    if result.error is not None:
        if result.kernel and result.category in KERNELSPEC_CATEGORIES:
            result.error["kernelspec"] = result.kernel
        result.error["suggestion"] = suggest(
            result.category,
            str(result.error["name"]),
            str(result.error["message"]),
            timeout=options.timeout,
            session=options.session is not None,
        )
        if result.category == "auth" and "spec" in resolved:
            result.error["suggestion"] = token_advice(str(result.kernel), resolved["spec"])
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
        total_ms=result.total_ms,
    )
    return result


#: Errors whose cause is the kernelspec's target: the message names the kernelspec.
KERNELSPEC_CATEGORIES = ("connection", "auth", "remote_start", "kernel_timeout", "kernel_lost")


def default_kernel(specs: list[dict[str, Any]]) -> str:
    """The kernelspec ``run`` uses without --kernel (docs/run.md, "Which kernel runs"):
    ``cgpu-local`` when installed, else the first with the local backend, else the first
    installed (alphabetically)."""
    names = [str(spec["name"]) for spec in specs]
    if "cgpu-local" in names:
        return "cgpu-local"
    local = [str(spec["name"]) for spec in specs if spec.get("backend") == "local"]
    return local[0] if local else names[0]


#: Names that ``--kernel`` also accepts: the colab kernelspec is installed as ``colab-gpu`` (its
#: name since the first release), while every other default name is ``cgpu-<backend>``.
ALIASES = {"cgpu-colab": "colab-gpu"}


def _installed_names() -> set[str]:
    return set(KernelSpecManager().find_kernel_specs())


def resolve_kernel(name: str | None) -> tuple[str, dict[str, Any]]:
    """The kernelspec to run on: ``name``, or :func:`default_kernel` of the installed ones."""
    if name is None:
        specs = kernelspec.list_specs()
        if not specs:
            raise ConfigurationError(
                "No cgpu kernelspec is installed. Install one with `cgpu-kernel install`, or name"
                " one with --kernel NAME."
            )
        name = default_kernel(specs)
    name = ALIASES.get(name, name) if name not in _installed_names() else name
    try:
        spec = KernelSpecManager().get_kernel_spec(name).to_dict()
    except NoSuchKernel:
        installed = [str(spec["name"]) for spec in kernelspec.list_specs()]
        close = difflib.get_close_matches(name, installed, n=1, cutoff=0.5)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigurationError(
            f"No kernelspec named {name!r}.{hint} `cgpu-kernel list` shows the installed cgpu ones."
        ) from None
    if not kernelspec.is_cgpu_spec(spec):
        raise ConfigurationError(
            f"{name!r} is not a cgpu kernelspec. `cgpu-kernel list` shows the cgpu ones."
        )
    return name, spec


def describe(name: str, spec: dict[str, Any]) -> str:
    """``'cgpu-x' (jupyter backend, http://host:8888/)``: the kernelspec line on stderr."""
    argv = [str(a) for a in spec.get("argv", [])]
    backend = spec.get("metadata", {}).get("cgpu_kernel", {}).get("backend") or (
        kernelspec.argv_option(argv, *kernelspec.BACKEND_OPTIONS) or "?"
    )
    url = kernelspec.argv_option(argv, "--url", "--ProxyKernel.url")
    return f"{name!r} ({backend} backend{', ' + safe_url(url) if url else ''})"


def first_start_timeout(spec: dict[str, Any], requested: float | None) -> tuple[float, list[str]]:
    """How long a new kernel may take, and the proxy arguments that say so.

    ``--kernel-timeout`` when given (passed on to the proxy as ``--startup-timeout``); else the
    kernelspec's own ``--startup-timeout`` (a Colab kernelspec's is 300 s), else 60 s. Either
    way at least as long as the proxy itself waits when a gateway was told its launch may take
    longer (``KERNEL_LAUNCH_TIMEOUT`` in the kernelspec, else in this environment).
    """
    argv = [str(a) for a in spec.get("argv", [])]
    raw_launch = kernelspec.argv_kernel_env(argv).get(
        "KERNEL_LAUNCH_TIMEOUT", os.environ.get("KERNEL_LAUNCH_TIMEOUT", "")
    )
    try:
        launch = float(raw_launch) + LAUNCH_SLACK if raw_launch else 0.0
    except ValueError:
        launch = 0.0  # the proxy says what is wrong with it, in the cell
    if requested:
        return max(requested, launch), [f"--startup-timeout={requested:g}"]
    value = kernelspec.argv_option(argv, "--startup-timeout", "--ProxyKernel.startup_timeout")
    try:
        return max(float(value) if value else FIRST_START_TIMEOUT, launch), []
    except ValueError:
        return max(FIRST_START_TIMEOUT, launch), []


def token_advice(name: str, spec: dict[str, Any]) -> str:
    """What to do about a refused token: name the source the kernelspec really reads (its token
    file wins over CGPU_TOKEN) and how to replace it."""
    argv = [str(a) for a in spec.get("argv", [])]
    token_file = kernelspec.argv_option(argv, "--token-file", "--ProxyKernel.token_file")
    if token_file:
        return (
            f"The kernelspec {name!r} reads its token from the file {token_file} (it wins over"
            f" CGPU_TOKEN). Replace it: `cgpu-kernel install --token-stdin --name {name} ...`"
            " again with the same options, or write the new token into that file."
        )
    if os.environ.get("CGPU_TOKEN_FILE"):
        return (
            f"The token comes from CGPU_TOKEN_FILE ({os.environ['CGPU_TOKEN_FILE']}), which wins"
            " over CGPU_TOKEN: put the server's token in that file."
        )
    where = "CGPU_TOKEN is set" if os.environ.get("CGPU_TOKEN") else "CGPU_TOKEN is not set"
    return (
        f"The kernelspec {name!r} reads its token from CGPU_TOKEN ({where}): set it to the"
        f" server's token, or save one with `cgpu-kernel install --token-stdin --name {name}`."
    )


def _run(options: RunOptions, result: RunResult, output: Output, resolved: dict[str, Any]) -> None:
    kernel_name = options.kernel
    if options.session:
        kernel_name = sessions.kernel_for(options.session, options.kernel)
    name, spec = resolve_kernel(kernel_name)
    result.kernel = name
    resolved["spec"] = spec
    if options.announce:
        where = f" (session {options.session})" if options.session else ""
        print(f"cgpu-kernel: running on kernelspec {describe(name, spec)}{where}", file=sys.stderr)
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
    timeout, startup_args = first_start_timeout(spec, options.kernel_timeout)
    first_start = (timeout, startup_args + output_limit_args(options.max_output))
    if options.session:
        _run_in_session(options, name, first_start, result, output)
    else:
        _run_on_fresh_kernel(options, name, first_start, result, output)


def proxy_env() -> dict[str, str]:
    """The environment of a fresh run's proxy: ours, with the flag that keeps it from recording
    the cell (the run records itself), and the warm local server unless ``CGPU_LOCAL_SERVER``
    asks for another (``backends.warm_server``: a repeated run skips the server's start)."""
    env = history.suppressed_env()
    env.setdefault("CGPU_LOCAL_SERVER", "warm")
    return env


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
                env=proxy_env(),
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
            if wait_ready(kc, kernel_timeout + 10, km.is_alive, result, fresh=True):
                result.startup_ms = (time.monotonic() - launched) * 1000
                Execution(kc, result, output, options.timeout, km.is_alive).run(options.code)
        finally:
            kc.stop_channels()
            if km.has_kernel:
                shut_down(km)
            else:
                km.cleanup_resources()
        attach_log_tail(result, kernel_log)


def shut_down(km: KernelManager) -> None:
    """``km.shutdown_kernel()``, less its waits: ask, then wait on the proxy's process itself
    (``shutdown_kernel`` polls every 0.1 s), which returns the moment the proxy is gone, having
    deleted its remote kernel. A proxy gone is then only cleaned up: ``shutdown_kernel`` would
    first send it an interrupt, which nobody reads, and ZMQ holds the context's end 0.1 s for
    it (measured). A proxy still there after jupyter_client's own ``shutdown_wait_time`` is
    killed, as ``shutdown_kernel`` would."""
    process = getattr(km.provisioner, "process", None)
    if not isinstance(process, subprocess.Popen):  # not a local process: jupyter_client's way
        km.shutdown_kernel(now=not km.is_alive())
        return
    if process.poll() is None:
        km.request_shutdown()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(km.shutdown_wait_time)
    if process.poll() is None:
        km.shutdown_kernel(now=True)
    else:
        km.cleanup_resources()


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
        if not wait_ready(kc, timeout, alive, result, fresh=fresh):
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
