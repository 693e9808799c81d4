"""``%cgpu upload`` / ``download`` / ``ls``: files between the notebook's folder and the remote.

Unit level: ``core.files`` (the cell's first line, remote paths and ``..``, the progress line's
rate). End to end: a real ``jupyter_client`` frontend, nbclient and papermill on the proxy
kernel (``jupyter`` backend) in front of a real jupyter-server on loopback, whose root is the
remote kernel's folder; the remote side of every check is read by the remote kernel itself (its
``open()``), the local side from disk. The proxy's memory is its own peak RSS (``VmHWM``,
reset through ``/proc/PID/clear_refs`` before each transfer).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from cgpu_kernel.core.files import PROGRESS_INTERVAL, Progress, parse_cell, remote_path
from cgpu_kernel.exceptions import FileMagicError, RemotePathError

from .conftest import (
    RemoteServer,
    install_remote_spec,
    run_cell,
    start_jupyter_server,
    start_kernel,
    stdout_of,
)
from .test_colab import colab, colab_server, colab_spec, needs_wiring  # noqa: F401 - fixtures

MB = 1_000_000
TIMEOUT = 110


# --- core.files --------------------------------------------------------------------------------


def test_parse_cell_keeps_the_rest_for_the_remote() -> None:
    command = parse_cell("%cgpu upload 'my data.csv' data/\nimport pandas\nprint(1)")
    assert (command.verb, command.args) == ("upload", ("my data.csv", "data/"))
    assert command.rest == "import pandas\nprint(1)"
    assert parse_cell("%cgpu").verb == "help"


@pytest.mark.parametrize(
    "line", ["%cgpu copy a", "%cgpu upload", "%cgpu download a b c", "%cgpu upload 'open"]
)
def test_bad_lines_say_the_usage(line: str) -> None:
    with pytest.raises(FileMagicError, match="%cgpu"):
        parse_cell(line)


def test_remote_paths_join_the_kernels_folder_and_refuse_escapes() -> None:
    assert remote_path("", "data.csv") == "data.csv"
    assert remote_path("work/nb", "../x/./y.csv") == "work/x/y.csv"
    assert remote_path("work", "/abs/z") == "abs/z"
    assert remote_path("work", ".") == "work"
    assert remote_path("", "a/../b") == "b"
    for escape in ("../x", "a/../../x", "/../etc/passwd"):
        with pytest.raises(RemotePathError, match=r"\.\."):
            remote_path("", escape)
    with pytest.raises(RemotePathError):
        remote_path("nb", "../../x")


def test_progress_lines_are_bounded_by_time_not_by_chunks() -> None:
    progress = Progress(1000 * MB, start=0.0)
    lines = [progress.advance(MB, now=i * 0.01) for i in range(1, 1001)]  # 1000 chunks, 10 s
    shown = [line for line in lines if line is not None]
    assert len(shown) <= 10 / PROGRESS_INTERVAL + 1
    assert all(line.startswith("\r") for line in shown)
    assert "/s" not in shown[0]  # no rate from 10 ms
    assert "100.0 MB/s" in shown[-2] and "ETA" in shown[-2]
    assert "verified" in progress.summary("Uploaded", 3, now=10.0)


# --- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RemoteServer]:
    """A jupyter-server of this module's own: its root is the remote kernel's folder."""
    server = start_jupyter_server(tmp_path_factory.mktemp("files") / "remote")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def remote_root(remote: RemoteServer) -> Path:
    return remote.log_path.parent


@pytest.fixture(scope="module")
def files_spec(kernel_dir: Path, remote: RemoteServer) -> str:
    return install_remote_spec(kernel_dir, "cgpu-test-files", remote)


@pytest.fixture(scope="module")
def here(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The notebook's folder: the proxy kernel's working directory."""
    return tmp_path_factory.mktemp("notebook")


@pytest.fixture(scope="module")
def kernel(files_spec: str, here: Path) -> Iterator[tuple[KernelManager, BlockingKernelClient]]:
    km, kc = start_kernel(files_spec, cwd=str(here))
    yield km, kc
    kc.stop_channels()
    km.shutdown_kernel()


