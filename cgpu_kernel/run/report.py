"""How ``cgpu-kernel run`` shows its result: the JSON document, or a summary after the stream.

``run.cli`` calls :func:`write_json` for ``--json`` and :func:`print_summary` otherwise; the
result itself (and its documented JSON shape) is ``outcomes.RunResult``.
"""

from __future__ import annotations

import json
from typing import IO

from cgpu_kernel.run.outcomes import RunResult


def write_json(result: RunResult, stream: IO[str]) -> None:
    """The ``--json`` document on one line, as UTF-8 (lone surrogates from the kernel kept)."""
    document = json.dumps(result.to_json(), ensure_ascii=False)
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        stream.write(document + "\n")
    else:
        buffer.write(document.encode("utf-8", "surrogatepass") + b"\n")
    stream.flush()


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
