"""Every folder cgpu-kernel keeps state in, decided in one place.

Two roots, both under ``$CGPU_STATE_DIR/cgpu-kernel`` when that variable is set (tests and
containers point it somewhere private), else beside Jupyter's own:

- :func:`data_dir` -- what outlives a process: the execution history, saved tokens, held-back
  output, Google credentials (``jupyter_data_dir()/cgpu-kernel``).
- :func:`runtime_dir` -- what describes running processes: records of started remote kernels,
  ``run`` sessions, the warm local servers (``jupyter_runtime_dir()/cgpu-kernel``).

Every folder is created private (0700) at every level this code creates, whatever the umask,
because what lies below (tokens, connection files with signing keys) is the user's alone.
Callers: the registry, sessions, history, spool, kernelspec token files and the Colab
credential store.
"""

from __future__ import annotations

import os
from pathlib import Path

from jupyter_core.paths import jupyter_data_dir, jupyter_runtime_dir

STATE_DIR_ENV = "CGPU_STATE_DIR"


def private_dir(path: Path) -> Path:
    """``path`` as a folder, creating each missing level with mode 0700 (umask or not)."""
    missing: list[Path] = []
    for level in (path, *path.parents):
        if level.exists():
            break
        missing.append(level)
    for level in reversed(missing):
        try:
            level.mkdir(mode=0o700)
        except FileExistsError:
            continue  # made meanwhile by another process: leave its mode alone
        level.chmod(0o700)  # mkdir's mode is filtered through the umask
    return path


def _root(default: str) -> Path:
    configured = os.environ.get(STATE_DIR_ENV)
    return Path(configured or default) / "cgpu-kernel"


def data_dir() -> Path:
    """Where lasting state lives (history, tokens, held-back output, credentials)."""
    return _root(jupyter_data_dir())


def runtime_dir() -> Path:
    """Where the state of running processes lives (remote kernel records, sessions)."""
    return _root(jupyter_runtime_dir())


def registry_dir() -> Path:
    """Records of the remote kernels proxies started (``backends.registry``); created."""
    return private_dir(runtime_dir())


def sessions_dir() -> Path:
    """``cgpu-kernel run --session`` state (``run.sessions``); created."""
    return private_dir(runtime_dir() / "sessions")


def warm_servers_dir() -> Path:
    """The warm local servers ``cgpu-kernel run`` keeps between runs (``backends.warm_server``):
    each one's record (address and token, 0600), lock and log; created."""
    return private_dir(runtime_dir() / "warm-servers")


def tokens_dir() -> Path:
    """Token files written by ``install --token-stdin`` (``kernelspec.save_token``); created."""
    return private_dir(data_dir() / "tokens")


def default_spool_root() -> Path:
    """Where held-back output goes unless ``CGPU_SPOOL_DIR`` says otherwise (not created)."""
    return data_dir() / "outputs"


def default_history_file() -> Path:
    """The execution history unless ``CGPU_HISTORY_FILE`` says otherwise (not created)."""
    return data_dir() / "history.jsonl"


def default_credentials_file() -> Path:
    """The Google credential store unless ``CGPU_CREDENTIALS_FILE`` says otherwise."""
    return data_dir() / "google-credentials.json"
