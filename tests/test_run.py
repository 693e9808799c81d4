"""``cgpu-kernel run`` and ``sessions``, driven as a subprocess against a real jupyter-server.

Fresh-kernel runs cost a proxy and a remote kernel each, so the error categories share one named
session (which is itself under test): each of those runs only attaches to a running kernel.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from cgpu_kernel import kernelspec
from cgpu_kernel.run import outcomes, runner, syntax
from tests.conftest import RemoteServer, free_port, install_spec

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _remove_test_kernelspecs(kernel_dir: Path) -> Iterator[None]:
    """Kernelspecs a test installs go when it ends: other tests run "the first" cgpu spec."""
    folder = kernel_dir / "kernels"
    before = set(folder.iterdir()) if folder.is_dir() else set()
    yield
    for path in (set(folder.iterdir()) if folder.is_dir() else set()) - before:
        shutil.rmtree(path, ignore_errors=True)


def cgpu(
    *args: str, stdin: bytes | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "cgpu_kernel", *args],
        capture_output=True,
        input=stdin,
        timeout=timeout,
        check=False,
        cwd=ROOT,
    )


def run_json(*args: str, stdin: bytes | None = None) -> tuple[dict[str, Any], int]:
    done = cgpu("run", "--json", *args, stdin=stdin)
    try:
        document = json.loads(done.stdout.decode("utf-8"))
    except ValueError:
        raise AssertionError(done.stdout + done.stderr) from None
    return document, done.returncode


def exit_status(code: int) -> int:
    return next(e.exit_status for e in outcomes.ERROR_CODES if e.code == code)


# --- what round-trips exactly: the edge cases of kernel-mode-edge-cases.md -----------------------

EDGE_CASES = '''\
import sys
print("unicode: héllo wörld ñ 中文 日本語 العربية ελληνικά")
print("emoji: 🚀🔥💻 👩‍💻 🇯🇵 ✅")
print("special: !@#$%^&*()_+-=[]{}|;':\\",./<>?`~")
print("escapes: tab\\there|cr\\rend|backslash\\\\|quote\\"|bell\\a|nul\\x00")
print("ansi: \\x1b[1mbold\\x1b[0m \\u00e9 \\N{SNOWMAN}")
print("")
print(repr(""), repr("\\n"))
long = "x" * 5000 + "é" * 1000 + "END"
print(long)
print(len(long))

def greet(name, *, punctuation="!"):
    """A multi-line definition."""
    if not name:
        return "nobody" + punctuation
    return f"hello {name}{punctuation}"

class Counter:
    def __init__(self):
        self.n = 0

    def bump(self, k=1):
        for _ in range(k):
            self.n += 1
        return self.n

print(greet("wörld"), greet(""))
counter = Counter()
print(counter.bump(3), counter.bump())
nested = {"a": [1, {"b": (2, 3)}], "ü": None, "squares": [i * i for i in range(10000)][-3:]}
print(nested)
i = 0
while i < 3:
    i += 1
    print(i, end=" ")
print()
sys.stderr.write("stderr: ünïcödé 🐍\\n")
sys.stdout.write("no newline at the end")
'''


def expected_streams(code: str) -> tuple[str, str]:
    """What ``code`` prints when run right here: the remote must give exactly the same."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        exec(compile(code, "<edge>", "exec"), {"__name__": "__main__"})
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def session(jupyter_spec: str) -> Iterator[list[str]]:
    """Options for runs in a named session on the jupyter-server remote, stopped at the end."""
    name = f"tests-{os.getpid()}"
    yield ["--session", name, "--kernel", jupyter_spec]
    cgpu("sessions", "stop", name)


# --- fresh kernels -----------------------------------------------------------------------------


def test_json_success_has_every_field(jupyter_spec: str) -> None:
    marker = "secret-code-marker-7731"
    code = (
        "import sys\n"
        f"print('out', '{marker}')\n"
        "sys.stderr.write('err\\n')\n"
        "from IPython.display import HTML, display\n"
        "display(HTML('<b>rich</b>'))\n"
        "leak = 'set by an earlier run'\n"
        "40 + 2\n"
    )
    result, status = run_json("--kernel", jupyter_spec, code)
    assert status == 0, result
    assert result["status"] == "ok"
    assert result["errorCode"] == 0
    assert result["stdout"] == f"out {marker}\n"
    assert result["stderr"] == "err\n"
    assert result["error"] is None
    assert result["executionCount"] == 1
    assert result["kernel"] == jupyter_spec
    assert result["session"] is None
    display, value = result["outputs"]
    assert display["output_type"] == "display_data"
    assert display["data"]["text/html"] == "<b>rich</b>"
    assert value == {
        "output_type": "execute_result",
        "data": {"text/plain": "42"},
        "metadata": {},
        "execution_count": 1,
    }
    timing = result["timing"]
    assert set(timing) == {"duration_ms", "startup_ms", "queue_ms", "total_ms"}
    assert all(isinstance(value, float) and value >= 0 for value in timing.values())
    assert timing["total_ms"] >= timing["startup_ms"]

    # the run is in the history, without its code or output
    logs = cgpu("logs", "-n", "1", "--json")
    (record,) = json.loads(logs.stdout)
    assert record["kernel"] == jupyter_spec
    assert record["source"] == "run"
    assert record["status"] == "ok"
    assert record["startup_ms"] > 0
    history_text = (
        Path(os.environ["CGPU_STATE_DIR"]) / "cgpu-kernel" / "history.jsonl"
    ).read_text()
    assert marker not in history_text


