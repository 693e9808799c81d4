"""A remote kernel that dies is a dead kernel to the frontend (``on_remote_death``).

By default (``exit``) the proxy dies with its remote kernel, as a local kernel would: nbclient
raises ``DeadKernelError`` (as in its own ``test_kernel_death_during_execution``), papermill
stops instead of running the rest of the notebook on an empty kernel, and a frontend's restarter
(jupyter_client's ``KernelRestarter``, which JupyterLab and VS Code rely on) brings back a
working kernel. No remote kernel is left behind. With ``continue`` the proxy stays up and the
next cell runs on a fresh remote kernel (tests/test_reconnect.py covers that mode further).
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import papermill
import pytest
from jupyter_client.manager import KernelManager
from jupyter_client.restarter import KernelRestarter
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from nbformat.v4 import new_code_cell, new_notebook

from .conftest import RemoteServer, install_remote_spec, run_cell, start_kernel, stdout_of

#: two ways a kernel process dies mid-cell: its own exit, and SIGKILL (the OOM killer's)
DEATHS = {
    "exit": "import os; os._exit(1)",
    "sigkill": "import os, signal; os.kill(os.getpid(), signal.SIGKILL)",
}


def dying_notebook(death: str, kernel_name: str) -> nbformat.NotebookNode:
    nb = new_notebook(
        cells=[
            new_code_cell("x = 1"),
            new_code_cell(DEATHS[death]),
            new_code_cell("print('after', x)"),
        ]
    )
    nb.metadata["kernelspec"] = {"name": kernel_name, "display_name": "t", "language": "python"}
    return nb


def died_with(cell: nbformat.NotebookNode) -> str:
    """The error the proxy put in the output of the cell that was running."""
    (error,) = [o for o in cell["outputs"] if o["output_type"] == "error"]
    assert error["ename"] == "RemoteKernelLost"
    return str(error["evalue"])


def no_remote_kernel_left(server: RemoteServer, before: set[str]) -> None:
    assert server.wait_for_kernel_count(len(before)) == before


@pytest.mark.parametrize("death", sorted(DEATHS))
def test_nbclient_sees_a_dead_kernel(
    jupyter_spec: str, jupyter_server: RemoteServer, death: str
) -> None:
    before = jupyter_server.kernel_ids()
    nb = dying_notebook(death, jupyter_spec)
    client = NotebookClient(nb, kernel_name=jupyter_spec, timeout=60)
    with pytest.raises(DeadKernelError):
        client.execute()
    said = died_with(nb.cells[1])
    assert "variables are lost" in said and "on_remote_death=continue" in said
    assert nb.cells[2]["outputs"] == []  # never run on an empty kernel
    no_remote_kernel_left(jupyter_server, before)


def test_papermill_stops_when_the_remote_kernel_dies(
    jupyter_spec: str, jupyter_server: RemoteServer, tmp_path: Path
) -> None:
    before = jupyter_server.kernel_ids()
    source, output = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(dying_notebook("sigkill", jupyter_spec), source)
    with pytest.raises(DeadKernelError):
        papermill.execute_notebook(
            str(source), str(output), kernel_name=jupyter_spec, progress_bar=False
        )
    cells = nbformat.read(output, as_version=4).cells
    assert "variables are lost" in died_with(cells[1])
    assert cells[2]["outputs"] == [] and cells[2]["execution_count"] is None
    no_remote_kernel_left(jupyter_server, before)


def test_a_restarter_brings_back_a_working_kernel(
    jupyter_spec: str, jupyter_server: RemoteServer
) -> None:
    """What JupyterLab and VS Code do with a dead kernel: jupyter_client's restarter starts the
    kernelspec's process again, which starts a fresh remote kernel."""
    before = jupyter_server.kernel_ids()
    km, kc = start_kernel(jupyter_spec)
    restarter = KernelRestarter(kernel_manager=km, restart_limit=2)
    restarted: list[str] = []
    restarter.add_callback(lambda: restarted.append("restart"), "restart")
    try:
        run_cell(kc, "x = 1")
        first = jupyter_server.kernel_ids() - before
        kc.execute(DEATHS["exit"])
        deadline = time.monotonic() + 60
        while not restarted:
            assert time.monotonic() < deadline, "the proxy never exited"
            restarter.poll()
            time.sleep(0.2)
        kc.stop_channels()
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        reply, outputs = run_cell(kc, "print('fresh', 'x' in dir())", timeout=60)
        assert reply["content"]["status"] == "ok"
        assert stdout_of(outputs) == "fresh False\n"
        now = jupyter_server.kernel_ids() - before
        assert len(now) == 1 and not now & first  # a new remote kernel, the old one deleted
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    no_remote_kernel_left(jupyter_server, before)


def test_continue_keeps_the_kernel_on_a_fresh_remote_kernel(
    kernel_dir: Path, jupyter_server: RemoteServer
) -> None:
    """``--option on_remote_death=continue``: the behaviour before ``exit`` was the default."""
    name = install_remote_spec(
        kernel_dir, "cgpu-test-continue", jupyter_server, extra=["--on-remote-death=continue"]
    )
    km: KernelManager
    km, kc = start_kernel(name)
    try:
        run_cell(kc, "x = 1")
        reply, _ = run_cell(kc, DEATHS["sigkill"], timeout=60)
        assert reply["content"]["ename"] == "RemoteKernelLost"
        assert km.is_alive()
        deadline = time.monotonic() + 30
        while run_cell(kc, "1", timeout=30)[0]["content"]["status"] != "ok":
            assert time.monotonic() < deadline, "the restarted remote kernel never ran a cell"
            time.sleep(0.5)
        reply, _ = run_cell(kc, "x")
        assert reply["content"]["ename"] == "NameError"  # a fresh kernel, said so
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
