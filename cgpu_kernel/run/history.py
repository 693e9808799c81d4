"""A local history of executions: metadata only, in a capped JSONL file.

Every execution through a cgpu kernel or ``cgpu-kernel run`` appends one line: when, which
kernel, how long, ok or error, the error's category, how many output bytes, how many reconnects,
and the kernel's startup time when the execution paid for one. **Never the code and never the
outputs**: a history must be safe to attach to a bug report.

Where: ``$CGPU_HISTORY_FILE`` if set; else ``history.jsonl`` in ``$CGPU_STATE_DIR`` if set;
else ``<jupyter data dir>/cgpu-kernel/history.jsonl`` (``jupyter --data-dir`` prints the data
dir), so it survives reboots, unlike the runtime dir. The file is private (0600). When it grows
past ``$CGPU_HISTORY_MAX_BYTES`` (default 1 MiB) the oldest half is dropped.

Who calls what: the proxy kernel's :class:`ExecutionTracker` makes one record per cell, once
its reply and its ``idle`` have passed, and writes them in batches (:func:`write_records`);
``cgpu-kernel run`` calls it once per run (and sets ``CGPU_HISTORY_SUPPRESS=1`` for the kernels
it launches, so a run counts once); ``cgpu-kernel logs`` calls :func:`read_records` and
:func:`compute_stats`. Recording never raises: a full disk must not break a kernel.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgpu_kernel import paths
from cgpu_kernel.run.outcomes import categorize

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 1 << 20
SUPPRESS_ENV = "CGPU_HISTORY_SUPPRESS"

try:  # POSIX: serialize appends and trims between processes
    import fcntl
except ImportError:  # pragma: no cover - Windows: appends of one short line are good enough
    fcntl = None  # type: ignore[assignment]


def history_path() -> Path:
    """Where the history lives (see the module docstring for the order)."""
    explicit = os.environ.get("CGPU_HISTORY_FILE")
    if explicit:
        return Path(explicit).expanduser()
    return paths.default_history_file()


def max_bytes() -> int:
    raw = os.environ.get("CGPU_HISTORY_MAX_BYTES", "")
    try:
        return max(4096, int(raw)) if raw else DEFAULT_MAX_BYTES
    except ValueError:
        return DEFAULT_MAX_BYTES


def suppressed_env() -> dict[str, str]:
    """This process's environment, plus the flag that stops a kernel recording its cells.

    For the kernels ``cgpu-kernel run`` launches (``runner``, and ``sessions`` for a session's
    host): the run records itself once, so the kernel under it must not record the cell too.
    """
    return dict(os.environ, **{SUPPRESS_ENV: "1"})


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[int]:
    """The history file opened for appending (0600), under an exclusive lock."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if fcntl is not None:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield descriptor
    finally:
        os.close(descriptor)  # also releases the lock