def test_streaming_by_default_and_error_summary(jupyter_spec: str) -> None:
    # (`leak` was set by the previous test's run: each run has a fresh kernel)
    done = cgpu("run", "--kernel", jupyter_spec, "print('before')\nleak")
    assert done.returncode == exit_status(1002)
    assert done.stdout.decode() == "before\n"
    stderr = done.stderr.decode()
    assert "NameError" in stderr
    assert "runtime error (code 1002)" in stderr
    assert "--session NAME" in stderr  # the hint: each run starts a fresh kernel


def test_unreachable_remote_is_a_connection_error(
    kernel_dir: Path, jupyter_server: RemoteServer
) -> None:
    name = install_spec(
        kernel_dir,
        "cgpu-test-unreachable",
        "jupyter",
        url=f"http://127.0.0.1:{free_port()}/",
        token_file=jupyter_server.token_file,
    )
    result, status = run_json("--kernel", name, "print(1)")
    assert result["errorCode"] == 2001
    assert status == exit_status(2001) == 21
    assert result["error"]["category"] == "connection"
    assert result["error"]["name"] == "RemoteUnreachable"
    assert "running" in result["error"]["suggestion"]


def test_remote_that_never_answers_hits_the_kernel_timeout(
    kernel_dir: Path, jupyter_server: RemoteServer
) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        name = install_spec(
            kernel_dir,
            "cgpu-test-silent",
            "jupyter",
            url=f"http://127.0.0.1:{port}/",
            token_file=jupyter_server.token_file,
        )
        result, status = run_json("--kernel", name, "--kernel-timeout", "1", "print(1)")
    assert result["errorCode"] == 2004
    assert status == 24
    assert "--kernel-timeout" in result["error"]["suggestion"]


@pytest.mark.parametrize(
    ("case", "error_code", "ename"),
    [
        ("bad-token", 2002, "RemoteAuthenticationFailed"),
        ("no-remote-kernelspec", 2003, "RemoteKernelSpecNotFound"),
    ],
)
def test_remote_refusals(
    kernel_dir: Path,
    jupyter_server: RemoteServer,
    tmp_path: Path,
    case: str,
    error_code: int,
    ename: str,
) -> None:
    token_file = jupyter_server.token_file
    if case == "bad-token":
        token_file = tmp_path / "wrong-token"
        token_file.write_text("not-the-token")
    name = install_spec(
        kernel_dir,
        f"cgpu-test-{case}",
        "jupyter",
        url=jupyter_server.url,
        token_file=token_file,
        remote_kernel="no-such-remote-kernel" if case == "no-remote-kernelspec" else None,
    )
    result, status = run_json("--kernel", name, "print(1)")
    assert (result["errorCode"], status) == (error_code, exit_status(error_code))
    assert result["error"]["name"] == ename
    assert "not-the-token" not in json.dumps(result)


def test_kernel_that_dies_mid_run_is_lost(jupyter_spec: str) -> None:
    result, status = run_json("--kernel", jupyter_spec, "import os\nos._exit(1)")
    assert (result["errorCode"], status) == (2005, 25)
    assert result["error"]["category"] == "kernel_lost"


def test_local_errors_fail_fast_without_a_kernel(jupyter_spec: str) -> None:
    result, status = run_json("--kernel", "no-such-kernel", "print(1)")
    assert (result["errorCode"], status) == (2006, 26)
    assert "cgpu-kernel list" in result["error"]["message"]
    result, status = run_json("--kernel", jupyter_spec)
    assert (result["errorCode"], status) == (2006, 26)
    assert "-f FILE" in result["error"]["message"]


# --- syntax pre-check ----------------------------------------------------------------------------


