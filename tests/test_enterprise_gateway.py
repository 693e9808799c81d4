"""Jupyter Enterprise Gateway as the remote: the same proxy, against the gateway clusters use.

The gateway (3.3.0, in its own venv: see ``tests/enterprise_gateway.py``) runs on loopback with
its default local process proxy, exactly as an admin runs it; on a cluster the same REST and
WebSocket front launches pods instead of processes. What differs from a plain jupyter-server and
is exercised here: ``KERNEL_*`` variables in the start request's ``env`` (which EG's process
proxies read), a slow launch (a pod being scheduled), EG's idle culling, interrupts through its
REST API, and its refusal to list kernels unless ``list_kernels`` is on.
"""

from __future__ import annotations

import getpass
import json
import os
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import jupyter_kernel_test as jkt
import papermill
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from cgpu_kernel.backends import registry

from .conftest import (
    RemoteServer,
    collect_iopub,
    install_remote_spec,
    install_spec,
    run_cell,
    start_kernel,
    stdout_of,
)
from .enterprise_gateway import (
    UNAUTHORIZED,
    enterprise_gateway,
    start_enterprise_gateway,
    venv_or_skip,
)
from .faults import FaultyPath
from .test_conformance import _PythonSamples
from .test_reconnect import LINES, kernel_through, numbered_lines, print_lines_under_faults

pytestmark = pytest.mark.servers

EG_SPEC = "cgpu-test-eg"


@pytest.fixture(scope="module")
def gateway(session_dir: Path) -> Iterator[RemoteServer]:
    """One Enterprise Gateway for this module's tests (the venv built first, or all skipped)."""
    server = start_enterprise_gateway(venv_or_skip(), session_dir / "eg")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def eg_spec(kernel_dir: Path, gateway: RemoteServer) -> str:
    return install_remote_spec(kernel_dir, EG_SPEC, gateway)


@pytest.fixture
def eg_proxy(eg_spec: str) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    km, kc = start_kernel(eg_spec)
    yield km, kc
    kc.stop_channels()
    if km.is_alive():
        km.shutdown_kernel()


def stream_text(outputs: list[dict]) -> str:
    return "".join(m["content"].get("text", "") for m in outputs if m["msg_type"] == "stream")


@pytest.mark.usefixtures("eg_spec")
class TestProxyOnEnterpriseGateway(_PythonSamples, jkt.KernelTests):
    """jupyter_kernel_test's conformance suite, every message checked against the spec."""

    kernel_name = EG_SPEC


# --- KERNEL_* variables in the start request ---------------------------------------------------


def test_kernel_env_reaches_the_remote_kernel_and_the_token_never_does(
    kernel_dir: Path, gateway: RemoteServer
) -> None:
    """Variables from the kernelspec and from the frontend's allow-list reach the kernel EG
    launched (EG passes KERNEL_* from the start request's ``env`` to its process proxy); the
    kernelspec's win; KERNEL_USERNAME is the local user; nothing else of the frontend's
    environment, least of all the token, goes along."""
    name = install_spec(
        kernel_dir,
        "cgpu-test-eg-env",
        "jupyter",
        url=gateway.url,  # no token file: the token comes from the frontend's CGPU_TOKEN
        extra=[
            "--kernel-env=KERNEL_CGPU_PROBE=from-kernelspec",
            "--kernel-env=KERNEL_NAMESPACE=from-kernelspec",
        ],
    )
    env = dict(
        os.environ,
        CGPU_TOKEN=gateway.token,
        KERNEL_NAMESPACE="from-frontend",
        KERNEL_IMAGE="frontend/image:1",
        KERNEL_NOT_ON_THE_LIST="stays home",
    )
    km, kc = start_kernel(name, env=env)
    try:
        reply, outputs = run_cell(kc, "import json, os; print(json.dumps(dict(os.environ)))")
        assert reply["content"]["status"] == "ok", reply["content"]
        remote = json.loads(stdout_of(outputs))
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert remote["KERNEL_CGPU_PROBE"] == "from-kernelspec"
    assert remote["KERNEL_NAMESPACE"] == "from-kernelspec"
    assert remote["KERNEL_IMAGE"] == "frontend/image:1"
    assert remote["KERNEL_USERNAME"] == getpass.getuser()
    assert "KERNEL_NOT_ON_THE_LIST" not in remote
    assert "CGPU_TOKEN" not in remote
    assert all(gateway.token not in value for value in remote.values())


def test_a_bad_kernel_launch_timeout_is_said_in_the_cell(
    kernel_dir: Path, gateway: RemoteServer
) -> None:
    name = install_remote_spec(
        kernel_dir,
        "cgpu-test-eg-bad-timeout",
        gateway,
        extra=["--kernel-env=KERNEL_LAUNCH_TIMEOUT=soon"],
    )
    km, kc = start_kernel(name)
    try:
        reply, _ = run_cell(kc, "1")
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert reply["content"]["status"] == "error"
    assert "KERNEL_LAUNCH_TIMEOUT='soon'" in reply["content"]["evalue"]


