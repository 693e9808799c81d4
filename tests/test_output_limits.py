"""Output limits end to end: a real kernel floods, the frontend stays bounded, nothing is lost.

The remote is the local backend's private jupyter-server, whose own IOPub rate limit (which
*drops* output) is off, so everything the kernel prints reaches the proxy.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from .conftest import install_spec, run_cell, start_kernel

MB = 1024 * 1024


@pytest.fixture
def spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "spool"
    monkeypatch.setenv("CGPU_SPOOL_DIR", str(folder))
    return folder


def spooled(folder: Path, suffix: str = "-stdout.txt") -> bytes:
    files = sorted(folder.glob(f"*/*{suffix}"))
    assert len(files) == 1, files
    return files[0].read_bytes()


def streams(outputs: list[dict], name: str = "stdout") -> list[str]:
    return [
        m["content"]["text"]
        for m in outputs
        if m["msg_type"] == "stream" and m["content"]["name"] == name
    ]


class PeakMemory:
    """Samples a process's RSS in the background."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def limited_kernel(kernel_dir: Path, spool: Path) -> Iterator[tuple]:
    name = install_spec(kernel_dir, "cgpu-test-limits", "local")
    km, kc = start_kernel(name)
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel()


FLOOD = """
import sys, hashlib
digest = hashlib.sha256()
for block in range({blocks}):
    text = "".join(f"{{block:05d}}:{{i:05d}} " + "x" * 87 + "\\n" for i in range(10_000))
    digest.update(text.encode())
    sys.stdout.write(text)
    sys.stdout.flush()  # 1 MB messages (ipykernel would otherwise batch 0.2 s of output)
"""


def test_200_mb_cell_is_bounded_and_spooled_whole(limited_kernel: tuple, spool: Path) -> None:
    km, kc = limited_kernel
    with PeakMemory(km.provisioner.pid) as memory:
        reply, outputs = run_cell(kc, FLOOD.format(blocks=200), timeout=600)
    assert reply["content"]["status"] == "ok"
    shown = streams(outputs)
    notice = "".join(streams(outputs, "stderr"))
    assert "passed 2.0 MB" in notice and str(spool) in notice
    summary = shown[-1]
    assert "held back" in summary and "The last 20 line(s)" in summary
    head = "".join(shown[:-1])
    assert len(head) <= 2 * MB
    received = sum(len(t) for t in shown)
    assert received < 2 * MB + 64 * 1024  # the budget, the summary and its tail
    # the head plus the spool is every byte the cell printed, in order
    whole = hashlib.sha256(head.encode() + spooled(spool)).hexdigest()
    _, outputs = run_cell(kc, "print(digest.hexdigest())")
    assert "".join(streams(outputs)).strip() == whole
    assert summary.endswith("00199:09999 " + "x" * 87 + "\n")
    # the proxy streams to the spool: its memory stays far below the 200 MB that passed
    assert memory.peak < 150 * MB, memory.peak


def test_the_budget_counts_characters_and_the_kernels_count_never_reaches_a_frontend(
    limited_kernel: tuple, spool: Path
) -> None:
    """Large messages of 2-byte characters and backslashes (each two bytes or more of JSON):
    the budget is counted in characters, to the last whole line that fits, the rest spooled,
    nothing lost; the journal agent's character count and number, which the proxy reads,
    are in no message a frontend receives."""
    _, kc = limited_kernel
    line = "é\\" * 30 + "\n"
    code = (
        "import sys\n"
        f"line = {line!r}\n"
        "for _ in range(3):\n"
        "    sys.stdout.write(line * 20_000)\n"
        "    sys.stdout.flush()\n"
    )
    reply, outputs = run_cell(kc, code, timeout=120)
    assert reply["content"]["status"] == "ok"
    shown = streams(outputs)
    head = "".join(shown[:-1])
    assert 2 * MB - len(line) < len(head) <= 2 * MB  # the budget, to the last whole line
    assert head + spooled(spool).decode() == line * 60_000
    agents = {"cgpu_seq", "cgpu_chars"}  # (the proxy's own notices say so in their metadata)
    assert not [m["metadata"] for m in outputs if agents & set(m["metadata"])]


