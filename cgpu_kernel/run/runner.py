"""``cgpu-kernel run``: execute code once on a cgpu kernel, for shells, scripts and CI.

The run is an ordinary ``jupyter_client`` frontend: it launches the proxy kernel from an
installed cgpu kernelspec (or attaches to a named session's kernel, see ``sessions``), sends one
``execute_request``, streams or collects what comes back, and classifies the outcome into one of
the error codes below. The same codes, categories and exit statuses are documented in
``docs/run.md``; :data:`ERROR_CODES` is the one table both are checked against.

Python syntax is checked here before anything is started, with IPython's own input transformer,
so magics (``%pip``, ``%%bash``) and ``!`` shell lines are not mistaken for errors.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import re
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_client.manager import KernelManager

from cgpu_kernel import kernelspec
from cgpu_kernel.exceptions import (
    CgpuError,
    ConfigurationError,
    RemoteAuthError,
    RemoteError,
    RemoteKernelGoneError,
    RemoteKernelSpecError,
    RemoteProtocolError,
    RemoteUnreachableError,
    StartupTimeoutError,
)
from cgpu_kernel.run import history


@dataclass(frozen=True)
class ErrorCode:
    code: int
    category: str
    exit_status: int
    meaning: str


#: Every outcome of a run: ``errorCode`` in the JSON, the category, the process exit status.
ERROR_CODES = (
    ErrorCode(0, "ok", 0, "The code ran without an error."),
    ErrorCode(1001, "syntax", 11, "SyntaxError, IndentationError or TabError."),
    ErrorCode(1002, "runtime", 12, "Any other exception raised by the code (NameError, ...)."),
    ErrorCode(1003, "timeout", 13, "Ran longer than --timeout; the cell was interrupted."),
    ErrorCode(1004, "memory", 14, "MemoryError, or the GPU ran out of memory (CUDA OOM)."),
    ErrorCode(1005, "import", 15, "ImportError or ModuleNotFoundError."),
    ErrorCode(1006, "io", 16, "OSError and its kin: FileNotFoundError, PermissionError, ..."),
    ErrorCode(1999, "unknown", 19, "An error that names no exception we can classify."),
    ErrorCode(2001, "connection", 21, "The remote Jupyter server could not be reached."),
    ErrorCode(2002, "auth", 22, "The remote server refused our credentials."),
    ErrorCode(2003, "remote_start", 23, "The remote kernel or runtime could not be started."),
    ErrorCode(2004, "kernel_timeout", 24, "The kernel was not ready within --kernel-timeout."),
    ErrorCode(2005, "kernel_lost", 25, "The kernel died, restarted or was lost mid-run."),
    ErrorCode(2006, "configuration", 26, "No usable kernelspec, session or code was given."),
)
BY_CATEGORY = {entry.category: entry for entry in ERROR_CODES}
CATEGORIES = tuple(entry.category for entry in ERROR_CODES if entry.category != "ok")

#: ``ename`` of the errors the proxy itself reports (see ``exceptions``) -> category.
PROXY_ERRORS = {
    RemoteUnreachableError.ename: "connection",
    RemoteAuthError.ename: "auth",
    RemoteKernelSpecError.ename: "remote_start",
    RemoteProtocolError.ename: "remote_start",
    RemoteError.ename: "remote_start",
    CgpuError.ename: "remote_start",
    ConfigurationError.ename: "configuration",
    StartupTimeoutError.ename: "kernel_timeout",
    RemoteKernelGoneError.ename: "kernel_lost",
    "RemoteConnectionLost": "connection",  # the reconnect budget ran out
    "ColabAuthenticationFailed": "auth",
    "ColabRuntimeGone": "kernel_lost",
    # ColabQuotaExceeded, ColabAssignmentDenied, ... : "remote_start" by their prefix
}
#: Other errors the proxy or a backend reports start with one of these: the remote failed us.
PROXY_PREFIXES = ("Remote", "Colab", "Cgpu")
SYNTAX_ERRORS = {"SyntaxError", "IndentationError", "TabError"}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}
MEMORY_ERRORS = {"MemoryError", "OutOfMemoryError", "ResourceExhaustedError"}
IO_ERRORS = {
    "OSError", "IOError", "EnvironmentError", "FileNotFoundError", "FileExistsError",
    "PermissionError", "IsADirectoryError", "NotADirectoryError", "BlockingIOError",
    "BrokenPipeError", "ChildProcessError", "InterruptedError", "ProcessLookupError",
    "UnsupportedOperation", "ConnectionError", "ConnectionRefusedError", "ConnectionResetError",
    "ConnectionAbortedError", "TimeoutError", "gaierror", "herror", "SSLError",
}  # fmt: skip
CUDA_OOM = re.compile(r"out of memory|CUBLAS_STATUS_ALLOC_FAILED|RESOURCE_EXHAUSTED", re.I)
#: Exceptions that GPU libraries raise for an out-of-memory (PyTorch, JAX, CuPy, TensorFlow).
OOM_CARRIERS = {"RuntimeError", "XlaRuntimeError", "CUDARuntimeError", "InternalError"}

#: Import name -> pip package, where they differ.
PIP_PACKAGES = {
    "cv2": "opencv-python",
    "sklearn": "scikit-learn",
    "skimage": "scikit-image",
    "PIL": "Pillow",
    "yaml": "PyYAML",
    "bs4": "beautifulsoup4",
    "Crypto": "pycryptodome",
    "dateutil": "python-dateutil",
    "dotenv": "python-dotenv",
    "jwt": "PyJWT",
    "magic": "python-magic",
    "serial": "pyserial",
    "usb": "pyusb",
    "git": "GitPython",
    "docx": "python-docx",
    "pptx": "python-pptx",
    "fitz": "PyMuPDF",
    "Levenshtein": "python-Levenshtein",
    "tensorflow_hub": "tensorflow-hub",
    "google.protobuf": "protobuf",
    "attr": "attrs",
    "OpenGL": "PyOpenGL",
    "wx": "wxPython",
    "gi": "PyGObject",
    "zmq": "pyzmq",
    "MySQLdb": "mysqlclient",
    "psycopg2": "psycopg2-binary",
    "faiss": "faiss-cpu",
    "detectron2": "detectron2 (see its install guide)",
}
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NO_MODULE = re.compile(r"No module named '([^']+)'")

#: Seconds an interrupted cell gets to finish before the run gives up on it.
INTERRUPT_GRACE = 15.0
#: --kernel-timeout defaults: a fresh kernel (remote start included) and a live session.
FIRST_START_TIMEOUT = 60.0
REUSE_TIMEOUT = 15.0


def categorize(ename: str, evalue: str = "") -> str:
    """The category of an error reply's ``ename``/``evalue`` (the kernel calls this too)."""
    if not ename:
        return "unknown"
    if ename in PROXY_ERRORS:
        return PROXY_ERRORS[ename]
    if ename.startswith(PROXY_PREFIXES):
        return "remote_start"
    if ename in SYNTAX_ERRORS:
        return "syntax"
    if ename in MEMORY_ERRORS or (ename in OOM_CARRIERS and CUDA_OOM.search(evalue)):
        return "memory"
    if ename in IMPORT_ERRORS:
        return "import"
    if ename in IO_ERRORS:
        return "io"
    return "runtime"


