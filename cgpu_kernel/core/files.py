"""The ``%cgpu`` file magic's decisions: parsing a cell, remote path rules, progress lines.

Sans-I/O like the rest of ``core``: the relay asks :func:`parse_cell` whether a cell is a
``%cgpu`` cell (and keeps the rest of it for the remote kernel); ``backends.contents`` joins and
checks remote paths with :func:`remote_path`; ``proxy.files`` redraws its progress line with a
:class:`Progress`, feeding it the clock, so when a line is due and what it says are unit tests.
"""

from __future__ import annotations

import posixpath
import re
import shlex
from dataclasses import dataclass

from cgpu_kernel.exceptions import FileMagicError, RemotePathError

#: The magic's name: a cell whose first line starts with it is answered by the proxy.
MAGIC = "%cgpu"
#: What ``is_magic_cell`` looks for from the first non-blank character: the first line, with
#: its surrounding whitespace stripped, is ``%cgpu`` or starts with ``%cgpu `` (``\Z``: the
#: end of that line, as ``match`` is given it).
_LEADING_SPACE = re.compile(r"\s*")
_MAGIC_LINE = re.compile(re.escape(MAGIC) + r"(?: |\s*\Z)")
VERBS = ("upload", "download", "ls", "help")
#: Fewest seconds between two progress lines (at most 4 messages a second, whatever the size).
PROGRESS_INTERVAL = 0.25

HELP = """\
%cgpu: files between this machine and the remote kernel (answered by cgpu-kernel itself)

  %cgpu upload LOCAL [REMOTE]     copy a file, a folder (recursively) or a glob to the remote
  %cgpu download REMOTE [LOCAL]   copy a remote file, folder or glob (last part) back here
  %cgpu ls [REMOTE]               list a remote folder (default: the kernel's folder)
  %cgpu help                      this text

LOCAL paths are relative to the folder the kernel was started in (the notebook's); REMOTE
paths are relative to the remote kernel's working directory, so after `%cgpu upload data.csv`
the next cell's open("data.csv") finds it. Without a destination the same relative path is
used (the file's name for an absolute path). Files are sent in chunks, checked by size and
SHA-256 on both sides, and renamed to their final name only when complete. `..` may not leave
the remote server's root; a download never writes outside this folder unless LOCAL is absolute.
The rest of the cell, if any, runs on the remote kernel afterwards.
From a shell: cgpu-kernel files upload|download|ls --kernel NAME.
"""


@dataclass(frozen=True)
class FileCommand:
    """One ``%cgpu`` line, parsed: ``verb`` and its arguments; ``rest`` the cell's other lines."""

    verb: str
    args: tuple[str, ...]
    rest: str = ""


def is_magic_cell(code: object) -> bool:
    """Whether ``code`` (an ``execute_request``'s code) starts with a ``%cgpu`` line."""
    if not isinstance(code, str):
        return False
    # Matched in place: a cell can be 100 MB, and ``lstrip``/``split`` would copy it.
    start = _LEADING_SPACE.match(code).end()  # type: ignore[union-attr]  # \s* always matches
    end = code.find("\n", start)
    return _MAGIC_LINE.match(code, start, end if end >= 0 else len(code)) is not None


def parse_cell(code: str) -> FileCommand:
    """The command on the first line of a ``%cgpu`` cell; raises :exc:`FileMagicError` with the
    usage for anything else (the relay answers the cell with it)."""
    first, _, rest = code.lstrip().partition("\n")
    try:
        words = shlex.split(first.strip()[len(MAGIC) :])
    except ValueError as exc:
        raise FileMagicError(f"Could not read the %cgpu line: {exc}. See %cgpu help.") from None
    if not words:
        return FileCommand("help", (), rest)
    verb, args = words[0], tuple(words[1:])
    counts = {"upload": (1, 2), "download": (1, 2), "ls": (0, 1), "help": (0, 99)}
    if verb not in counts:
        raise FileMagicError(f"%cgpu has no command {verb!r}. Use one of: {', '.join(VERBS)}.")
    low, high = counts[verb]
    if not low <= len(args) <= high:
        usage = {
            "upload": "%cgpu upload LOCAL [REMOTE]",
            "download": "%cgpu download REMOTE [LOCAL]",
            "ls": "%cgpu ls [REMOTE]",
        }[verb]
        raise FileMagicError(f"Usage: {usage} (quote paths with spaces). See %cgpu help.")
    return FileCommand(verb, args, rest)


def remote_path(cwd: str, path: str) -> str:
    """The Contents API path (from the server's root, no leading ``/``) of ``path`` as the
    remote kernel, whose folder is ``cwd``, reads it; ``/x`` is from the server's root.

    Refuses (:exc:`RemotePathError`) a path whose ``..`` leaves the server's root: the server
    would refuse it too, but here the message says what was asked.
    """
    if "\x00" in path or "\\" in path:
        raise RemotePathError(f"The remote path {path!r} has a character paths cannot have.")
    joined = path if path.startswith("/") else posixpath.join("/" + cwd.strip("/"), path)
    depth = 0
    for part in joined.split("/"):
        if part == "..":
            depth -= 1
        elif part not in ("", "."):
            depth += 1
        if depth < 0:
            raise RemotePathError(
                f"The remote path {path!r} leaves the remote server's root with '..'. Give a"
                " path inside it."
            )
    return posixpath.normpath(joined).strip("/")


def human_bytes(size: float) -> str:
    """``size`` as a person reads it: ``12.3 MB`` (powers of 1000, like the notices)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


class Progress:
    """One transfer's progress line: bytes done of the total, rate and ETA, redrawn with ``\\r``.

    ``proxy.files`` calls :meth:`advance` after each chunk with the clock's time; it returns the
    line to show when one is due (the first, then at most every :data:`PROGRESS_INTERVAL`), else
    None; :meth:`summary` is the closing line.
    """

    def __init__(self, total: int, start: float, label: str = "") -> None:
        self.total = total
        self.start = start
        self.label = label
        self.done = 0
        self.lines = 0
        self._last: float | None = None

    def advance(self, count: int, now: float) -> str | None:
        self.done += count
        if self._last is not None and now - self._last < PROGRESS_INTERVAL:
            return None
        self._last = now
        self.lines += 1
        return "\r" + self.line(now)

    def line(self, now: float) -> str:
        elapsed = now - self.start
        percent = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.label}{human_bytes(self.done)} / {human_bytes(self.total)} ({percent:.0f}%)"
        if elapsed >= PROGRESS_INTERVAL:  # a rate over less time says nothing yet
            rate = self.done / elapsed
            left = self.total - self.done
            text += f"  {human_bytes(rate)}/s"
            if rate > 0 and left > 0:
                text += f"  ETA {left / rate:.0f} s"
        return text.rstrip().ljust(72)

    def summary(self, verb: str, files: int, now: float) -> str:
        elapsed = max(now - self.start, 1e-6)
        noun = "file" if files == 1 else "files"
        return (
            f"\r{verb} {files} {noun}, {human_bytes(self.done)} in {elapsed:.1f} s"
            f" ({human_bytes(self.done / elapsed)}/s), verified (size and SHA-256)".ljust(72)
            + "\n"
        )