def cell(kernel: tuple[KernelManager, BlockingKernelClient], code: str) -> tuple[Any, list[Any]]:
    reply, outputs = run_cell(kernel[1], code, timeout=TIMEOUT)
    return reply["content"], outputs


def remote_sha(kernel: tuple[KernelManager, BlockingKernelClient], path: str) -> str:
    content, outputs = cell(
        kernel, f"import hashlib; print(hashlib.sha256(open({path!r}, 'rb').read()).hexdigest())"
    )
    assert content["status"] == "ok", content
    return stdout_of(outputs).strip()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def proxy_pid(kernel: tuple[KernelManager, BlockingKernelClient]) -> int:
    provisioner = kernel[0].provisioner
    assert provisioner is not None
    return int(provisioner.process.pid)  # type: ignore[attr-defined]


def memory(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (the peak) of ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field}")


def reset_peak(pid: int) -> int:
    """Start measuring the peak anew; returns the RSS now."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return memory(pid, "VmRSS")


def streams(outputs: list[Any]) -> list[str]:
    return [m["content"]["text"] for m in outputs if m["msg_type"] == "stream"]


def errors(outputs: list[Any]) -> list[Any]:
    return [m["content"] for m in outputs if m["msg_type"] == "error"]


def no_partials(*folders: Path) -> None:
    for folder in folders:
        left = [p for p in folder.rglob("*") if ".cgpu-partial-" in p.name]
        assert left == [], left


def big_round_trip(
    kernel: tuple[KernelManager, BlockingKernelClient],
    here: Path,
    remote_root: Path,
    size: int,
    name: str,
) -> None:
    data = os.urandom(size)
    (here / name).write_bytes(data)
    pid = proxy_pid(kernel)

    before = reset_peak(pid)
    content, _ = cell(kernel, f"%cgpu upload {name}")
    assert content["status"] == "ok", content
    upload_growth = memory(pid, "VmHWM") - before
    assert (remote_root / name).read_bytes() == data
    assert remote_sha(kernel, name) == sha(data)

    before = reset_peak(pid)
    content, _ = cell(kernel, f"%cgpu download {name} back-{name}")
    assert content["status"] == "ok", content
    download_growth = memory(pid, "VmHWM") - before
    assert (here / f"back-{name}").read_bytes() == data
    no_partials(here, remote_root)
    print(
        f"{size / MB:.0f} MB: proxy peak RSS grew {upload_growth / MB:.1f} MB (upload),"
        f" {download_growth / MB:.1f} MB (download), from {before / MB:.0f} MB"
    )
    # bounded by a piece (768 KiB read and its base64), not by the chunk or the file
    assert upload_growth < 10 * MB and download_growth < 10 * MB
    (here / name).unlink()
    (here / f"back-{name}").unlink()


def test_a_file_goes_up_and_comes_back_byte_identical_in_bounded_memory(
    kernel: tuple[KernelManager, BlockingKernelClient], here: Path, remote_root: Path
) -> None:
    big_round_trip(kernel, here, remote_root, 30 * MB, "thirty.bin")


@pytest.mark.slow
def test_200_mb_up_and_down_with_rss_well_under_its_size(
    kernel: tuple[KernelManager, BlockingKernelClient], here: Path, remote_root: Path
) -> None:
    big_round_trip(kernel, here, remote_root, 200 * MB, "twohundred.bin")


def test_after_an_upload_the_next_cell_opens_the_file_and_the_rest_runs_remotely(
    kernel: tuple[KernelManager, BlockingKernelClient], here: Path
) -> None:
    (here / "data.csv").write_text("a,b\n1,2\n")
    content, outputs = cell(
        kernel, "%cgpu upload data.csv\nprint('rest:', open('data.csv').read())"
    )
    assert content["status"] == "ok", content
    text = "".join(streams(outputs))
    assert "Uploaded 1 file" in text and "rest: a,b\n1,2" in text
    # the progress line is one line redrawn with \r, then the summary
    progress = [t for t in streams(outputs) if t.startswith("\r")]
    assert progress and progress[-1].endswith("\n") and "verified" in progress[-1]
    content, outputs = cell(kernel, "print(open('data.csv').read().split()[1])")
    assert stdout_of(outputs).strip() == "1,2"


def test_progress_is_bounded_in_messages(
    kernel: tuple[KernelManager, BlockingKernelClient], here: Path
) -> None:
    (here / "many.bin").write_bytes(os.urandom(12 * MB))
    content, outputs = cell(kernel, "%cgpu upload many.bin")
    assert content["status"] == "ok", content
    lines = [t for t in streams(outputs) if t.startswith("\r")]
    # at most one per PROGRESS_INTERVAL plus the first and the summary; never one per chunk
    assert 1 <= len(lines) <= 4
    assert "/s" in lines[-1] and "verified" in lines[-1]


def test_folders_go_recursively_and_globs_match(
    kernel: tuple[KernelManager, BlockingKernelClient], here: Path, remote_root: Path
) -> None:
    tree = here / "inputs"
    (tree / "nested" / "deeper").mkdir(parents=True)
    (tree / "top.txt").write_text("top")
    (tree / "nested" / "mid.txt").write_text("mid")
    (tree / "nested" / "deeper" / "low.txt").write_text("low")
    content, outputs = cell(kernel, "%cgpu upload inputs")
    assert content["status"] == "ok", content
    assert "Uploaded 3 files" in "".join(streams(outputs))
    content, outputs = cell(kernel, "print(open('inputs/nested/deeper/low.txt').read())")
    assert stdout_of(outputs).strip() == "low"

    for i in range(3):
        (here / f"part-{i}.csv").write_text(str(i))
    (here / "other.txt").write_text("not me")
    content, outputs = cell(kernel, "%cgpu upload 'part-*.csv' parts/")
    assert content["status"] == "ok", content
    # (the server's rename leaves an empty .ipynb_checkpoints folder, as JupyterLab's does)
    assert sorted(p.name for p in (remote_root / "parts").glob("[!.]*")) == [
        "part-0.csv",
        "part-1.csv",
        "part-2.csv",
    ]

    content, outputs = cell(kernel, "%cgpu ls inputs/nested")
    assert "deeper/" in stdout_of(outputs) and "mid.txt" in stdout_of(outputs)

    # and back: a folder, recursively, and a glob on the remote
    content, outputs = cell(kernel, "%cgpu download inputs copied")
    assert content["status"] == "ok", content
    assert (here / "copied" / "nested" / "deeper" / "low.txt").read_text() == "low"
    content, outputs = cell(kernel, "%cgpu download 'parts/*-1.csv' got/")
    assert content["status"] == "ok", content
    assert [p.name for p in (here / "got").iterdir()] == ["part-1.csv"]


def test_a_missing_local_file_fails_the_cell_and_runs_nothing_of_it(
    kernel: tuple[KernelManager, BlockingKernelClient], remote_root: Path
) -> None:
    content, outputs = cell(kernel, "%cgpu upload nowhere.csv\nprint('ran')")
    assert content["status"] == "error" and content["ename"] == "CgpuLocalPathError"
    assert "nowhere.csv does not exist" in content["evalue"]
    assert errors(outputs) and "ran" not in stdout_of(outputs)
    assert not (remote_root / "nowhere.csv").exists()


def test_dotdot_escapes_are_refused_both_ways(
    kernel: tuple[KernelManager, BlockingKernelClient], here: Path, remote_root: Path
) -> None:
    (here / "secret.txt").write_text("x")
    content, _ = cell(kernel, "%cgpu upload secret.txt ../escaped.txt")
    assert content["ename"] == "CgpuRemotePathError" and ".." in content["evalue"]
    assert not (remote_root.parent / "escaped.txt").exists()
    content, _ = cell(kernel, "%cgpu download ../remote/token")
    assert content["ename"] == "CgpuRemotePathError"
    # a download never writes outside the notebook's folder unless given an absolute path
    (remote_root / "plain.txt").write_text("plain")
    content, _ = cell(kernel, "%cgpu download plain.txt ../outside.txt")
    assert content["ename"] == "CgpuLocalPathError"
    assert not (here.parent / "outside.txt").exists()


def test_a_path_the_server_refuses_leaves_nothing_under_the_final_name(
    kernel: tuple[KernelManager, BlockingKernelClient], here: Path, remote_root: Path
) -> None:
    (remote_root / "afile").write_text("I am a file")
    (here / "payload.bin").write_bytes(b"p" * 1000)
    content, _ = cell(kernel, "%cgpu upload payload.bin afile/payload.bin")
    assert content["status"] == "error" and content["ename"] == "CgpuRemotePathError"
    assert (remote_root / "afile").read_text() == "I am a file"
    content, _ = cell(kernel, "%cgpu download missing.bin")
    assert content["ename"] == "CgpuRemotePathError" and "does not exist" in content["evalue"]
    assert not (here / "missing.bin").exists()
    no_partials(here, remote_root)


def test_an_existing_remote_file_is_replaced_only_once_the_new_one_is_complete(
    kernel: tuple[KernelManager, BlockingKernelClient], here: Path, remote_root: Path
) -> None:
    (remote_root / "model.pt").write_bytes(b"old")
    (here / "model.pt").write_bytes(b"new" * 1000)
    content, _ = cell(kernel, "%cgpu upload model.pt")
    assert content["status"] == "ok", content
    assert (remote_root / "model.pt").read_bytes() == b"new" * 1000


def test_help_is_answered_locally(kernel: tuple[KernelManager, BlockingKernelClient]) -> None:
    content, outputs = cell(kernel, "%cgpu help")
    assert content["status"] == "ok"
    assert "%cgpu upload LOCAL [REMOTE]" in stdout_of(outputs)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs (root only): a disk that fills up."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_local_disk_fails_the_download_and_leaves_nothing(
    kernel: tuple[KernelManager, BlockingKernelClient], remote_root: Path, small_disk: Path
) -> None:
    (remote_root / "three.bin").write_bytes(os.urandom(3 * MB))
    content, _ = cell(kernel, f"%cgpu download three.bin {small_disk}/three.bin")
    assert content["status"] == "error" and content["ename"] == "CgpuDiskFullError"
    assert "disk is full" in content["evalue"]
    assert list(small_disk.iterdir()) == []


def test_a_full_remote_disk_fails_the_upload_and_leaves_nothing(
    kernel_dir: Path, tmp_path: Path, small_disk: Path
) -> None:
    server = start_jupyter_server(small_disk / "root")
    try:
        spec = install_remote_spec(kernel_dir, "cgpu-test-files-full", server)
        (tmp_path / "big.bin").write_bytes(os.urandom(3 * MB))
        km, kc = start_kernel(spec, cwd=str(tmp_path))
        try:
            content, _ = cell((km, kc), "%cgpu upload big.bin")
        finally:
            kc.stop_channels()
            km.shutdown_kernel()
        assert content["status"] == "error" and content["ename"] == "CgpuDiskFullError"
        assert "remote disk is full" in content["evalue"]
        assert not (small_disk / "root" / "big.bin").exists()
        # the server's delete-to-trash cannot remove the partial copy on a full disk: it is
        # left under its temporary name only, and the error says how to remove it
        left = [p.name for p in (small_disk / "root").glob("big.bin*")]
        assert all(".cgpu-partial-" in name for name in left)
        if left:
            assert f"os.remove('{left[0]}')" in content["evalue"]
    finally:
        server.stop()


def test_nbclient_and_papermill_treat_a_magic_cell_like_any_cell(
    files_spec: str, kernel_dir: Path, remote: RemoteServer, tmp_path: Path
) -> None:
    import papermill
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    (tmp_path / "table.csv").write_text("x\n42\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%cgpu upload table.csv"),
        nbformat.v4.new_code_cell("print(open('table.csv').read().split()[1])"),
        nbformat.v4.new_code_cell("with open('result.txt', 'w') as f: f.write('done')"),
        nbformat.v4.new_code_cell("%cgpu download result.txt"),
    ]
    NotebookClient(
        nb, kernel_name=files_spec, timeout=60, resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    assert nb.cells[1].outputs[0]["text"].strip() == "42"
    assert "Uploaded 1 file" in "".join(o.get("text", "") for o in nb.cells[0].outputs)
    assert (tmp_path / "result.txt").read_text() == "done"

    # a failing %cgpu cell stops nbclient like any failing cell
    nb.cells = [nbformat.v4.new_code_cell("%cgpu upload absent.csv")]
    with pytest.raises(CellExecutionError, match="CgpuLocalPathError"):
        NotebookClient(
            nb, kernel_name=files_spec, timeout=60, resources={"metadata": {"path": str(tmp_path)}}
        ).execute()

    # papermill with the inputs uploaded when the kernel starts (the upload_on_start option)
    spec = install_remote_spec(
        kernel_dir, "cgpu-test-files-onstart", remote, extra=["--upload-on-start=table.csv"]
    )
    (tmp_path / "table.csv").write_text("x\n43\n")
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("print(open('table.csv').read().split()[1])")]
    source, output = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, source)
    papermill.execute_notebook(
        str(source), str(output), kernel_name=spec, cwd=str(tmp_path), progress_bar=False
    )
    executed = nbformat.read(output, as_version=4)
    assert executed.cells[0].outputs[0]["text"].strip() == "43"


def test_gateway_without_contents_api_says_so(gateway_spec: str, tmp_path: Path) -> None:
    km, kc = start_kernel(gateway_spec, cwd=str(tmp_path))
    try:
        content, _ = cell((km, kc), "%cgpu ls")
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert content["status"] == "error"
    assert content["ename"] in ("CgpuFilesUnsupported", "CgpuRemotePathError"), content
    assert "Contents API" in content["evalue"] or "Not found" in content["evalue"]


def test_the_shell_command_uploads_lists_and_downloads(
    files_spec: str, remote_root: Path, tmp_path: Path
) -> None:
    def files(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cgpu_kernel", "files", *args, "--kernel", files_spec],
            capture_output=True,
            text=True,
            timeout=100,
            check=False,
            cwd=tmp_path,
        )

    (tmp_path / "ci").mkdir()
    (tmp_path / "ci" / "input.txt").write_text("from the shell")
    done = files("upload", "ci/input.txt")
    assert done.returncode == 0, done.stderr
    assert "Uploaded 1 file" in done.stdout
    assert (remote_root / "ci" / "input.txt").read_text() == "from the shell"
    done = files("ls", "ci")
    assert done.returncode == 0 and "input.txt" in done.stdout, done.stderr
    (tmp_path / "ci" / "input.txt").unlink()
    done = files("download", "ci/input.txt")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ci" / "input.txt").read_text() == "from the shell"
    done = files("download", "absent.txt")
    assert done.returncode == 16, (done.returncode, done.stderr)  # the io outcome
    assert "does not exist" in done.stdout + done.stderr


def test_an_interrupt_stops_a_transfer_and_keeps_nothing(
    kernel: tuple[KernelManager, BlockingKernelClient], here: Path, remote_root: Path
) -> None:
    km, kc = kernel
    (here / "slow.bin").write_bytes(os.urandom(150 * MB))
    msg_id = kc.execute("%cgpu upload slow.bin")
    # "Run All": a cell that needs the file waits behind the transfer; interrupted, the
    # transfer aborts it (as ipykernel aborts its queue), so it never runs without the file
    behind = kc.execute("print('behind', len(open('slow.bin', 'rb').read()))")
    while True:  # the transfer is under way once its first progress line is out
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
    km.interrupt_kernel()
    replies: dict[str, dict[str, Any]] = {}
    while msg_id not in replies or behind not in replies:
        reply = kc.get_shell_msg(timeout=TIMEOUT)
        replies[reply["parent_header"].get("msg_id")] = reply["content"]
    assert replies[msg_id]["status"] == "error"
    assert replies[msg_id]["ename"] == "KeyboardInterrupt", replies[msg_id]
    assert replies[behind] == {"status": "aborted"}, replies[behind]
    assert not (remote_root / "slow.bin").exists()
    no_partials(remote_root)
    # and the kernel goes on: the next cell runs
    _, outputs = cell(kernel, "print('after')")
    assert stdout_of(outputs).strip() == "after"
    (here / "slow.bin").unlink()


def test_an_interrupt_stops_a_download_and_keeps_nothing(
    kernel: tuple[KernelManager, BlockingKernelClient], here: Path, remote_root: Path
) -> None:
    km, kc = kernel
    with (remote_root / "big.bin").open("wb") as remote_file:
        remote_file.truncate(500 * MB)  # sparse: the server sends it fast, the proxy writes it
    msg_id = kc.execute("%cgpu download big.bin")
    while True:  # the transfer is under way once its first progress line is out
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            break
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=TIMEOUT)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=TIMEOUT)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
    assert not (here / "big.bin").exists()
    no_partials(here)
    # the remote kernel was idle, so it is not interrupted: a late interrupt would stop this
    _, outputs = cell(kernel, "import time; time.sleep(1); print('after')")
    assert stdout_of(outputs).strip() == "after"
    (remote_root / "big.bin").unlink()


def test_a_session_gets_its_inputs_from_the_shell_and_its_cells_read_them(
    files_spec: str, tmp_path: Path
) -> None:
    name = f"files-{os.getpid()}"

    def cgpu(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "cgpu_kernel", *args],
            capture_output=True,
            text=True,
            timeout=100,
            check=False,
            cwd=tmp_path,
        )

    (tmp_path / "params.json").write_text('{"lr": 0.1}')
    try:
        done = cgpu("files", "upload", "params.json", "--session", name, "--kernel", files_spec)
        assert done.returncode == 0, done.stdout + done.stderr
        done = cgpu("run", "--session", name, "import json; print(json.load(open('params.json')))")
        assert done.returncode == 0 and "{'lr': 0.1}" in done.stdout, done.stdout + done.stderr
    finally:
        cgpu("sessions", "stop", name)


def test_the_local_backend_says_its_files_are_already_here(local_spec: str, tmp_path: Path) -> None:
    km, kc = start_kernel(local_spec, cwd=str(tmp_path))
    try:
        content, _ = cell((km, kc), "%cgpu upload anything.csv")
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
    assert content["ename"] == "CgpuFilesUnsupported"
    assert "already here" in content["evalue"]


# --- through the colab backend and its double (tests/colab_double.py) --------------------------


@needs_wiring
def test_colab_files_go_through_the_runtime_proxy_into_content(
    colab_spec: str,  # noqa: F811 - the fixture imported above
    jupyter_server: RemoteServer,
    tmp_path: Path,
) -> None:
    """The runtime's Contents API behind the double's runtime proxy (its token on every call);
    the kernel's folder is /content, the Contents path ``content`` (see ColabBackend)."""
    data = os.urandom(3 * MB)
    (tmp_path / "weights.bin").write_bytes(data)
    km, kc = start_kernel(colab_spec, cwd=str(tmp_path))
    try:
        first, _ = cell((km, kc), "1")  # the runtime is assigned with the first cell
        assert first["status"] == "ok", first
        content, outputs = cell((km, kc), "%cgpu upload weights.bin")
        assert content["status"] == "ok", content
        remote_copy = jupyter_server.log_path.parent / "content" / "weights.bin"
        assert remote_copy.read_bytes() == data
        content, outputs = cell((km, kc), "%cgpu download weights.bin back.bin")
        assert content["status"] == "ok", content
        assert (tmp_path / "back.bin").read_bytes() == data
        content, outputs = cell((km, kc), "%cgpu ls")
        assert "weights.bin" in stdout_of(outputs)
    finally:
        kc.stop_channels()
        km.shutdown_kernel()
