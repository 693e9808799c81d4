"""What a run can end in: the error codes, how an error is categorized, what to suggest.

:data:`ERROR_CODES` is the one table of outcomes (``errorCode`` in the JSON, the category, the
process exit status); ``docs/run.md`` documents the same table and a test checks they agree.
:func:`categorize` turns an error reply's ``ename``/``evalue`` into a category; the runner calls
it for a cell's error and the proxy kernel's ``history.ExecutionTracker`` for every cell it
records. :func:`suggest` gives the one-line hint printed under an error. :class:`RunResult` is
what a run produced, filled in by the runner and the execution loop and printed by ``report``.

This module imports nothing but the standard library and ``exceptions``: the proxy kernel
imports it (through ``history``) and must not pay for ``jupyter_client`` or IPython.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from cgpu_kernel import exceptions


@dataclass(frozen=True)
class ErrorCode:
    """One outcome: the JSON ``errorCode``, the category, the exit status and what it means."""

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

#: The proxy's and the backends' own errors need no table here: each class of the error tree
#: says its ``category``, and :func:`categorize` reads them off ``exceptions.categories()``.
#: Fallback for an ``ename`` that is not in this version's tree but looks like the proxy's (a
#: newer proxy, or a newer backend, on the other end of a session): the remote failed us.
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
NO_MODULE = re.compile(r"No module named '([^']+)'")


def categorize(ename: str, evalue: str = "") -> str:
    """The category of an error reply's ``ename``/``evalue`` (the kernel's tracker calls this too).

    The proxy's own errors are looked up in the error tree; the code's own exceptions are
    classified by their Python name (and, for a GPU library's out-of-memory, by its message).
    """
    if not ename:
        return "unknown"
    # Walked on each call (two dozen classes), so a subclass defined after import counts too.
    proxy_category = exceptions.categories().get(ename)
    if proxy_category is not None:
        return proxy_category
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
    #: the proxy's own notices (never in stdout/stderr): {"text", "kind", ...} each
    notices: list[dict[str, Any]] = field(default_factory=list)
    truncated: bool = False  # a --max-output limit held output back (saved in ``spool``)
    spool: list[str] = field(default_factory=list)
    streamed_bytes: int = 0  # stdout + stderr bytes the program wrote (not kept in memory)

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
        return (
            self.streamed_bytes
            + len(text)
            + sum(len(json.dumps(output)) for output in self.outputs)
        )

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
            "notices": self.notices,
            "truncated": self.truncated,
            "spool": self.spool,
        }