def test_syntax_error_is_caught_locally_with_line_and_column(jupyter_spec: str) -> None:
    code = "x = 1\ny = 2\nif x print(y)\n"
    with pytest.raises(SyntaxError) as python:
        compile(code, "<cell>", "exec")
    started = time.monotonic()
    result, status = run_json("--kernel", jupyter_spec, code)
    assert (result["errorCode"], status) == (1001, 11)
    error = result["error"]
    assert error["name"] == "SyntaxError"
    assert (error["line"], error["column"]) == (3, python.value.offset) == (3, python.value.offset)
    assert "line 3" in error["message"]
    assert "nothing was sent" in error["suggestion"]
    assert result["timing"]["startup_ms"] is None  # no kernel was started
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    "code",
    [
        "%time x = 1\nprint(x)",
        "!echo hi\nfiles = !ls\nprint(files)",
        "%%bash\necho $((1 + \n",  # a cell magic's body is not Python
        "%pip install nothing-at-all\n",
        "x = 1\nx?\n",
        "await __import__('asyncio').sleep(0)",
        "",
    ],
)
def test_syntax_check_understands_ipython(code: str) -> None:
    assert syntax.check_syntax(code) is None


def test_syntax_check_reports_where() -> None:
    problem = syntax.check_syntax("%time x = 1\ndef f(:\n    pass\n")
    assert problem is not None
    assert (problem["name"], problem["line"], problem["column"]) == ("SyntaxError", 2, 7)
    problem = syntax.check_syntax("if True:\nprint(1)\n")
    assert problem is not None
    assert (problem["name"], problem["line"]) == ("IndentationError", 2)


# --- one named session: errors by category, magics, timeouts, inputs -----------------------------

CATEGORY_CASES = [
    ("undefined_name + 1", 1002, "NameError", None),
    ("[][1]", 1002, "IndexError", None),
    ("raise MemoryError('too big')", 1004, "MemoryError", "smaller chunks"),
    (
        "raise RuntimeError('CUDA out of memory. Tried to allocate 2.00 GiB')",
        1004,
        "RuntimeError",
        "smaller batch size",
    ),
    ("import cv2", 1005, "ModuleNotFoundError", "%pip install opencv-python"),
    ("open('/nonexistent/data.csv')", 1006, "FileNotFoundError", "remote machine"),
]


@pytest.mark.parametrize(("code", "error_code", "ename", "hint"), CATEGORY_CASES)
def test_error_categories(
    session: list[str], code: str, error_code: int, ename: str, hint: str | None
) -> None:
    result, status = run_json(*session, code)
    assert result["status"] == "error"
    assert result["errorCode"] == error_code
    assert status == exit_status(error_code)
    error = result["error"]
    assert error["name"] == ename
    assert error["category"] == outcomes.categorize(ename, error["message"])
    assert any(ename in line for line in error["traceback"])
    assert not any("\x1b[" in line for line in error["traceback"])  # no colour codes in JSON
    if hint:
        assert hint in error["suggestion"]


def test_magics_and_shell_lines_run(session: list[str]) -> None:
    result, status = run_json(
        *session, "%time y = 2\n!echo shell-ok\nfiles = !echo captured\nprint(y, files)"
    )
    assert status == 0, result["error"]
    assert "shell-ok" in result["stdout"]  # (through a pty: "\r\n")
    assert result["stdout"].endswith("2 ['captured']\n")
    result, status = run_json(*session, "%%bash\necho from-bash")
    assert (status, result["stdout"]) == (0, "from-bash\n")