def pip_package(module: str) -> str:
    """The pip package that provides ``module`` (``cv2`` -> ``opencv-python``)."""
    if module in PIP_PACKAGES:
        return PIP_PACKAGES[module]
    top = module.split(".", maxsplit=1)[0]
    return PIP_PACKAGES.get(top, top)


def suggest(
    category: str, ename: str, evalue: str, *, timeout: float | None = None, session: bool = False
) -> str | None:
    """One line saying what to do about an error, or None when there is nothing useful to add."""
    if category == "syntax":
        return "Fix the code at the line and column the error names."
    if category == "import":
        found = NO_MODULE.search(evalue)
        if not found:
            return "Check the package is installed on the remote and matches its Python version."
        package = pip_package(found.group(1))
        return (
            f"Install it on the remote: run `cgpu-kernel run '%pip install {package}'` (or add"
            f" `%pip install {package}` at the top of your code), then run again."
        )
    if category == "memory":
        if ename == "MemoryError":
            return (
                "The remote ran out of RAM: process the data in smaller chunks, free large"
                " objects with `del`, or pick a runtime with more memory."
            )
        return (
            "The GPU ran out of memory: use a smaller batch size or model, free tensors with"
            " `del` and `torch.cuda.empty_cache()`, or pick a GPU with more memory."
        )
    if category == "timeout":
        limit = f"{timeout:g} s" if timeout else "the time limit"
        return (
            f"The code ran longer than {limit} and was interrupted. Raise the limit with"
            " --timeout SECONDS (0 means no limit)."
        )
    if category == "io":
        return (
            "Paths are resolved on the remote machine, not here: check the file exists there"
            " (upload it, or use a path on the remote)."
        )
    if category == "runtime" and ename == "NameError" and not session:
        return (
            "Each run starts a fresh kernel: define the name in the same code, or keep"
            " variables between runs with --session NAME."
        )
    if category == "connection":
        return (
            "Check the remote Jupyter server is running and the kernelspec's URL is right"
            " (`cgpu-kernel list` shows the installed kernelspecs)."
        )
    if category == "auth":
        return "Set CGPU_TOKEN (or the kernelspec's --token-file) to the server's token."
    if category == "kernel_timeout":
        return "Raise --kernel-timeout SECONDS; a first start on a busy remote can take minutes."
    if category == "kernel_lost":
        return "The kernel's state is gone; run again (it starts a fresh kernel)."
    return None


