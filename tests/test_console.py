"""The proxy kernel from the terminal: ``jupyter console`` (pexpect) and ``nbconvert --execute``.

Both start the kernel the way a user does, from an installed kernelspec (``local`` backend: the
proxy starts a private jupyter-server on 127.0.0.1 standing in for the remote), and both must
leave no process behind.
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from pathlib import Path

import nbformat
import pexpect
import psutil
import pytest

from .conftest import install_spec, nbconvert_execute

ROOT = Path(__file__).resolve().parent.parent
PROMPT = r"In \[\d+\]: "

pytestmark = [pytest.mark.servers, pytest.mark.timeout(300)]


def assert_all_gone(processes: list[psutil.Process], timeout: float = 30) -> None:
    """The proxy, its private server and the remote kernel exit once the frontend is done."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for process in alive:
        process.kill()
    assert not alive, [(p.pid, p.cmdline()) for p in alive]


def test_jupyter_console(local_spec: str, tmp_path: Path) -> None:
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), TERM="dumb")
    child = pexpect.spawn(
        sys.executable,
        [
            "-m",
            "jupyter_console",
            f"--kernel={local_spec}",
            "--ZMQTerminalInteractiveShell.simple_prompt=True",
            "--ZMQTerminalInteractiveShell.kernel_timeout=120",
        ],
        env=env,
        cwd=str(tmp_path),
        encoding="utf-8",
        timeout=120,
        dimensions=(40, 200),
    )
    transcript = tmp_path / "console.log"
    child.logfile_read = transcript.open("w")
    try:
        child.expect(PROMPT)
        descendants = psutil.Process(child.pid).children(recursive=True)

        # a print, executed by the remote kernel behind the proxy
        child.sendline("import os; print('hello from pid', os.getpid(), 6 * 7)")
        child.expect(r"hello from pid (\d+) 42")
        remote = psutil.Process(int(child.match.group(1)))
        chain = [p.pid for p in remote.parents()]
        proxy = psutil.Process(chain[chain.index(child.pid) - 1])
        assert "cgpu_kernel" in proxy.cmdline(), proxy.cmdline()
        assert remote.ppid() != proxy.pid  # the private jupyter-server sits between them
        child.expect(PROMPT)

        # input(): the console prompts, the answer goes back over stdin to the remote kernel
        # (the code builds the texts it prints, so the echo of the typed line cannot match)
        child.sendline("name = input('Your ' + 'name? '); print('hello', name[::-1])")
        child.expect_exact("Your name? ")
        child.sendline("elosnoc")
        child.expect_exact("hello console")
        child.expect(PROMPT)

        # Ctrl-C interrupts the running cell; the kernel keeps its state
        child.sendline("import time; print('sleep' + 'ing', flush=True); time.sleep(60)")
        child.expect_exact("sleeping")
        child.sendintr()
        child.expect_exact("KeyboardInterrupt", timeout=60)
        child.expect(PROMPT)
        child.sendline("print('still here', name)")
        child.expect_exact("still here elosnoc")
        child.expect(PROMPT)

        child.sendline("exit")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, transcript.read_text()[-3000:]
        assert_all_gone(descendants)
    finally:
        if child.isalive():
            child.terminate(force=True)
        child.logfile_read.close()


def stdout_of(cell: nbformat.NotebookNode) -> str:
    return "".join(
        o["text"] for o in cell["outputs"] if o["output_type"] == "stream" and o["name"] == "stdout"
    )


def marked(marker: str) -> list[psutil.Process]:
    """The live processes whose environment carries ``CGPU_TEST_MARKER=marker``."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("CGPU_TEST_MARKER") == marker:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def test_nbconvert_execute_example(kernel_dir: Path, tmp_path: Path) -> None:
    """The quickstart as users run it: its metadata names ``cgpu-local``; nothing overrides it."""
    marker = uuid.uuid4().hex
    example = ROOT / "examples" / "quickstart.ipynb"
    assert nbformat.read(example, as_version=4).metadata.kernelspec.name == "cgpu-local"
    install_spec(kernel_dir, "cgpu-local", "local")
    nbconvert_execute(
        example,
        "--ExecutePreprocessor.timeout=120",
        "--ExecutePreprocessor.startup_timeout=120",
        "--output-dir",
        str(tmp_path),
        cwd=tmp_path,
        env=dict(os.environ, CGPU_TEST_MARKER=marker),
        timeout=240,
    )
    nb = nbformat.read(tmp_path / "quickstart.ipynb", as_version=4)
    cells = {cell.id: cell for cell in nb.cells}
    assert "Hello from the remote kernel" in stdout_of(cells["cell-1"])
    assert re.search(r"remote kernel pid: \d+", stdout_of(cells["cell-1"]))
    torch_line = stdout_of(cells["cell-2"])
    assert "CUDA available:" in torch_line or "torch is not installed" in torch_line
    html = [o for o in cells["cell-3"].outputs if o["output_type"] == "display_data"]
    assert html[0]["data"]["text/html"].startswith("<b>Rich output</b>")
    (result,) = [o for o in cells["cell-3"].outputs if o["output_type"] == "execute_result"]
    assert result["data"]["text/plain"] == "285"
    assert stdout_of(cells["cell-4"]) == "squares still here: [49, 64, 81]\n"
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    # nbconvert shut the kernel down: no proxy, private server or remote kernel outlives it
    deadline = time.monotonic() + 30
    while marked(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert_all_gone(marked(marker), timeout=1)