def test_output_streams_while_the_code_runs(session: list[str], tmp_path: Path) -> None:
    """The first line arrives while the code is still running: it waits for us to see it."""
    seen = tmp_path / "seen"
    code = (
        "import os, time\n"
        "print('first', flush=True)\n"
        f"while not os.path.exists({str(seen)!r}):\n"
        "    time.sleep(0.05)\n"
        "print('second')\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "cgpu_kernel", "run", *session, "--timeout", "60", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline() == b"first\n"
        assert process.poll() is None  # still running: the line was streamed, not buffered
        seen.touch()
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert (process.returncode, rest) == (0, b"second\n")


def test_empty_code(session: list[str]) -> None:
    result, status = run_json(*session, "")
    assert (status, result["status"], result["stdout"], result["outputs"]) == (0, "ok", "", [])


def test_edge_cases_round_trip_exactly_from_argv_file_and_stdin(
    session: list[str], tmp_path: Path
) -> None:
    stdout, stderr = expected_streams(EDGE_CASES)
    source = tmp_path / "cell.py"
    source.write_text(EDGE_CASES, encoding="utf-8")
    inputs: list[tuple[list[str], bytes | None]] = [
        ([EDGE_CASES], None),
        (["-f", str(source)], None),
        (["-"], EDGE_CASES.encode("utf-8")),
    ]
    for args, stdin in inputs:
        result, status = run_json(*session, *args, stdin=stdin)
        assert (status, result["status"]) == (0, "ok"), result["error"]
        assert result["stdout"] == stdout
        assert result["stderr"] == stderr


def test_timeout_interrupts_the_remote_cell(session: list[str]) -> None:
    code = "import time\nprint('started', flush=True)\nwhile True:\n    time.sleep(0.05)\n"
    result, status = run_json(*session, "--timeout", "2", code)
    assert (result["errorCode"], status) == (1003, 13)
    assert result["stdout"] == "started\n"
    assert result["error"]["category"] == "timeout"
    assert any("KeyboardInterrupt" in line for line in result["error"]["traceback"])
    assert "--timeout" in result["error"]["suggestion"]
    # the interrupt reached the remote: the same kernel is free for the next run at once
    result, status = run_json(*session, "print('after')")
    assert (status, result["stdout"]) == (0, "after\n")


# --- sessions ------------------------------------------------------------------------------------


def test_session_keeps_variables_until_stopped(
    jupyter_spec: str, jupyter_server: RemoteServer
) -> None:
    name = f"persist-{os.getpid()}"
    before = jupyter_server.kernel_ids()
    first, status = run_json("--session", name, "--kernel", jupyter_spec, "x = 41")
    assert status == 0, first["error"]
    second, status = run_json("--session", name, "print(x + 1)")
    assert (status, second["stdout"], second["session"]) == (0, "42\n", name)
    assert second["kernel"] == jupyter_spec
    assert second["executionCount"] == first["executionCount"] + 1
    remote = jupyter_server.kernel_ids() - before
    assert len(remote) == 1

    (listed,) = [
        s for s in json.loads(cgpu("sessions", "list", "--json").stdout) if s["name"] == name
    ]
    assert listed["alive"] is True
    assert listed["kernel"] == jupyter_spec
    host = psutil.Process(listed["pid"])

    done = cgpu("sessions", "stop", name)
    assert done.returncode == 0
    assert f"Stopped session {name}" in done.stdout.decode()
    assert not host.is_running() or host.status() == psutil.STATUS_ZOMBIE
    deadline = time.monotonic() + 15
    while jupyter_server.kernel_ids() & remote and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not jupyter_server.kernel_ids() & remote, "the session's remote kernel was not deleted"
    assert name not in cgpu("sessions", "list").stdout.decode()
    done = cgpu("sessions", "stop", name)
    assert done.returncode == 2
    assert "sessions list" in done.stderr.decode()


# --- the one table -------------------------------------------------------------------------------


def test_docs_table_matches_the_codes() -> None:
    rows = re.findall(
        r"^\| (\d+) \| `(\w+)` \| (\d+) \|", (ROOT / "docs" / "run.md").read_text(), re.M
    )
    documented = {(int(code), category, int(status)) for code, category, status in rows}
    assert documented == {(e.code, e.category, e.exit_status) for e in outcomes.ERROR_CODES}


def test_categories_and_suggestions(jupyter_spec: str) -> None:
    assert outcomes.categorize("OutOfMemoryError", "CUDA out of memory") == "memory"
    assert outcomes.categorize("RuntimeError", "CUDA error: out of memory") == "memory"
    assert outcomes.categorize("RuntimeError", "something else") == "runtime"
    assert outcomes.categorize("PermissionError") == "io"
    assert outcomes.categorize("RemoteAuthenticationFailed") == "auth"
    assert outcomes.categorize("RemoteStartupTimeout") == "kernel_timeout"
    assert outcomes.categorize("") == "unknown"
    assert outcomes.categorize("ColabQuotaExceeded") == "remote_start"
    assert outcomes.categorize("ColabAuthenticationFailed") == "auth"
    assert outcomes.pip_package("cv2") == "opencv-python"
    assert outcomes.pip_package("sklearn.svm") == "scikit-learn"
    assert outcomes.pip_package("PIL.Image") == "Pillow"
    assert outcomes.pip_package("torch") == "torch"
    # the documented default: cgpu-local when installed, else the first local-backend one
    specs = kernelspec.list_specs()
    assert runner.resolve_kernel(None)[0] == runner.default_kernel(specs)
    names = [str(spec["name"]) for spec in specs]
    if "cgpu-local" in names:
        assert runner.default_kernel(specs) == "cgpu-local"


def test_kernel_timeout_defaults_to_the_kernelspecs_own() -> None:
    colab = {
        "argv": ["python", "-m", "cgpu_kernel", "-f", "{connection_file}", "--startup-timeout=300"]
    }
    assert runner.first_start_timeout(colab, None) == (300.0, [])
    assert runner.first_start_timeout({"argv": []}, None) == (runner.FIRST_START_TIMEOUT, [])
    assert runner.first_start_timeout(colab, 5) == (5, ["--startup-timeout=5"])
