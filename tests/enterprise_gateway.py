"""Jupyter Enterprise Gateway on loopback, in its own virtual environment, for the tests.

Enterprise Gateway 3.3.0 pins ``jupyter_client<7``, ``jupyter_server<2`` and ``pyzmq<25``, so it
cannot share the test environment: like a remote machine, it gets its own venv, built once and
kept under ``~/.cache/cgpu-kernel-tests/eg-venv-<version>`` (``CGPU_TEST_CACHE`` moves the
folder). The gateway runs as a cluster admin would run it, with its default local process proxy
(the seam EG itself provides for kernels as processes; on a cluster the same REST and WebSocket
front launches pods instead), its own kernelspec folder holding one python kernel from its
venv's ipykernel, an auth token, and the kernel listing enabled.

Found when tried here: EG refuses to start kernels for ``root`` unless ``EG_UNAUTHORIZED_USERS``
says otherwise, and ``GET /api/kernels`` answers 403 unless
``--EnterpriseGatewayApp.list_kernels=True`` (the tests' leak checks need the listing).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import RemoteServer, free_port, serving

EG_VERSION = "3.3.0"
#: What the gateway's venv gets (ipykernel: the kernels the gateway launches).
EG_REQUIREMENTS = (f"jupyter-enterprise-gateway=={EG_VERSION}", "ipykernel")
#: The user EG refuses by default; the tests may run as root, so nobody real is refused.
UNAUTHORIZED = "cgpu-nobody"


def cache_dir() -> Path:
    """Where built test environments are kept between runs (``CGPU_TEST_CACHE`` overrides)."""
    configured = os.environ.get("CGPU_TEST_CACHE")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cgpu-kernel-tests"


def _usable(venv: Path) -> bool:
    python = venv / "bin" / "python"
    if not (venv / "cgpu-ready").is_file() or not python.exists():
        return False
    check = subprocess.run(
        [str(python), "-c", "import enterprise_gateway, ipykernel"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    return check.returncode == 0


def build_venv() -> Path:
    """The gateway's venv, built on first use (under a lock, so parallel runs build it once).

    It is built in a scratch folder beside the final one and renamed when complete (only
    ``python -m`` entry points are used, so the rename is safe), so an interrupted build is
    never mistaken for a usable one. Raises ``RuntimeError`` with pip's last words when it
    cannot be built (no index reachable, no wheel for this Python).
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / f"eg-venv-{EG_VERSION}"
    with (root / f"eg-venv-{EG_VERSION}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _usable(venv):
            return venv
        scratch = root / f"eg-venv-{EG_VERSION}.building"
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(venv, ignore_errors=True)
        started = time.monotonic()
        steps = [
            [sys.executable, "-m", "venv", str(scratch)],
            [
                str(scratch / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                *EG_REQUIREMENTS,
            ],
        ]
        for step in steps:
            done = subprocess.run(
                ["nice", "-n", "10", *step],
                capture_output=True,
                text=True,
                check=False,
                timeout=900,
            )
            if done.returncode != 0:
                shutil.rmtree(scratch, ignore_errors=True)
                said = [line for line in done.stderr.splitlines() if "WARNING" not in line]
                raise RuntimeError(
                    f"{' '.join(step[:4])} failed (exit {done.returncode}): "
                    + " ".join(said[-5:])[-1500:]
                )
        scratch.rename(venv)
        (venv / "cgpu-ready").write_text(
            json.dumps({"built_in_seconds": round(time.monotonic() - started, 1)}) + "\n"
        )
        return venv


#: Why the venv could not be built, once tried in this test run (not tried again per test).
_build_failure: list[str] = []


def venv_or_skip() -> Path:
    """The gateway's venv; the test is skipped, saying why, only when it cannot be built."""
    if not _build_failure:
        try:
            return build_venv()
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            _build_failure.append(str(exc))
    pytest.skip(
        f"Enterprise Gateway {EG_VERSION} needs its own venv (it pins jupyter_client<7,"
        f" jupyter_server<2, pyzmq<25) and it could not be built: {_build_failure[0]}"
    )


def write_gateway_kernelspecs(venv: Path, folder: Path, *, slow_start: float = 0.0) -> Path:
    """The gateway's own kernelspec folder (its JUPYTER_PATH): ``python3``, an ipykernel from
    its venv, and ``python3-slow``, the same kernel that first waits ``slow_start`` seconds, the
    way a pod waits to be scheduled and its image pulled."""
    kernels = folder / "kernels"
    python = str(venv / "bin" / "python")
    specs = {
        "python3": [python, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "python3-slow": [
            "/bin/sh",
            "-c",
            f'sleep {slow_start:g}; exec "$0" -m ipykernel_launcher -f "$1"',
            python,
            "{connection_file}",
        ],
    }
    for name, argv in specs.items():
        (kernels / name).mkdir(parents=True, exist_ok=True)
        spec = {"argv": argv, "display_name": f"EG {name}", "language": "python"}
        (kernels / name / "kernel.json").write_text(json.dumps(spec))
    return folder


def start_enterprise_gateway(
    venv: Path, workdir: Path, *extra: str, list_kernels: bool = True, slow_start: float = 8.0
) -> RemoteServer:
    """Enterprise Gateway on 127.0.0.1 with its default local process proxy; ``extra`` are
    more of its command-line options (cull settings)."""
    token = secrets.token_hex(16)
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    data = write_gateway_kernelspecs(venv, workdir / "jupyter", slow_start=slow_start)
    log_path = workdir / "gateway.log"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CGPU_", "JUPYTER_", "KERNEL_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(
        EG_AUTH_TOKEN=token,
        EG_UNAUTHORIZED_USERS=UNAUTHORIZED,
        EG_RESPONSE_IP="127.0.0.1",  # the launcher response socket, should one be opened
        # its kernels get PATH and these only: the tests' IPYTHONDIR keeps their history out
        # of the user's ~/.ipython
        EG_ENV_PROCESS_WHITELIST="IPYTHONDIR",
        JUPYTER_PATH=str(data),  # its kernelspecs only, never the tests' cgpu ones
        JUPYTER_DATA_DIR=str(workdir / "data"),
        JUPYTER_CONFIG_DIR=str(workdir / "config"),
        JUPYTER_RUNTIME_DIR=str(workdir / "runtime"),
        PATH=f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    process = subprocess.Popen(
        [
            str(venv / "bin" / "python"),
            "-m",
            "enterprise_gateway",
            "--EnterpriseGatewayApp.ip=127.0.0.1",
            f"--EnterpriseGatewayApp.port={port}",
            "--EnterpriseGatewayApp.port_retries=0",
            f"--EnterpriseGatewayApp.list_kernels={list_kernels}",
            *extra,
        ],
        env=env,
        cwd=workdir,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("wb"),
    )
    return serving(process, port, token, workdir, log_path)


@contextlib.contextmanager
def enterprise_gateway(
    workdir: Path, *extra: str, list_kernels: bool = True
) -> Iterator[RemoteServer]:
    """A gateway for the block (its venv built first, or the test skipped), stopped after."""
    server = start_enterprise_gateway(venv_or_skip(), workdir, *extra, list_kernels=list_kernels)
    try:
        yield server
    finally:
        server.stop()