def append_records(records: list[dict[str, Any]], path: Path | None = None) -> None:
    """Append ``records``, one JSON line each, in one write under the lock; then trim."""
    if not records:
        return
    path = path or history_path()
    lines = "".join(json.dumps(r, separators=(",", ":"), sort_keys=True) + "\n" for r in records)
    with _locked(path) as descriptor:
        os.write(descriptor, lines.encode())
        cap = max_bytes()
        if os.fstat(descriptor).st_size > cap:
            _trim(path, cap // 2)


def _trim(path: Path, keep_bytes: int) -> None:
    """Keep the newest whole lines that fit in ``keep_bytes`` (called under the lock)."""
    data = path.read_bytes()
    tail = data[-keep_bytes:]
    cut = tail.find(b"\n")
    tail = tail[cut + 1 :] if cut >= 0 and len(data) > keep_bytes else tail
    scratch = path.with_name(path.name + ".trim")
    descriptor = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(tail)
    os.replace(scratch, path)


def record_execution(
    kernel: str,
    duration_ms: float,
    status: str,
    category: str | None,
    output_bytes: int,
    reconnects: int,
    startup_ms: float | None = None,
    *,
    source: str = "kernel",
    session: str | None = None,
    queue_ms: float | None = None,
    total_ms: float | None = None,
    into: list[dict[str, Any]] | None = None,
) -> None:
    """Append one execution's metadata to the history. Never raises.

    ``kernel``: the kernelspec name (or a description). ``status``: ``"ok"`` or ``"error"``.
    ``category``: None for ok, else one of :data:`cgpu_kernel.run.outcomes.CATEGORIES`
    (``categorize(ename, evalue)`` turns an error reply into one). ``reconnects``: how many
    times the proxy reconnected while this cell ran. ``startup_ms``: the kernel's startup time,
    given with the first execution after a start. ``total_ms``: the wall time of a whole
    ``cgpu-kernel run`` (start, wait, execution, shutdown), which ``duration_ms`` (the
    execution alone) does not show. ``session``: groups the records of one kernel
    process for "reconnects per session" (default: this process's pid). ``into``: add the
    record to that list instead of writing it (the proxy writes its records in batches, with
    :func:`write_records`).
    """
    if source == "kernel" and os.environ.get(SUPPRESS_ENV) == "1":
        return  # `cgpu-kernel run` launched this kernel and records the run itself
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel": kernel,
        "source": source,
        "session": session or f"pid-{os.getpid()}",
        "duration_ms": round(float(duration_ms), 3),
        "status": status,
        "category": category,
        "output_bytes": int(output_bytes),
        "reconnects": int(reconnects),
    }
    if startup_ms is not None:
        record["startup_ms"] = round(float(startup_ms), 3)
    if queue_ms is not None:
        record["queue_ms"] = round(float(queue_ms), 3)
    if total_ms is not None:
        record["total_ms"] = round(float(total_ms), 3)
    if into is not None:
        into.append(record)
    else:
        write_records([record])


def write_records(records: list[dict[str, Any]]) -> None:
    """Append ``records`` to the history. Never raises: a history that cannot be written is
    worth a warning, not a failed cell."""
    try:
        append_records(records)
    except OSError as exc:
        log.warning("could not write the execution history %s: %s", history_path(), exc)


def read_records(path: Path | None = None) -> list[dict[str, Any]]:
    """Every readable record, oldest first (a torn or foreign line is skipped)."""
    path = path or history_path()
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        try:
            data = json.loads(line)
        except ValueError:
            continue
        if isinstance(data, dict) and "status" in data:
            found.append(data)
    return found


def percentile(values: Iterable[float], fraction: float) -> float | None:
    """Nearest-rank percentile (p95 of 20 values is the 19th smallest); None when empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compute_stats(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What ``cgpu-kernel logs --stats`` shows, computed from ``records``."""
    total = len(records)
    ok = sum(1 for r in records if r.get("status") == "ok")
    durations = [float(r["duration_ms"]) for r in records if "duration_ms" in r]
    startups = [float(r["startup_ms"]) for r in records if r.get("startup_ms") is not None]
    errors: dict[str, int] = {}
    for r in records:
        if r.get("status") != "ok":
            category = str(r.get("category") or "unknown")
            errors[category] = errors.get(category, 0) + 1
    sessions: dict[str, int] = {}
    for r in records:
        key = str(r.get("session") or "?")
        sessions[key] = sessions.get(key, 0) + int(r.get("reconnects") or 0)
    timeouts = errors.get("timeout", 0)
    return {
        "executions": total,
        "ok": ok,
        "errors": total - ok,
        "success_rate": ok / total if total else None,
        "timeout_rate": timeouts / total if total else None,
        "duration_ms": {"mean": _mean(durations), "p95": percentile(durations, 0.95)},
        "errors_by_category": dict(sorted(errors.items())),
        "sessions": len(sessions),
        "reconnects": sum(sessions.values()),
        "reconnects_per_session": sum(sessions.values()) / len(sessions) if sessions else None,
        "startup_ms": {
            "count": len(startups),
            "mean": _mean(startups),
            "p95": percentile(startups, 0.95),
        },
    }


