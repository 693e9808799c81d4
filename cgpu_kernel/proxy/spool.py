"""The spool: output held back by the limits, complete and in order, on local disk.

One folder per proxy kernel run under the spool root (``jupyter_data_dir()/cgpu-kernel/outputs``
unless configured), one file per cell and stream (``<cell>-stdout.txt``) or per held-back rich
output (``<cell>-<n>.png``). Files are private (0600) and old ones are cleaned up by age and
total size when a kernel starts, or with ``cgpu-kernel outputs clean``.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

from cgpu_kernel.core.limits import SpoolData, SpoolFailure
from cgpu_kernel.paths import default_spool_root

if TYPE_CHECKING:
    from cgpu_kernel.proxy.options import ProxyKernel

log = logging.getLogger("cgpu_kernel")

OPEN_FILES = 8


class SpoolWriter:
    """Appends held-back output to files in one run's folder, created on first use.

    Each file is written with ``os.write`` straight to its descriptor (no Python buffer), so the
    bytes on disk are known exactly: a write that fails (a full disk, a folder that cannot be
    made or written) is reported as a :class:`~cgpu_kernel.core.limits.SpoolFailure` saying
    how much reached the file and why the rest did not, never raised into the relay. After a
    failure nothing more is written to that file: what it holds stays the output's exact first
    bytes, in order, rather than a file with a hole in the middle.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: OrderedDict[str, int] = OrderedDict()  # name -> open descriptor
        self._failed: dict[str, str] = {}  # name -> why it could not be written
        self.written = 0
        self.lost = 0

    @classmethod
    def from_options(cls, options: ProxyKernel, run_id: str) -> SpoolWriter:
        """The spool of one proxy run (``proxy.kernel`` calls this at start): under
        ``--spool-dir`` (or the default root), after cleaning old runs by ``--spool-max-age-days``
        and ``--spool-max-total-bytes``; a clean-up that fails only warns."""
        root = Path(options.spool_dir) if options.spool_dir else default_spool_root()
        try:
            clean(
                root,
                max_age_days=options.spool_max_age_days,
                max_total_bytes=options.spool_max_total_bytes,
            )
        except OSError as exc:
            log.warning("could not clean old saved outputs in %s: %s", root, exc)
        return cls(root / (time.strftime("%Y%m%d-%H%M%S") + "-" + run_id))

    def write(self, name: str, data: SpoolData) -> SpoolFailure | None:
        """Append ``data`` (bytes, or pieces made as they are written) to the file ``name``;
        None when all of it is on disk, else what was saved and lost and why (``proxy.kernel``
        hands that to the relay, which tells the cell)."""
        pieces = iter((data,) if isinstance(data, bytes | bytearray | memoryview) else data)
        reason = self._failed.get(name)
        if reason is not None:
            lost = sum(len(piece) for piece in pieces)
            self.lost += lost
            return SpoolFailure(name, saved=0, lost=lost, reason=reason, first=False)
        saved = 0
        left = 0  # of the piece being written, the bytes not yet written
        try:
            descriptor = self._open(name)
            for piece in pieces:
                view = memoryview(piece)
                left = len(view)
                while left:
                    written = os.write(descriptor, view[len(view) - left :])
                    saved += written
                    left -= written
        except OSError as exc:
            reason = _reason(exc, self.folder / Path(name).name)
            self._failed[name] = reason
            self._close(name)
            lost = left + sum(len(piece) for piece in pieces)
            self.written += saved
            self.lost += lost
            log.error("could not save held-back output: %s", reason)
            return SpoolFailure(name, saved=saved, lost=lost, reason=reason)
        self.written += saved
        return None

    def _open(self, name: str) -> int:
        descriptor = self._files.get(name)
        if descriptor is not None:
            self._files.move_to_end(name)
            return descriptor
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = self.folder / Path(name).name
        descriptor = self._files[name] = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        while len(self._files) > OPEN_FILES:
            os.close(self._files.popitem(last=False)[1])
        return descriptor

    def _close(self, name: str) -> None:
        descriptor = self._files.pop(name, None)
        if descriptor is not None:
            os.close(descriptor)

    def flush(self) -> None:
        """Nothing is buffered in this process (every write goes to the OS at once); kept for
        the iopub publisher, which calls it before each status message."""

    def close(self) -> None:
        while self._files:
            os.close(self._files.popitem()[1])


def _reason(exc: OSError, path: Path) -> str:
    """Why a spool file could not be written, in the user's words: the OS's reason and the
    file (a full disk, a folder without write permission, a folder that cannot be made)."""
    cause = exc.strerror or type(exc).__name__
    where = exc.filename or path
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"{cause} (writing {where}; free space there or set --spool-dir)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{cause} ({where}; give write access there or set --spool-dir)"
    return f"{cause} ({where})"


def spooled_files(root: Path | None = None) -> list[Path]:
    """Every spool file, oldest first."""
    base = root or default_spool_root()
    if not base.is_dir():
        return []
    return sorted((p for p in base.glob("*/*") if p.is_file()), key=lambda p: p.stat().st_mtime)


def clean(
    root: Path | None = None, *, max_age_days: float = 7, max_total_bytes: int = 5 << 30
) -> list[Path]:
    """Delete spool files older than ``max_age_days``, then the oldest beyond the size cap."""
    files = spooled_files(root)
    cutoff = time.time() - max_age_days * 86400
    removed = []
    total = sum(p.stat().st_size for p in files)
    for path in files:
        size = path.stat().st_size
        if path.stat().st_mtime < cutoff or total > max_total_bytes:
            path.unlink(missing_ok=True)
            total -= size
            removed.append(path)
    for folder in {p.parent for p in removed}:
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    return removed