@dataclass
class RunResult:
    """What one run produced; :meth:`to_json` is the documented ``--json`` document."""

    kernel: str | None
    session: str | None = None
    status: str = "ok"
    category: str = "ok"
    stdout: str = ""
    stderr: str = ""
    outputs: list[dict[str, Any]] = field(default_factory=list)
    error: dict[str, Any] | None = None
    execution_count: int | None = None
    duration_ms: float = 0.0
    startup_ms: float | None = None
    queue_ms: float | None = None
    total_ms: float = 0.0
    shown: bool = False  # the error's traceback was already streamed

    @property
    def error_code(self) -> int:
        return BY_CATEGORY[self.category].code

    @property
    def exit_status(self) -> int:
        return BY_CATEGORY[self.category].exit_status

    def fail(
        self, category: str, name: str, message: str, *, traceback_lines: list[str] | None = None
    ) -> RunResult:
        self.status, self.category = "error", category
        self.error = {
            "name": name,
            "message": message,
            "category": category,
            "suggestion": None,
            "traceback": traceback_lines or [],
        }
        return self

    def output_bytes(self) -> int:
        text = (self.stdout + self.stderr).encode("utf-8", "surrogatepass")
        return len(text) + sum(len(json.dumps(output)) for output in self.outputs)

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "errorCode": self.error_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "outputs": self.outputs,
            "error": self.error,
            "timing": {
                "duration_ms": round(self.duration_ms, 3),
                "startup_ms": None if self.startup_ms is None else round(self.startup_ms, 3),
                "queue_ms": None if self.queue_ms is None else round(self.queue_ms, 3),
                "total_ms": round(self.total_ms, 3),
            },
            "executionCount": self.execution_count,
            "kernel": self.kernel,
            "session": self.session,
        }


def check_syntax(code: str) -> dict[str, Any] | None:
    """None when ``code`` is valid IPython input, else ``{name, message, line, column}``.

    IPython's transformer turns magics and ``!`` lines into plain calls first; top-level
    ``await`` is allowed, as it is in IPython.
    """
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        source = TransformerManager().transform_cell(code)  # type: ignore[no-untyped-call]
    except (SyntaxError, ValueError, IndexError):
        source = code
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning about escapes is the remote's to give
            compile(source, "<cell>", "exec", flags, dont_inherit=True)
    except SyntaxError as exc:
        return {
            "name": type(exc).__name__,
            "message": exc.msg,
            "line": exc.lineno,
            "column": exc.offset,
            "traceback": traceback.format_exception_only(type(exc), exc),
        }
    return None


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


def is_python(spec: dict[str, Any]) -> bool:
    """Whether the remote kernel speaks Python, so the local syntax check applies."""
    if not str(spec.get("language", "python")).lower().startswith("python"):
        return False
    argv = [str(a) for a in spec.get("argv", [])]
    remote = kernelspec.argv_option(argv, "--remote-kernel", "--ProxyKernel.remote_kernel")
    if remote is None:
        remote = os.environ.get("CGPU_REMOTE_KERNEL", "")
    return not remote or remote.lower().startswith("python")


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


def kernel_env() -> dict[str, str]:
    """The environment for kernels a run launches: the run records the history, not them."""
    return dict(os.environ, **{history.SUPPRESS_ENV: "1"})


