"""End to end in a real browser: JupyterLab, headless Chromium, the proxy kernel (local backend).

JupyterLab runs on 127.0.0.1 with a random port and token and finds our kernelspec through the
JUPYTER_PATH the session fixture sets. Playwright drives Debian's ``/usr/bin/chromium`` (it never
downloads a browser): a new notebook, our kernel picked by its display name in the kernel picker,
then a print, a rich display, widgets (comm messages both ways, an image as a binary buffer), an
``input()`` answered in the page's stdin box, an interrupted ``sleep`` and a restart, each output
read back from the page. A screenshot (and the page's console log) lands in ``test-artifacts/``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from playwright.sync_api import Locator, Page, expect, sync_playwright

from .conftest import free_port, install_spec

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
KERNEL_NAME = "cgpu-browser"
DISPLAY_NAME = f"test {KERNEL_NAME}"  # what conftest's install_spec writes
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--no-first-run",
    "--no-default-browser-check",
    "--mute-audio",
]
#: Milliseconds. Generous: the first cell waits for the proxy to start its private
#: jupyter-server and the remote ipykernel, on a machine other test runs are loading too.
SLOW = 120_000
WAIT = 60_000
STDOUT = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stdout']"
STDERR = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"

pytestmark = [
    pytest.mark.servers,
    pytest.mark.timeout(360),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: /usr/bin/chromium"),
]


@dataclass
class Lab:
    url: str
    token: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def api(self, method: str, path: str) -> Any:
        request = urllib.request.Request(
            self.url + path, method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            data = response.read()
        return json.loads(data) if data else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def quiet_settings(settings_dir: Path) -> None:
    """No news or update toasts over the notebook: they would cover what the test reads."""
    folder = settings_dir / "@jupyterlab" / "apputils-extension"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False, "doNotDisturbMode": True})
    )


def start_lab(root: Path) -> Lab:
    token = secrets.token_hex(16)
    port = free_port()
    root.mkdir(parents=True, exist_ok=True)
    quiet_settings(root / "settings")
    log_path = root / "lab.log"
    # the session fixture's JUPYTER_PATH (where our kernelspec is) goes through os.environ
    assert os.environ.get("JUPYTER_PATH"), "the session fixture sets JUPYTER_PATH"
    env = dict(
        os.environ,
        JUPYTER_RUNTIME_DIR=str(root / "runtime"),
        JUPYTER_CONFIG_DIR=str(root / "config"),
    )
    env.pop("JUPYTER_TOKEN", None)
    notebooks = root / "notebooks"
    notebooks.mkdir(exist_ok=True)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--ServerApp.ip=127.0.0.1",
            f"--ServerApp.port={port}",
            "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False",
            f"--IdentityProvider.token={token}",
            f"--ServerApp.root_dir={notebooks}",
            "--ServerApp.allow_root=True",
            f"--LabApp.user_settings_dir={root / 'settings'}",
            f"--LabApp.workspaces_dir={root / 'workspaces'}",
            "--LabApp.news_url=None",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log_path.open("wb"),
    )
    lab = Lab(f"http://127.0.0.1:{port}/", token, process, log_path)
    deadline = time.monotonic() + 90
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"JupyterLab exited:\n{lab.log()}")
        try:
            lab.api("GET", "api/status")
            return lab
        except (urllib.error.URLError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                stop_lab(lab)
                raise RuntimeError(f"JupyterLab did not come up:\n{lab.log()}") from None
            time.sleep(0.3)


def stop_lab(lab: Lab) -> list[psutil.Process]:
    """Shut the kernels down, stop the server; the processes it started that are still alive."""
    try:
        descendants = psutil.Process(lab.process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    try:
        for kernel in lab.api("GET", "api/kernels"):
            lab.api("DELETE", f"api/kernels/{kernel['id']}")
    except (urllib.error.URLError, ConnectionError, OSError):
        pass
    lab.process.terminate()
    try:
        lab.process.wait(30)
    except subprocess.TimeoutExpired:
        lab.process.kill()
        lab.process.wait(10)
    _, alive = psutil.wait_procs(descendants, timeout=30)
    return alive


@pytest.fixture(scope="module")
def lab(kernel_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    install_spec(kernel_dir, KERNEL_NAME, "local")
    server = start_lab(tmp_path_factory.mktemp("lab"))
    try:
        specs = server.api("GET", "api/kernelspecs")["kernelspecs"]
        assert KERNEL_NAME in specs, f"JupyterLab does not see our kernelspec: {sorted(specs)}"
        assert specs[KERNEL_NAME]["spec"]["display_name"] == DISPLAY_NAME
        yield server
    finally:
        leftovers = stop_lab(server)
        for process in leftovers:
            process.kill()
    # the proxy kernel, its private jupyter-server and the remote ipykernel all went away
    assert not leftovers, [p.pid for p in leftovers]


@pytest.fixture(scope="module")
def page_log() -> list[str]:
    """What the page wrote to its console, and any uncaught exception in it."""
    return []


@pytest.fixture(scope="module")
def page(lab: Lab, page_log: list[str]) -> Iterator[Page]:
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            tab = context.new_page()
            tab.set_default_timeout(WAIT)
            tab.on("console", lambda m: page_log.append(f"console.{m.type}: {m.text}"))
            tab.on("pageerror", lambda e: page_log.append(f"uncaught: {e}"))
            try:
                yield tab
            finally:
                (ARTIFACTS / "browser-console.log").write_text("\n".join(page_log) + "\n")
        finally:
            browser.close()


def tiny_png(width: int, height: int) -> bytes:
    """A valid RGB PNG of the given size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        checksum = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + checksum

    rows = b"".join(b"\x00" + bytes([200, 40, 40]) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def code_cells(page: Page) -> Locator:
    return page.locator(".jp-NotebookPanel .jp-Notebook .jp-CodeCell")


def run_cell(page: Page, code: str) -> Locator:
    """Type ``code`` into the notebook's last cell and run it (Shift+Enter); that cell."""
    cells = code_cells(page)
    index = cells.count() - 1
    cell = cells.nth(index)
    cell.locator(".cm-content").click()
    page.keyboard.type(code)
    page.keyboard.press("Shift+Enter")
    # Shift+Enter on the last cell appends a fresh one: the next run_cell types there
    page.wait_for_function(
        "n => document.querySelectorAll('.jp-NotebookPanel .jp-Notebook .jp-CodeCell').length > n",
        arg=index + 1,
    )
    return cell


def test_jupyterlab_notebook_through_the_proxy(lab: Lab, page: Page, page_log: list[str]) -> None:
    screenshot = ARTIFACTS / "browser-jupyterlab.png"
    try:
        page.goto(f"{lab.url}lab?reset&token={lab.token}")
        page.wait_for_selector(".jp-Launcher", timeout=SLOW)

        # File > New > Notebook opens the kernel picker; choose ours by its display name
        page.click("#jp-MainMenu .lm-MenuBar-item:has-text('File')")
        page.hover(".lm-Menu .lm-Menu-item[data-type='submenu']:has-text('New')")
        page.click(".lm-Menu-item[data-command='notebook:create-new']")
        picker = page.locator(".jp-Dialog")
        expect(picker.locator(".jp-Dialog-header")).to_contain_text("Select Kernel")
        picker.locator("select").select_option(label=DISPLAY_NAME)
        picker.locator(".jp-mod-accept").click()
        expect(picker).to_have_count(0)

        toolbar = page.locator(".jp-NotebookPanel-toolbar")
        expect(toolbar.locator(".jp-KernelName")).to_have_text(DISPLAY_NAME)
        expect(toolbar.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute(
            "data-status", "idle", timeout=SLOW
        )

        # 1. a print, in the remote kernel: two hops from JupyterLab, not the proxy itself
        cell = run_cell(page, "import os; print('hello from the remote kernel', os.getpid())")
        stdout = cell.locator(STDOUT)
        expect(stdout).to_contain_text("hello from the remote kernel", timeout=SLOW)
        match = re.search(r"hello from the remote kernel (\d+)", stdout.inner_text())
        assert match, stdout.inner_text()
        remote = psutil.Process(int(match.group(1)))
        chain = [p.pid for p in remote.parents()]
        assert lab.process.pid in chain
        proxy = psutil.Process(chain[chain.index(lab.process.pid) - 1])
        assert "cgpu_kernel" in proxy.cmdline(), proxy.cmdline()
        assert remote.pid != proxy.pid and remote.ppid() != proxy.pid  # the private server between

        # 2. a rich display: HTML rendered as HTML, and an execute_result
        cell = run_cell(
            page,
            "from IPython.display import HTML, display; "
            "display(HTML('<b>rich</b> <i>output</i>')); 6 * 7",
        )
        html = cell.locator(".jp-OutputArea-output[data-mime-type='text/html']")
        expect(html.locator("b")).to_have_text("rich", timeout=SLOW)
        expect(html.locator("i")).to_have_text("output")
        expect(cell.locator(".jp-OutputArea-executeResult")).to_contain_text("42")

        # a widget: its comm messages cross both hops, and a change from the kernel shows up
        cell = run_cell(
            page, "import ipywidgets; slider = ipywidgets.IntSlider(value=7, max=50); slider"
        )
        readout = cell.locator(".widget-readout")
        expect(readout).to_have_text("7", timeout=SLOW)
        run_cell(page, "slider.value = 33")
        expect(readout).to_have_text("33", timeout=WAIT)
        # and a change made in the page reaches the kernel
        cell.locator(".noUi-handle").focus()
        page.keyboard.press("ArrowRight")
        expect(readout).to_have_text("34")
        cell = run_cell(page, "print('slider at', slider.value)")
        expect(cell.locator(".jp-OutputArea-output")).to_contain_text("slider at 34", timeout=WAIT)

        # an image widget: its PNG travels as a binary buffer and the browser decodes it
        png = base64.b64encode(tiny_png(5, 3)).decode()
        cell = run_cell(
            page,
            f"import base64; ipywidgets.Image(value=base64.b64decode('{png}'), format='png')",
        )
        image = cell.locator("img.widget-image")
        expect(image).to_have_js_property("naturalWidth", 5, timeout=WAIT)
        expect(image).to_have_js_property("naturalHeight", 3)

        # 3. input(): the request reaches the page's stdin box, the answer reaches the kernel
        cell = run_cell(page, "name = input('Your name? '); print('hello', name[::-1])")
        box = cell.locator("input.jp-Stdin-input")
        expect(box).to_be_visible(timeout=SLOW)
        expect(cell.locator(".jp-OutputArea-output").first).to_contain_text("Your name?")
        box.press_sequentially("resworb")
        box.press("Enter")
        expect(cell.locator(".jp-OutputArea-output").last).to_contain_text(
            "hello browser", timeout=SLOW
        )
        expect(box).to_have_count(0)

        # 4. an interrupted sleep: toolbar interrupt -> KeyboardInterrupt, kernel still usable
        cell = run_cell(page, "import time; print('sleeping', flush=True); time.sleep(60)")
        expect(cell.locator(".jp-OutputArea-output").first).to_contain_text(
            "sleeping", timeout=SLOW
        )
        expect(cell.locator(".jp-InputPrompt")).to_contain_text("*")
        toolbar.locator("[data-command='notebook:interrupt-kernel']").click()
        error = cell.locator(STDERR)
        expect(error).to_contain_text("KeyboardInterrupt", timeout=WAIT)
        expect(cell.locator(".jp-InputPrompt")).not_to_contain_text("*")

        cell = run_cell(page, "print('still here', name, 6 * 7)")
        expect(cell.locator(".jp-OutputArea-output")).to_contain_text(
            "still here resworb 42", timeout=SLOW
        )
        expect(toolbar.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute(
            "data-status", "idle"
        )

        # 5. restart from the toolbar: a fresh remote kernel, the old one gone
        toolbar.locator("[data-command='notebook:restart-kernel']").click()
        page.locator(".jp-Dialog .jp-mod-accept").click()
        expect(page.locator(".jp-Dialog")).to_have_count(0)
        cell = run_cell(page, "import os; print('fresh', 'name' in dir(), os.getpid())")
        expect(cell.locator(STDOUT)).to_contain_text("fresh False", timeout=SLOW)
        match = re.search(r"fresh False (\d+)", cell.locator(STDOUT).inner_text())
        assert match
        assert int(match.group(1)) != remote.pid
        gone, _ = psutil.wait_procs([remote], timeout=30)
        assert gone, "the remote kernel from before the restart is still running"
    finally:
        page.screenshot(path=str(screenshot), full_page=True)
    assert screenshot.stat().st_size > 10_000
    # no kernel or WebSocket trouble reported in the page, no uncaught exception
    assert not [m for m in page_log if m.startswith(("uncaught", "console.error"))], page_log
