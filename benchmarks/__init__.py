"""Benchmarks for cgpu-kernel: ``python -m benchmarks`` (see docs/benchmarks.md).

Every benchmark process (``python -m benchmarks`` and each ``python -m benchmarks.X``) gives
the kernels it starts an IPython folder of its own, removed when it exits: the kernels store
every cell in their IPython history, the memory benchmark's 100 MB code strings included, and
in the user's ``~/.ipython`` that history grew past 1 GB over a few runs (and made a history
search slower than a frontend's timeout).
"""

import atexit
import os
import shutil
import tempfile


def _ipython_dir_of_this_run() -> str:
    """A temporary IPYTHONDIR, set in this process's environment (which the servers and kernels
    it starts inherit) and removed at exit."""
    folder = tempfile.mkdtemp(prefix="cgpu-bench-ipython-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["IPYTHONDIR"] = folder
    return folder


_ipython_dir_of_this_run()