@dataclass
class _Execution:
    """One execute_request between its arrival and its record."""

    started: float
    reconnects: int
    output_bytes: int = 0
    reply: dict[str, Any] | None = None
    replied_at: float = 0.0
    idle: bool = False


class ExecutionTracker:
    """Turns one proxy kernel's traffic into history records: one per ``execute_request``.

    For the proxy kernel (``proxy.kernel``), which calls, from its event loop:

    * :meth:`connected` each time the remote channels open (the first time is the startup);
    * :meth:`request` when a frontend's ``execute_request`` arrives;
    * :meth:`output` for each iopub output (stream, display, result, error) of a request;
    * :meth:`reply` when the ``execute_reply`` goes back to the frontend;
    * :meth:`idle` when the request's ``status: idle`` is published.

    An execution is recorded once both its reply and its ``idle`` have passed: the reply
    travels on shell and the output on iopub, and a server relays the two sockets in no fixed
    order, so output can follow the reply; ``idle`` comes after all of it on iopub. One whose
    ``idle`` never comes is recorded anyway at the next request, ``IDLE_GRACE`` s after its reply,
    or at :meth:`close`.

    With ``deferred``, records wait in memory until :meth:`flush` (the proxy flushes about once
    a second and when it stops): one locked append for many cells keeps the file's open, lock
    and close off the round trip of each one.

    Pure bookkeeping plus the history file; ``clock`` is injectable for tests.
    """

    IDLE_GRACE = 10.0

    def __init__(
        self,
        kernel: str,
        *,
        session: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        deferred: bool = False,
    ) -> None:
        self.kernel = kernel
        self.deferred = deferred
        self.unwritten: list[dict[str, Any]] = []
        self.session = session or f"pid-{os.getpid()}"
        self.clock = clock
        self.launched = clock()
        self.startup_ms: float | None = None
        self.reconnects = 0
        self._startup_recorded = False
        self._pending: dict[str, _Execution] = {}

    def connected(self) -> None:
        if self.startup_ms is None:
            self.startup_ms = (self.clock() - self.launched) * 1000
        else:
            self.reconnects += 1

    def request(self, msg_id: str) -> None:
        now = self.clock()
        for parent_id, execution in list(self._pending.items()):
            if execution.reply is not None and now - execution.replied_at > self.IDLE_GRACE:
                self._record(parent_id)
        self._pending[msg_id] = _Execution(now, self.reconnects)

    def output(self, parent_id: str, nbytes: int) -> None:
        execution = self._pending.get(parent_id)
        if execution is not None:
            execution.output_bytes += nbytes

    def reply(self, parent_id: str, content: dict[str, Any]) -> None:
        execution = self._pending.get(parent_id)
        if execution is None or execution.reply is not None:
            return
        execution.reply, execution.replied_at = content, self.clock()
        if execution.idle:
            self._record(parent_id)

    def idle(self, parent_id: str) -> None:
        execution = self._pending.get(parent_id)
        if execution is None:
            return
        execution.idle = True
        if execution.reply is not None:
            self._record(parent_id)

    def close(self) -> None:
        """The proxy stops: record what has its reply, idle or not, and write it all."""
        for parent_id, execution in list(self._pending.items()):
            if execution.reply is not None:
                self._record(parent_id)
        self.flush()

    def flush(self) -> None:
        """Write the records waiting in memory. Never raises."""
        records, self.unwritten = self.unwritten, []
        write_records(records)

    def _record(self, parent_id: str) -> None:
        execution = self._pending.pop(parent_id)
        content = execution.reply or {}
        status = "ok" if content.get("status") == "ok" else "error"
        category = None
        if status == "error":
            category = categorize(str(content.get("ename", "")), str(content.get("evalue", "")))
        startup = None
        if not self._startup_recorded and self.startup_ms is not None:
            startup, self._startup_recorded = self.startup_ms, True
        record_execution(
            self.kernel,
            (execution.replied_at - execution.started) * 1000,
            status,
            category,
            execution.output_bytes,
            self.reconnects - execution.reconnects,
            startup,
            session=self.session,
            into=self.unwritten,
        )
        if not self.deferred:
            self.flush()
