"""The spool: output held back by the limits, complete and in order, on local disk.

One folder per proxy kernel run under the spool root (``jupyter_data_dir()/cgpu-kernel/outputs``
unless configured), one file per cell and stream (``<cell>-stdout.txt``) or per held-back rich
output (``<cell>-<n>.png``). Files are private (0600) and old ones are cleaned up by age and
total size when a kernel starts, or with ``cgpu-kernel outputs clean``.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from pathlib import Path
from typing import IO, TYPE_CHECKING

from cgpu_kernel.paths import default_spool_root

if TYPE_CHECKING:
    from cgpu_kernel.proxy.options import ProxyKernel

log = logging.getLogger("cgpu_kernel")

OPEN_FILES = 8


class SpoolWriter:
    """Appends held-back output to files in one run's folder, created on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._files: OrderedDict[str, IO[bytes]] = OrderedDict()
        self.written = 0

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

    def write(self, name: str, data: bytes) -> None:
        handle = self._files.get(name)
        if handle is None:
            self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            path = self.folder / Path(name).name
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            handle = self._files[name] = os.fdopen(descriptor, "ab")
            while len(self._files) > OPEN_FILES:
                self._files.popitem(last=False)[1].close()
        else:
            self._files.move_to_end(name)
        handle.write(data)
        self.written += len(data)

    def flush(self) -> None:
        for handle in self._files.values():
            handle.flush()

    def close(self) -> None:
        while self._files:
            self._files.popitem()[1].close()


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
