"""Memory benchmark: the proxy's peak RSS for one large part of a message, as a ratio to it.

    nice python -m benchmarks.memory [--mb 100] [--header-mb 20] [--json PATH]

Through the proxy kernel (local backend, a real jupyter_client frontend) it measures, each
as the proxy's peak RSS (``VmHWM`` reset before) minus its RSS before, divided by the part's
size (issue 19's goal: at most 2x, both directions):

* ``code``: an ``execute_request`` whose code string is ``--mb`` MB (frontend to remote);
* ``header``: an ``execute_request`` with a ``--header-mb`` MB field in its header (the remote
  echoes it as the parent header of every reply and output: both directions, several times);
* ``buffer``: a comm message with a ``--mb`` MB buffer, echoed back by the kernel;
* ``stream``: a cell printing ``--mb`` MB at once past the output budget (ipykernel sends it as
  one message; the proxy spools it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from jupyter_client.provisioning.local_provisioner import LocalProvisioner

from benchmarks.run import ECHO_TARGET, SETUP_CODE
from tests.conftest import install_spec, run_cell, start_kernel
from tests.test_memory_bounds import PeakRss

MB = 1_000_000


def _wait_reply(kc: Any, msg_id: str, timeout: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        reply: dict[str, Any] = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


def _wait_idle(kc: Any, msg_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if (
            msg["parent_header"].get("msg_id") == msg_id
            and msg["msg_type"] == "status"
            and msg["content"]["execution_state"] == "idle"
        ):
            return


def measure(kc: Any, pid: int, size: int, header_size: int) -> dict[str, dict[str, float]]:
    results: dict[str, dict[str, float]] = {}

    def record(name: str, part: int, memory: PeakRss) -> None:
        results[name] = {
            "mb": part / MB,
            "added_mb": round(memory.added / MB, 1),
            "ratio": round(memory.added / part, 2),
        }
        print(
            f"{name:7} {part / MB:6.0f} MB: proxy +{memory.added / MB:7.1f} MB"
            f" ({memory.added / part:.2f}x)",
            flush=True,
        )

    run_cell(kc, SETUP_CODE)
    with PeakRss(pid) as memory:
        msg_id = kc.execute("pass  # " + "x" * size)
        _wait_reply(kc, msg_id)
    record("code", size, memory)

    msg = kc.session.msg("execute_request", {"code": "pass", "silent": False})
    msg["header"]["padding"] = "h" * header_size
    with PeakRss(pid) as memory:
        kc.shell_channel.send(msg)
        _wait_reply(kc, msg["header"]["msg_id"])
        _wait_idle(kc, msg["header"]["msg_id"])
    record("header", header_size, memory)

    comm_id = uuid.uuid4().hex
    kc.session.send(
        kc.shell_channel.socket,
        "comm_open",
        {"comm_id": comm_id, "target_name": ECHO_TARGET, "data": {}},
    )
    payload = random.randbytes(size)
    with PeakRss(pid) as memory:
        kc.session.send(
            kc.shell_channel.socket,
            "comm_msg",
            {"comm_id": comm_id, "data": {}},
            buffers=[payload],
        )
        while True:
            echoed = kc.get_iopub_msg(timeout=300)
            if echoed["msg_type"] == "comm_msg" and echoed["content"].get("comm_id") == comm_id:
                break
    assert bytes(echoed["buffers"][0]) == payload
    del echoed, payload
    record("buffer", size, memory)

    with PeakRss(pid) as memory:
        run_cell(
            kc,
            f"import sys; sys.stdout.write('y' * 99 + chr(10)) or None\n"
            f"sys.stdout.write(('z' * 99 + chr(10)) * ({size} // 100))",
            timeout=300,
        )
    record("stream", size, memory)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--header-mb", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        os.environ["JUPYTER_PATH"] = str(root / "jupyter")
        os.environ["CGPU_STATE_DIR"] = str(root / "state")
        os.environ["CGPU_SPOOL_DIR"] = str(root / "spool")
        km, kc = start_kernel(install_spec(root / "jupyter", "bench-memory", "local"))
        try:
            run_cell(kc, "1")
            assert isinstance(km.provisioner, LocalProvisioner)  # the kernel is a local process
            assert km.provisioner.pid is not None
            results = measure(kc, km.provisioner.pid, args.mb * MB, args.header_mb * MB)
        finally:
            kc.stop_channels()
            km.shutdown_kernel()
    for name, result in results.items():
        met = "met" if result["ratio"] <= 2.0 else "not met"
        print(f"goal {name}: {result['ratio']:.2f}x the message (target <= 2x): {met}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
