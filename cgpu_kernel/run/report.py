"""How ``cgpu-kernel run`` shows its result: the JSON document, or a summary after the stream.

``run.cli`` calls :func:`write_json` for ``--json`` and :func:`print_summary` otherwise; the
result itself (and its documented JSON shape) is ``outcomes.RunResult``.
"""

from __future__ import annotations

import json
from typing import IO, TYPE_CHECKING

from cgpu_kernel.run.outcomes import RunResult

if TYPE_CHECKING:
    from cgpu_kernel.run.execution import Output

#: Stands for a captured stream in the document until it is copied in (no output contains it:
#: the document holds no output when it is serialized).
SLOT = "\x00cgpu-kernel-captured-"
CHUNK = 1 << 20


def write_json(result: RunResult, stream: IO[str], captured: Output | None = None) -> None:
    """The ``--json`` document on one line, as UTF-8 (lone surrogates from the kernel kept).

    ``captured``: the run's output, spooled to temporary files as it arrived; its stdout and
    stderr are copied into the document chunk by chunk, so a run of any size is never held in
    memory whole (JSON escapes one character at a time: escaped chunks join into one string).
    """
    document = result.to_json()
    handles = {name: captured.read(name) if captured else None for name in ("stdout", "stderr")}
    for name, handle in handles.items():
        if handle is not None:
            document[name] = SLOT + name
    text = json.dumps(document, ensure_ascii=False)
    out = getattr(stream, "buffer", None)

    def emit(piece: str) -> None:
        if out is None:
            stream.write(piece)
        else:
            out.write(piece.encode("utf-8", "surrogatepass"))

    for name, handle in handles.items():
        if handle is None:
            continue
        before, _, text = text.partition(json.dumps(SLOT + name, ensure_ascii=False))
        emit(before + '"')
        while chunk := handle.read(CHUNK):
            emit(json.dumps(chunk, ensure_ascii=False)[1:-1])
        emit('"')
    emit(text + "\n")
    stream.flush()


def print_summary(result: RunResult, stream: IO[str]) -> None:
    """The human-readable end of a streamed run: the error (unless the kernel's traceback was
    already shown), its category and code, and the suggestion."""
    if result.error is None:
        return
    error = result.error
    if not result.shown or result.category == "timeout":
        stream.write(f"{error['name']}: {error['message']}\n")
    on = f" on kernelspec {result.kernel!r}" if result.kernel else ""
    stream.write(f"cgpu-kernel: {result.category} error (code {result.error_code}){on}\n")
    if error.get("suggestion"):
        stream.write(f"hint: {error['suggestion']}\n")
    stream.flush()