class Output:
    """Where streamed output goes: our stdout/stderr as UTF-8, written as it arrives."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def write(self, stream: IO[str], text: str) -> None:
        if not self.enabled or not text:
            return
        stream.flush()
        buffer = getattr(stream, "buffer", None)
        if buffer is None:
            stream.write(text)
        else:
            buffer.write(text.encode("utf-8", "backslashreplace"))
            buffer.flush()
        stream.flush()


@dataclass
class Execution:
    """Runs one cell on a started client and fills in ``result``."""

    kc: BlockingKernelClient
    result: RunResult
    output: Output
    timeout: float | None
    alive: Callable[[], bool]  # is the kernel still there?
    idle_seen: bool = field(default=False, init=False)

    def run(self, code: str) -> None:
        """Send ``code`` and wait for both its reply and its ``idle``, interrupting on timeout."""
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
        sent = time.monotonic()
        reply: dict[str, Any] | None = None
        interrupted_at: float | None = None
        timed_out = False
        next_alive_check = sent + 1.0
        while reply is None or not self.idle_seen:
            try:
                now = time.monotonic()
                if self.timeout and interrupted_at is None and now - sent > self.timeout:
                    timed_out, interrupted_at = True, now
                    self.interrupt()
                if interrupted_at is not None and now - interrupted_at > INTERRUPT_GRACE:
                    break
                if now > next_alive_check:
                    next_alive_check = now + 1.0
                    if not self.alive():
                        self.result.fail(
                            "kernel_lost",
                            "KernelDied",
                            "The kernel process exited before the code finished.",
                        )
                        break
                self.drain_iopub(msg_id, sent)
                if reply is None:
                    reply = self.poll_reply(msg_id)
            except KeyboardInterrupt:
                if interrupted_at is not None:
                    raise  # a second Ctrl-C: give up at once
                interrupted_at = time.monotonic()
                self.interrupt()
        self.result.duration_ms = (time.monotonic() - sent) * 1000
        self.finish(reply, timed_out)

    def poll_reply(self, msg_id: str) -> dict[str, Any] | None:
        while True:
            try:
                msg: dict[str, Any] = self.kc.get_shell_msg(timeout=0)
            except queue.Empty:
                return None
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def interrupt(self) -> None:
        """``interrupt_request`` on control: the proxy interrupts the remote over REST."""
        self.kc.control_channel.send(self.kc.session.msg("interrupt_request", {}))

    def drain_iopub(self, msg_id: str, sent: float) -> None:
        """Handle what iopub has for our cell, waiting briefly for the first message."""
        wait = 0.1
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=wait)
            except queue.Empty:
                return
            wait = 0
            if msg["parent_header"].get("msg_id") == msg_id:
                self.handle_iopub(msg, sent)

    def handle_iopub(self, msg: dict[str, Any], sent: float) -> None:
        result, content, kind = self.result, msg["content"], msg["msg_type"]
        if kind == "stream":
            text = str(content.get("text", ""))
            if content.get("name") == "stderr":
                result.stderr += text
                self.output.write(sys.stderr, text)
            else:
                result.stdout += text
                self.output.write(sys.stdout, text)
        elif kind in ("execute_result", "display_data"):
            output = {"output_type": kind, "data": content.get("data", {})}
            output["metadata"] = content.get("metadata", {})
            if kind == "execute_result":
                output["execution_count"] = content.get("execution_count")
            result.outputs.append(output)
            text = output["data"].get("text/plain")
            if text:
                self.output.write(sys.stdout, str(text) + "\n")
        elif kind == "error":
            self.result.shown = True
            self.output.write(sys.stderr, "\n".join(content.get("traceback", [])) + "\n")
        elif kind == "execute_input":
            result.execution_count = content.get("execution_count", result.execution_count)
            if result.queue_ms is None:
                result.queue_ms = (time.monotonic() - sent) * 1000
        elif kind == "status" and content.get("execution_state") == "idle":
            self.idle_seen = True

    def finish(self, reply: dict[str, Any] | None, timed_out: bool) -> None:
        result = self.result
        if result.status == "error":
            return  # already classified (the kernel died)
        if reply is None:
            if timed_out:
                result.fail("timeout", "TimeoutError", self._timeout_message(stuck=True))
            else:
                result.fail("unknown", "NoReply", "The kernel never answered the code.")
            return
        content = reply["content"]
        if content.get("execution_count") is not None:
            result.execution_count = content["execution_count"]
        if content.get("status") == "ok":
            return
        ename, evalue = str(content.get("ename", "")), str(content.get("evalue", ""))
        lines = [ANSI.sub("", str(line)) for line in content.get("traceback", [])]
        if timed_out:
            result.fail("timeout", "TimeoutError", self._timeout_message(), traceback_lines=lines)
            return
        if content.get("status") == "aborted":
            result.fail("unknown", "Aborted", "The kernel aborted the execution.")
            return
        result.fail(categorize(ename, evalue), ename, evalue, traceback_lines=lines)

    def _timeout_message(self, stuck: bool = False) -> str:
        message = f"Execution exceeded --timeout {self.timeout:g} s and was interrupted."
        if stuck:
            message += f" It did not stop within {INTERRUPT_GRACE:g} s of the interrupt."
        return message


@dataclass
class RunOptions:
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
        result.fail(categorize(exc.ename), exc.ename, str(exc))
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


def _run(options: RunOptions, result: RunResult) -> None:
    kernel_name = options.kernel
    if options.session:
        from cgpu_kernel.run import sessions

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
    kernel_timeout, startup_args = first_start_timeout(spec, options.kernel_timeout)
    if options.session:
        sessions.run_in_session(options, name, (kernel_timeout, startup_args), result, output)
        return
    km = KernelManager(kernel_name=name)
    launched = time.monotonic()
    # The kernel's own log (and a provisioner's server's) would mix into the run's stderr.
    with tempfile.TemporaryFile() as kernel_log:
        try:
            km.start_kernel(
                env=kernel_env(),
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


def attach_log_tail(result: RunResult, kernel_log: IO[bytes], lines: int = 20) -> None:
    """When the kernel itself failed, the end of its log is the traceback worth showing."""
    if result.error is None or result.category not in ("kernel_lost", "kernel_timeout"):
        return
    kernel_log.seek(0)
    tail = kernel_log.read().decode("utf-8", "replace").splitlines()[-lines:]
    if tail and not result.error["traceback"]:
        result.error["traceback"] = tail


def wait_ready(
    kc: BlockingKernelClient, timeout: float, alive: Callable[[], bool], result: RunResult
) -> bool:
    """Wait until the kernel answers ``kernel_info`` *and* our iopub subscription works.

    Like ``jupyter_client``'s ``wait_for_ready``, but liveness is ``alive()`` (the process),
    not the heartbeat, which a loaded machine can miss for a second: that is not a dead kernel.
    An iopub message must follow the reply, else output printed right away could be lost to a
    subscription still on its way; the request is repeated each second until both arrive.
    On failure, classifies it into ``result`` and returns False.
    """
    deadline = time.monotonic() + timeout
    while True:
        kc.kernel_info()
        ask_again = time.monotonic() + 1.0
        while time.monotonic() < ask_again:
            try:
                msg = kc.get_shell_msg(timeout=0.1)
            except queue.Empty:
                continue
            if msg["msg_type"] == "kernel_info_reply":
                try:
                    kc.get_iopub_msg(timeout=0.5)
                except queue.Empty:
                    break  # iopub not connected yet: ask again
                while True:  # drain what the wait left on iopub
                    try:
                        kc.get_iopub_msg(timeout=0.05)
                    except queue.Empty:
                        return True
        if not alive():
            result.fail(
                "kernel_lost",
                "KernelDied",
                "The kernel process exited while starting: run `jupyter kernelspec list` and"
                " check the kernelspec's argv works.",
            )
            return False
        if time.monotonic() > deadline:
            result.fail(
                "kernel_timeout",
                "KernelStartupTimeout",
                f"The kernel was not ready within {timeout:g} s.",
            )
            return False


def print_summary(result: RunResult, stream: IO[str]) -> None:
    """The human-readable end of a streamed run: the error (unless the kernel's traceback was
    already shown), its category and code, and the suggestion."""
    if result.error is None:
        return
    error = result.error
    if not result.shown or result.category == "timeout":
        stream.write(f"{error['name']}: {error['message']}\n")
    stream.write(f"cgpu-kernel: {result.category} error (code {result.error_code})\n")
    if error.get("suggestion"):
        stream.write(f"hint: {error['suggestion']}\n")
    stream.flush()