def test_a_user_the_gateway_refuses_is_told_why(kernel_dir: Path, gateway: RemoteServer) -> None:
    """EG answers 403 to a start for a user in EG_UNAUTHORIZED_USERS (root, as EG ships): the
    token was fine, so the cell says what the gateway refuses and what to change."""
    env = dict(os.environ, KERNEL_USERNAME=UNAUTHORIZED)
    km, kc = start_kernel(install_remote_spec(kernel_dir, "cgpu-test-eg-refused", gateway), env=env)
    try:
        reply, _ = run_cell(kc, "1")
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert reply["content"]["status"] == "error"
    said = reply["content"]["evalue"]
    assert "accepted our token but refused to start a kernel" in said
    assert f"KERNEL_USERNAME={UNAUTHORIZED!r}" in said and "EG_UNAUTHORIZED_USERS" in said


# --- a slow launch (a pod being scheduled) -----------------------------------------------------


def _first_cell_without_waiting(name: str) -> tuple[dict, list[dict]]:
    """Start the proxy and send a cell at once, as a notebook does, so the cell waits through
    the whole launch of the remote kernel (``python3-slow`` sleeps before it starts)."""
    km = KernelManager(kernel_name=name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        return run_cell(kc, "print('up')", timeout=60)
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_a_slow_launch_shows_progress_and_honours_kernel_launch_timeout(
    kernel_dir: Path, gateway: RemoteServer
) -> None:
    """The gateway's kernel takes 8 s to come up. With a 3 s --startup-timeout alone the cell
    fails with an error naming the option; with KERNEL_LAUNCH_TIMEOUT the proxy waits as long
    as the gateway was told it may take, and the cell says it is still starting meanwhile."""
    short = install_remote_spec(
        kernel_dir,
        "cgpu-test-eg-short",
        gateway,
        remote_kernel="python3-slow",
        extra=["--startup-timeout=3"],
    )
    reply, _ = _first_cell_without_waiting(short)
    assert reply["content"]["status"] == "error"
    assert "--startup-timeout" in reply["content"]["evalue"]

    patient = install_remote_spec(
        kernel_dir,
        "cgpu-test-eg-patient",
        gateway,
        remote_kernel="python3-slow",
        extra=[
            "--startup-timeout=3",
            "--startup-progress-interval=2",
            "--kernel-env=KERNEL_LAUNCH_TIMEOUT=20",
        ],
    )
    reply, outputs = _first_cell_without_waiting(patient)
    assert reply["content"]["status"] == "ok", reply["content"]
    told = stream_text(outputs)
    assert "up\n" in told
    assert "still starting" in told
    assert "waiting up to 50 s" in told  # KERNEL_LAUNCH_TIMEOUT and the channels' slack


# --- the kernel's life: notebooks, interrupt, restart, shutdown -------------------------------


def test_notebook_with_nbclient_and_papermill(eg_spec: str, tmp_path: Path) -> None:
    import nbformat

    cells = [
        new_code_cell("n = 2", metadata={"tags": ["parameters"]}),
        new_code_cell("for i in range(n):\n    print('line', i)"),
        new_code_cell("from IPython.display import HTML, display\ndisplay(HTML('<i>rich</i>'))"),
    ]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": eg_spec, "display_name": "cgpu", "language": "python"}
    NotebookClient(nb, kernel_name=eg_spec, timeout=60, startup_timeout=60).execute()
    assert nb.cells[1]["outputs"][0]["text"] == "line 0\nline 1\n"
    assert nb.cells[2]["outputs"][0]["data"]["text/html"] == "<i>rich</i>"

    source, output = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(new_notebook(cells=cells, metadata=nb.metadata), source)
    papermill.execute_notebook(
        str(source), str(output), parameters={"n": 3}, kernel_name=eg_spec, progress_bar=False
    )
    done = nbformat.read(output, as_version=4)
    printed = [c for c in done.cells if "print('line'" in c.source]
    assert printed[0]["outputs"][0]["text"] == "line 0\nline 1\nline 2\n"


def test_interrupt_goes_through_the_gateway(
    eg_proxy: tuple[KernelManager, BlockingKernelClient],
) -> None:
    km, kc = eg_proxy
    msg_id = kc.execute("import time\nprint('sleeping', flush=True)\ntime.sleep(60)")
    while True:  # wait until the remote kernel runs it
        msg = kc.get_iopub_msg(timeout=30)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
    km.interrupt_kernel()
    outputs = collect_iopub(kc, msg_id, timeout=30)
    errors = [m["content"]["ename"] for m in outputs if m["msg_type"] == "error"]
    assert errors == ["KeyboardInterrupt"]
    _reply, outputs = run_cell(kc, "print('after')")
    assert stdout_of(outputs) == "after\n"


def test_restart_and_shutdown_leave_no_kernels_on_the_gateway(
    eg_spec: str, gateway: RemoteServer
) -> None:
    """Asked through EG's own REST API (``/api/kernels``, listing enabled)."""
    before = gateway.kernel_ids()
    km, kc = start_kernel(eg_spec)
    try:
        run_cell(kc, "marker = 'old state'")
        (first,) = gateway.kernel_ids() - before
        km.restart_kernel()
        kc.wait_for_ready(timeout=60)
        reply, _ = run_cell(kc, "marker")
        assert reply["content"]["ename"] == "NameError"  # a fresh remote kernel
        now = gateway.kernel_ids() - before
        assert first not in now and len(now) == 1  # the old one was deleted
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert gateway.wait_for_kernel_count(len(before)) == before


def test_cuts_lose_nothing_through_the_gateway(kernel_dir: Path, gateway: RemoteServer) -> None:
    """Connections reset mid-cell between the proxy and the gateway: every line once, in
    order (the gateway's WebSocket is jupyter_server 1.24's)."""
    with FaultyPath(gateway.port) as faulty:
        name = install_spec(
            kernel_dir,
            "cgpu-test-eg-faulty",
            "jupyter",
            url=faulty.url,
            token_file=gateway.token_file,
            extra=["--ping-interval=0.5", "--outage-notice-after=1"],
        )
        with kernel_through(name, faulty) as (_, kc):
            run_cell(kc, "survivor = 'still here'")
            reply, outputs = print_lines_under_faults(kc, faulty.reset, times=4, seed=5)
            assert reply["content"]["status"] == "ok", reply["content"]
            assert numbered_lines(outputs) == list(range(LINES))
            assert faulty.connections_seen > 4
            _, outputs = run_cell(kc, "print(survivor)")
            assert stdout_of(outputs) == "still here\n"


# --- idle culling ------------------------------------------------------------------------------


def _remote_kernel_of(url: str) -> str:
    """The remote kernel our proxy started on ``url`` (from the reclaim records: the gateway
    below does not list its kernels)."""
    (record,) = [r for r in registry.records() if r["url"] == url]
    return str(record["kernel_id"])


def _gone(server: RemoteServer, kernel_id: str) -> bool:
    try:
        server.api("GET", f"api/kernels/{kernel_id}")
    except urllib.error.HTTPError as exc:
        return exc.code == 404
    return False


def wait_until_dead(km: KernelManager, timeout: float = 60) -> None:
    """The proxy process ended (``on_remote_death=exit``): the frontend sees a dead kernel."""
    deadline = time.monotonic() + timeout
    while km.is_alive():
        assert time.monotonic() < deadline, "the proxy outlived its culled remote kernel"
        time.sleep(0.2)


@pytest.mark.parametrize("on_death", ["exit", "continue"])
def test_a_kernel_culled_by_the_gateway_is_gone_not_a_network_fault(
    kernel_dir: Path, session_dir: Path, on_death: str
) -> None:
    """EG culls idle kernels (shortened here to 3 s, connected ones included, as a deployment
    may configure). The proxy asks the gateway, learns the kernel is gone (404, not an
    outage), and, as for any dead remote kernel: by default (``exit``) the proxy ends, so the
    frontend sees its kernel die and its restart gives a fresh one; with ``continue`` the next
    cell says so and runs on a fresh kernel in the same proxy. This gateway also has the kernel
    listing off, as EG ships: nothing the proxy does needs it."""
    with enterprise_gateway(
        session_dir / f"eg-cull-{on_death}",
        "--MappingKernelManager.cull_idle_timeout=3",
        "--MappingKernelManager.cull_interval=1",
        "--MappingKernelManager.cull_connected=True",
        list_kernels=False,
    ) as gateway:
        with pytest.raises(urllib.error.HTTPError) as listing:
            gateway.api("GET", "api/kernels")
        assert listing.value.code == 403
        name = install_remote_spec(
            kernel_dir,
            f"cgpu-test-eg-cull-{on_death}",
            gateway,
            extra=["--outage-notice-after=1", f"--on-remote-death={on_death}"],
        )
        km, kc = start_kernel(name)
        try:
            run_cell(kc, "doomed = True")
            culled = _remote_kernel_of(gateway.url)
            deadline = time.monotonic() + 30
            while not _gone(gateway, culled):
                assert time.monotonic() < deadline, "the gateway did not cull the idle kernel"
                time.sleep(0.5)
            if on_death == "exit":
                wait_until_dead(km)
                km.restart_kernel(now=True)  # what a frontend's restarter does
                kc.wait_for_ready(timeout=60)
            reply, outputs = run_cell(kc, "print('fresh')", timeout=60)
            assert reply["content"]["status"] == "ok", reply["content"]
            told = stream_text(outputs)
            assert "fresh\n" in told
            assert "reconnecting" not in told  # gone, not a network fault
            if on_death == "continue":
                assert "previous remote kernel was lost" in told
            reply, _ = run_cell(kc, "doomed")
            assert reply["content"]["ename"] == "NameError"
            assert _remote_kernel_of(gateway.url) != culled
        finally:
            kc.stop_channels()
            km.shutdown_kernel()
