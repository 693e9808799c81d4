"""``cgpu-kernel run``, ``sessions`` and ``logs``: code run once from a shell or CI.

Modules, each importing only those above it (no cycles, all imports at the top):

* ``outcomes`` -- the error codes, :func:`~cgpu_kernel.run.outcomes.categorize` (the error
  tree's classes say the proxy's categories), suggestions, ``RunResult``.
* ``history`` -- the local execution history (the proxy kernel imports it too).
* ``syntax`` -- the local, IPython-aware syntax check.
* ``execution`` -- the loop that runs one cell on a started kernel client.
* ``sessions`` -- named sessions' host processes (``python -m cgpu_kernel.run.sessions host``).
* ``runner`` -- one run, start to end: options, kernelspec, a fresh kernel or a session.
* ``report`` -- the ``--json`` document and the summary after a streamed run.
* ``cli`` -- the subcommands' parsers, registered by ``cgpu_kernel.cli``.
"""