def test_single_huge_messages_arrive_bounded(limited_kernel: tuple, spool: Path) -> None:
    _, kc = limited_kernel
    reply, outputs = run_cell(kc, "print('y' * 11_000_000)", timeout=120)
    assert reply["content"]["status"] == "ok"
    shown = "".join(streams(outputs))
    assert shown.startswith("y" * 2 * MB)
    assert len(shown) < 2 * MB + 64 * 1024
    assert len(spooled(spool)) + 2 * MB == 11_000_001

    code = (
        "import os, hashlib\n"
        "from IPython.display import display\n"
        "import base64\n"
        "blob = os.urandom(50 * 1024 * 1024)\n"
        "display({'image/png': base64.b64encode(blob).decode(), 'text/plain': '<big>'}, raw=True)\n"
        "print(hashlib.sha256(blob).hexdigest())\n"
    )
    reply, outputs = run_cell(kc, code, timeout=300)
    assert reply["content"]["status"] == "ok"
    (display,) = [m for m in outputs if m["msg_type"] == "display_data"]
    placeholder = display["content"]["data"]
    assert list(placeholder) == ["text/plain"]
    assert "image/png" in placeholder["text/plain"] and "held back" in placeholder["text/plain"]
    png = sorted(spool.glob("*/*.png"))
    assert len(png) == 1
    digest = "".join(streams(outputs)).strip().splitlines()[0]
    assert hashlib.sha256(png[0].read_bytes()).hexdigest() == digest


@pytest.mark.parametrize(
    "redraws",
    [
        25_000,  # a bounded version for the default run: still 1.5 MB, 150x the budget
        pytest.param(100_000, marks=pytest.mark.slow),
    ],
)
@pytest.mark.timeout(400)  # 100,000 redraws: CPU-bound, ~40 s idle, over 120 s on a loaded machine
def test_progress_bar_and_live_plot_never_truncated(
    redraws: int, kernel_dir: Path, spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CGPU_MAX_OUTPUT_BYTES", "10000")
    monkeypatch.setenv("CGPU_MAX_RICH_OUTPUT_BYTES", "500000")
    km, kc = start_kernel(install_spec(kernel_dir, "cgpu-test-progress", "local"))
    try:
        bar = (
            "import sys\n"
            "from tqdm import tqdm\n"
            f"for _ in tqdm(range({redraws}), file=sys.stdout, mininterval=0, miniters=1,\n"
            "              ascii=True, ncols=60, bar_format='{n_fmt}/{total_fmt} |{bar}|'):\n"
            "    pass\n"
        )
        reply, outputs = run_cell(kc, bar, timeout=300)
        assert reply["content"]["status"] == "ok"
        text = "".join(streams(outputs))
        assert len(text) > 100 * 10_000  # every redraw, far past the 10 kB budget...
        assert "held back" not in text and not streams(outputs, "stderr")  # ...never truncated
        assert text.split("\r")[-1].startswith(f"{redraws}/{redraws} |" + "#" * 10)

        plot = (
            "import os, base64\n"
            "from IPython.display import clear_output, display\n"
            "for frame in range(30):\n"
            "    clear_output(wait=True)\n"
            "    image = base64.b64encode(bytes([frame]) * 100_000).decode()\n"
            "    display({'image/png': image, 'text/plain': f'frame {frame}'}, raw=True)\n"
        )
        reply, outputs = run_cell(kc, plot, timeout=120)
        frames = [m for m in outputs if m["msg_type"] == "display_data"]
        assert len(frames) == 30
        assert all("image/png" in m["content"]["data"] for m in frames)  # 3 MB, never held
        assert frames[-1]["content"]["data"]["text/plain"] == "frame 29"
        assert not list(spool.glob("*/*"))
    finally:
        kc.stop_channels()
        km.shutdown_kernel()


def test_bursts_are_coalesced_byte_exact(limited_kernel: tuple) -> None:
    _, kc = limited_kernel
    code = "import sys\nfor i in range(3000):\n    print(i, flush=True)\n"
    reply, outputs = run_cell(kc, code, timeout=120)
    assert reply["content"]["status"] == "ok"
    chunks = streams(outputs)
    assert "".join(chunks) == "".join(f"{i}\n" for i in range(3000))
    assert len(chunks) < 3000 / 2  # flush=True sends 3000 messages; far fewer arrive


@pytest.mark.parametrize("source", ["env", "kernelspec", "config"])
def test_budget_from_env_kernelspec_and_config(
    source: str,
    kernel_dir: Path,
    spool: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    extra: list[str] = []
    if source == "env":
        monkeypatch.setenv("CGPU_MAX_OUTPUT_BYTES", "3000")
    elif source == "kernelspec":
        extra = ["--max-output-bytes=3000"]
    else:
        config_dir = tmp_path / "config"
        config_dir.mkdir()
        (config_dir / "cgpu_kernel_config.py").write_text("c.ProxyKernel.max_output_bytes = 3000\n")
        monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(config_dir))
    name = install_spec(kernel_dir, f"cgpu-test-budget-{source}", "local", extra=extra)
    km, kc = start_kernel(name)
    try:
        _, outputs = run_cell(kc, "for i in range(1000):\n    print(f'{i:09d}')")
        shown = streams(outputs)
        head = "".join(shown[:-1])
        assert 2900 <= len(head) <= 3000
        assert "held back" in shown[-1]
        assert len(spooled(spool)) == 10_000 - len(head)
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
