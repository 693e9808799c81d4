"""Issue 15: the ``cgpu-kernel`` command as a newcomer meets it, driven as the installed command.

Every test runs the installed ``cgpu-kernel`` script as a subprocess: through pipes (what a
shell redirect, ``| head`` or a CI log is), or through a terminal with ``pexpect`` where the
point is about terminals (colours, Ctrl-C at a prompt).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pexpect
import pytest

from tests.conftest import (
    RemoteServer,
    free_port,
    install_remote_spec,
    install_spec,
    start_kernel,
)

ROOT = Path(__file__).resolve().parent.parent
#: The console script pip installed next to this interpreter (what a user types).
COMMAND = str(Path(sys.executable).parent / "cgpu-kernel")
#: 20 MiB of stdout in 20 writes: each line numbered, so a cut or a reorder shows.
BIG_CELL = (
    "import sys\n"
    "for i in range(20):\n"
    "    sys.stdout.write(''.join(f'{i:03d}-{j:04d}' + 'x' * 1015 + '\\n' for j in range(1024)))\n"
    "_ = sys.stderr.write('done on stderr\\n')\n"
)
BIG_STDOUT = "".join(
    f"{i:03d}-{j:04d}" + "x" * 1015 + "\n" for i in range(20) for j in range(1024)
).encode()


@pytest.fixture(autouse=True)
def _remove_test_kernelspecs(kernel_dir: Path) -> Iterator[None]:
    """Kernelspecs a test installs go when it ends (others run the default kernelspec)."""
    folder = kernel_dir / "kernels"
    before = set(folder.iterdir()) if folder.is_dir() else set()
    yield
    for path in (set(folder.iterdir()) if folder.is_dir() else set()) - before:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def local(kernel_dir: Path) -> str:
    """``cgpu-local``: the documented default of ``run`` (the embedded local backend)."""
    return install_spec(kernel_dir, "cgpu-local", "local")


def cgpu(
    *args: str, stdin: bytes | None = None, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [COMMAND, *args],
        capture_output=True,
        input=stdin if stdin is not None else b"",
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def shell(line: str, timeout: float = 180) -> subprocess.CompletedProcess[bytes]:
    """``line`` in bash with pipefail off: ``$COMMAND`` is the installed command."""
    return subprocess.run(
        ["bash", "-c", line],
        capture_output=True,
        timeout=timeout,
        check=False,
        cwd=ROOT,
        env={**os.environ, "COMMAND": COMMAND},
    )


def announced(kernel: str, backend: str = "local") -> bytes:
    return f"cgpu-kernel: running on kernelspec {kernel!r} ({backend} backend".encode()


# --- 1. complete output, notices apart -----------------------------------------------------------


def test_a_20_mb_cell_arrives_complete_in_text_mode(local: str) -> None:
    done = cgpu("run", BIG_CELL)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(done.stdout) == len(BIG_STDOUT) == 20 * 1024 * 1024
    assert done.stdout == BIG_STDOUT
    # stderr: which kernelspec ran, then the program's own stderr; no proxy notice
    lines = done.stderr.splitlines()
    assert lines[0].startswith(announced(local)), done.stderr
    assert lines[1:] == [b"done on stderr"]


def test_a_20_mb_cell_arrives_complete_in_json(local: str) -> None:
    done = cgpu("run", "--json", BIG_CELL)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads(done.stdout)
    assert document["status"] == "ok"
    assert document["stdout"].encode() == BIG_STDOUT
    assert document["stderr"] == "done on stderr\n"
    assert document["notices"] == []
    assert document["truncated"] is False
    assert document["spool"] == []
    assert document["kernel"] == local


def test_max_output_holds_back_and_says_so(local: str, tmp_path: Path) -> None:
    code = "for i in range(50): print(f'{i:04d}' + 'y' * 95)"  # 50 lines of 100 characters
    done = cgpu("run", "--json", "--max-output", "1000", code)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads(done.stdout)
    expected = "".join(f"{i:04d}" + "y" * 95 + "\n" for i in range(50))
    assert document["stdout"] == expected[:1000]  # the head, nothing of the notices
    assert "cgpu-kernel" not in document["stdout"] + document["stderr"]
    assert document["truncated"] is True
    [spooled] = document["spool"]
    assert Path(spooled).read_text() == expected[1000:]  # the rest, saved in full
    kinds = [notice["kind"] for notice in document["notices"]]
    assert kinds[-1] == "held_back" and all(n["text"] for n in document["notices"])
    # text mode: the notices go to stderr, marked; stdout is the program's alone
    text = cgpu("run", "--max-output", "1000", code)
    assert text.stdout.decode() == expected[:1000]
    assert b"[cgpu-kernel: this cell's output passed 1000 B" in text.stderr


# --- 2. a file argument --------------------------------------------------------------------------


def test_a_single_argument_naming_a_file_runs_the_file(local: str, tmp_path: Path) -> None:
    script = tmp_path / "t.py"
    script.write_text("print('from the file', 6 * 7)\n")
    done = cgpu("run", str(script))
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"from the file 42\n"
    code = cgpu("run", "print('t.py')")  # code that is not a file path is still code
    assert code.stdout == b"t.py\n"


# --- 3. which kernelspec -------------------------------------------------------------------------


def test_the_default_kernelspec_is_the_local_one_and_errors_name_theirs(
    local: str, kernel_dir: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    install_spec(kernel_dir, "a-cgpu-unreachable", "jupyter", url=dead)  # first alphabetically
    done = cgpu("run", "print(1)")
    assert done.returncode == 0, done.stderr
    assert done.stderr.startswith(announced(local))
    failed = cgpu("run", "--json", "--kernel", "a-cgpu-unreachable", "--kernel-timeout", "5", "1")
    document = json.loads(failed.stdout)
    assert document["kernel"] == "a-cgpu-unreachable"
    assert document["error"]["kernelspec"] == "a-cgpu-unreachable"
    assert failed.stderr.startswith(announced("a-cgpu-unreachable", "jupyter"))
    text = cgpu("run", "--kernel", "a-cgpu-unreachable", "--kernel-timeout", "5", "1")
    assert b"error (code 20" in text.stderr
    assert b"on kernelspec 'a-cgpu-unreachable'" in text.stderr


# --- 4. input() ----------------------------------------------------------------------------------


def test_input_is_answered_from_piped_stdin(local: str) -> None:
    code = "a = input('first? ')\nb = input()\nprint('got', a, b)"
    done = cgpu("run", code, stdin=b"one\ntwo\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"first? got one two\n"
    ended = cgpu("run", "--json", "input('more? ')", stdin=b"")
    document = json.loads(ended.stdout)
    assert document["error"]["name"] == "EOFError"  # what input() raises at the end of stdin
    assert ended.returncode == 12


# --- 5. a closed pipe, Ctrl-C --------------------------------------------------------------------


def test_a_closed_pipe_is_a_normal_end(local: str) -> None:
    code = "[print(i) for i in range(10**6)];"
    done = shell(f'"$COMMAND" run "{code}" | head -3; exit ${{PIPESTATUS[0]}}')
    assert done.stdout == b"0\n1\n2\n"
    assert done.returncode == 0, done.stderr
    assert b"Traceback" not in done.stderr and b"BrokenPipe" not in done.stderr
    assert b"error" not in done.stderr
    reference = shell('"$COMMAND" config-reference | head -1; exit ${PIPESTATUS[0]}')
    assert reference.stdout.startswith(b"| Option |")
    assert reference.returncode == 0 and reference.stderr == b""


def test_a_closed_pipe_ends_outputs_show_quietly(tmp_path: Path) -> None:
    spool = tmp_path / "spool" / "run-1"
    spool.mkdir(parents=True)
    (spool / "cell-stdout.txt").write_text("line\n" * 500_000)
    done = shell(
        f'"$COMMAND" outputs show --spool-dir {tmp_path / "spool"} | head -1;'
        " exit ${PIPESTATUS[0]}"
    )
    assert done.stdout == b"line\n"
    assert done.returncode == 0 and done.stderr == b""


def test_ctrl_c_at_the_token_prompt_prints_no_traceback(tmp_path: Path) -> None:
    child = pexpect.spawn(
        COMMAND,
        ["install", "--backend", "jupyter", "--url", "http://127.0.0.1:1", "--token-stdin",
         "--name", "cgpu-never", "--prefix", str(tmp_path)],
        cwd=str(ROOT),
        timeout=30,
    )  # fmt: skip
    child.expect("Token: ")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    output = child.before.decode()
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert "cgpu-kernel: interrupted." in output
    assert child.exitstatus == 130
    assert not (tmp_path / "share" / "jupyter" / "kernels" / "cgpu-never").exists()


# --- 6. colours ----------------------------------------------------------------------------------


def _terminal_run(env: dict[str, str]) -> str:
    child = pexpect.spawn(
        COMMAND, ["run", "1/0"], cwd=str(ROOT), timeout=120, env={**os.environ, **env}
    )
    child.expect(pexpect.EOF)
    child.close()
    return str(child.before.decode())


def test_no_colour_escapes_off_a_terminal_or_with_no_color(local: str) -> None:
    piped = cgpu("run", "1/0")
    assert piped.returncode == 12
    assert b"ZeroDivisionError" in piped.stderr
    assert b"\x1b[" not in piped.stderr + piped.stdout
    terminal = _terminal_run({})
    assert "ZeroDivisionError" in terminal and "\x1b[" in terminal  # a terminal keeps colours
    plain = _terminal_run({"NO_COLOR": "1"})
    assert "ZeroDivisionError" in plain and "\x1b[" not in plain


# --- 16. help ------------------------------------------------------------------------------------


def test_a_bare_command_prints_the_help() -> None:
    done = cgpu()
    assert done.returncode == 0
    assert done.stdout.startswith(b"usage: cgpu-kernel")
    assert b"run" in done.stdout and done.stderr == b""


# --- 8. a refused token names its source ----------------------------------------------------------


def test_a_refused_token_names_the_file_that_holds_it(
    kernel_dir: Path, jupyter_server: RemoteServer, tmp_path: Path
) -> None:
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token\n")
    install_spec(
        kernel_dir, "cgpu-wrong-token", "jupyter", url=jupyter_server.url, token_file=wrong
    )
    done = cgpu(
        "run", "--json", "--kernel", "cgpu-wrong-token", "1", env={"CGPU_TOKEN": "also-wrong"}
    )
    document = json.loads(done.stdout)
    assert document["error"]["category"] == "auth", document
    assert done.returncode == 22
    suggestion = document["error"]["suggestion"]
    assert str(wrong) in suggestion and "wins over CGPU_TOKEN" in suggestion
    assert "cgpu-kernel install --token-stdin --name cgpu-wrong-token" in suggestion


# --- 10. remove deletes the saved token -----------------------------------------------------------


def test_remove_deletes_the_token_file_install_saved(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    env = {"JUPYTER_PATH": str(prefix / "share" / "jupyter")}
    url = "http://127.0.0.1:1"
    installed = cgpu(
        "install", "--backend", "jupyter", "--url", url, "--token-stdin",
        "--name", "cgpu-tokened", "--prefix", str(prefix), stdin=b"secret\n", env=env,
    )  # fmt: skip
    assert installed.returncode == 0, installed.stderr
    spec = json.loads((prefix / "share/jupyter/kernels/cgpu-tokened/kernel.json").read_text())
    token_file = Path(spec["argv"][spec["argv"].index("--token-file") + 1])
    assert token_file.read_text() == "secret\n"
    removed = cgpu("remove", "cgpu-tokened", env=env)
    assert removed.returncode == 0, removed.stderr
    assert not token_file.exists()
    assert not (prefix / "share/jupyter/kernels/cgpu-tokened").exists()


# --- 15. demo errors ----------------------------------------------------------------------------


def test_demo_with_a_missing_or_broken_notebook_is_one_clear_error(tmp_path: Path) -> None:
    missing = cgpu("demo", "--notebook", str(tmp_path / "nope.ipynb"))
    assert missing.returncode == 2
    assert missing.stderr.startswith(b"cgpu-kernel: Cannot read the notebook")
    assert b"Traceback" not in missing.stderr
    broken = tmp_path / "broken.ipynb"
    broken.write_text("this is not JSON")
    done = cgpu("demo", "--notebook", str(broken))
    assert done.returncode == 2
    assert b"is not a Jupyter notebook" in done.stderr and b"Traceback" not in done.stderr


# --- 16. help, did you mean -----------------------------------------------------------------------


def test_a_typo_gets_did_you_mean(local: str) -> None:
    command = cgpu("rnu", "print(1)")
    assert command.returncode == 2
    assert b"unknown command 'rnu'. Did you mean `cgpu-kernel run`?" in command.stderr
    kernel = cgpu("run", "--json", "--kernel", "cgpu-locl", "1")
    document = json.loads(kernel.stdout)
    assert "Did you mean 'cgpu-local'?" in document["error"]["message"]
    assert kernel.returncode == 26


def options_without_help(text: str) -> list[str]:
    """The option lines of argparse's help that have no help text: nothing after the
    invocation (two spaces or more separate them) and no help on the next line."""
    lines = text.splitlines()
    bare = []
    for index, line in enumerate(lines):
        if not re.match(r"  (-|[A-Za-z])", line) or line.startswith("  {"):
            continue
        if re.search(r"\S {2,}\S", line.strip()):
            continue  # the help follows on the same line
        following = lines[index + 1] if index + 1 < len(lines) else ""
        if not re.match(r" {6,}\S", following):
            bare.append(line)
    return bare


def test_every_option_has_help() -> None:
    for command in (["install"], ["list"], ["remove"], ["run"]):
        done = cgpu(*command, "--help")
        assert done.returncode == 0
        text = done.stdout.decode()
        assert not options_without_help(text), command
    install = cgpu("install", "--help").stdout.decode()
    assert "colab-gpu for colab" in install and "(default: local)" in install
    assert "deleted too" in cgpu("remove", "--help").stdout.decode()


# --- 9. reclaim finds the kernelspec's token ------------------------------------------------------


def test_reclaim_uses_the_token_file_of_the_matching_kernelspec(
    jupyter_spec: str, jupyter_server: RemoteServer
) -> None:
    before = jupyter_server.kernel_ids()
    km, kc = start_kernel(jupyter_spec)
    orphan = next(iter(jupyter_server.kernel_ids() - before))
    kc.stop_channels()
    km.provisioner.process.kill()  # type: ignore[union-attr]
    km.provisioner.process.wait()  # type: ignore[union-attr]
    assert orphan in jupyter_server.kernel_ids()
    env = {key: value for key, value in os.environ.items() if key != "CGPU_TOKEN_FILE"}
    done = subprocess.run(
        [COMMAND, "reclaim"], capture_output=True, timeout=60, check=False, env=env, cwd=ROOT
    )  # no --token-file, no CGPU_TOKEN: the kernelspec for that server knows its token file
    assert done.returncode == 0, done.stdout + done.stderr
    assert b"deleted 1 kernel(s), 0 left" in done.stdout
    assert orphan not in jupyter_server.kernel_ids()
    km.cleanup_resources()


# --- 11. install --check, no empty token ----------------------------------------------------------


def test_install_check_finds_a_wrong_token_and_refuses_an_empty_one(
    jupyter_server: RemoteServer, tmp_path: Path
) -> None:
    prefix = tmp_path / "prefix"
    kernels = prefix / "share/jupyter/kernels"
    base = ["install", "--backend", "jupyter", "--url", jupyter_server.url, "--prefix", str(prefix)]
    wrong = cgpu(*base, "--name", "cgpu-wrong", "--token-stdin", "--check", stdin=b"nope\n")
    assert wrong.returncode == 2
    assert wrong.stderr.startswith(b"cgpu-kernel: ") and b"refused our credentials" in wrong.stderr
    assert not (kernels / "cgpu-wrong").exists()
    empty = cgpu(*base, "--name", "cgpu-empty", "--token-stdin", stdin=b"\n")
    assert empty.returncode == 2 and b"read an empty token" in empty.stderr
    assert not (kernels / "cgpu-empty").exists()
    token = jupyter_server.token_file.read_bytes()
    right = cgpu(*base, "--name", "cgpu-right", "--token-stdin", "--check", stdin=token)
    assert right.returncode == 0, right.stderr
    assert b"the token works and it has the kernelspec 'python3'" in right.stdout
    assert (kernels / "cgpu-right" / "kernel.json").is_file()
    cgpu("remove", "cgpu-right", env={"JUPYTER_PATH": str(prefix / "share/jupyter")})


# --- 12 and 18: the colab name, the logs header ---------------------------------------------------


def test_cgpu_colab_is_an_alias_of_colab_gpu(kernel_dir: Path) -> None:
    install_spec(kernel_dir, "colab-gpu", "colab", extra=["--colab-url=http://127.0.0.1:1/"])
    done = cgpu("run", "--json", "--kernel", "cgpu-colab", "--no-syntax-check", "1", timeout=60)
    document = json.loads(done.stdout)
    assert document["kernel"] == "colab-gpu"  # resolved, whatever the run then met
    assert b"running on kernelspec 'colab-gpu' (colab backend" in done.stderr


def test_logs_has_a_header_row(tmp_path: Path) -> None:
    record = {"time": "2026-01-01T00:00:00+00:00", "kernel": "cgpu-local", "source": "run",
              "status": "ok", "category": None, "duration_ms": 12.0, "output_bytes": 3,
              "reconnects": 0}  # fmt: skip
    history_file = tmp_path / "history.jsonl"
    history_file.write_text(json.dumps(record) + "\n")
    done = cgpu("logs", env={"CGPU_HISTORY_FILE": str(history_file)})
    assert done.returncode == 0, done.stderr
    header, row = done.stdout.decode().splitlines()
    assert header.split() == [
        "time", "kernel", "source", "status", "category", "duration", "wall", "output",
        "reconnects",
    ]  # fmt: skip
    assert row.split() == ["2026-01-01T00:00:00+00:00", "cgpu-local", "run", "ok", "12", "ms",
                           "-", "3", "B", "0"]  # fmt: skip


# --- 13. jupyter console's normal exit is not a crash ---------------------------------------------

#: The installed ``jupyter`` command, next to this interpreter (what a user types).
JUPYTER = str(Path(sys.executable).parent / "jupyter")
SIMPLE_PROMPT = r"In \[\d+\]: "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def console(kernel: str, tmp_path: Path, *, simple: bool = True) -> pexpect.spawn:
    """``jupyter console --kernel KERNEL`` in a terminal; ``simple`` is the plain prompt
    (no prompt_toolkit, so no ``is_complete_request`` either)."""
    extra = ["--ZMQTerminalInteractiveShell.simple_prompt=True"] if simple else []
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime")}
    env["TERM"] = "dumb" if simple else "xterm"
    child = pexpect.spawn(
        JUPYTER,
        ["console", f"--kernel={kernel}", *extra],
        cwd=str(tmp_path),
        env=env,
        encoding="utf-8",
        timeout=90,
        dimensions=(40, 300),
    )
    child.logfile_read = (tmp_path / "console.log").open("w")
    return child


def read_until_the_terminal_closes(child: pexpect.spawn, limit_s: float = 60) -> None:
    """Read ``child``'s terminal until every process holding it has closed it.

    pexpect reports EOF as soon as its own child is dead and nothing is waiting to be read
    (``read_nonblocking`` checks ``isalive()``), which can be before the proxy kernel, which
    holds the same terminal, has written its last line; on a loaded machine it was (CI, stop
    13). The kernel's lines are what the test is about, so read on until the terminal closes."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        ready, _, _ = select.select([child.child_fd], [], [], 0.5)
        if not ready:
            continue
        try:
            data = os.read(child.child_fd, 65536)
        except OSError:  # EIO: the last process holding the terminal has closed it
            return
        if not data:
            return
        child.logfile_read.write(data.decode(errors="replace"))
    raise AssertionError(f"the terminal was still open after {limit_s} s")


def transcript(tmp_path: Path) -> str:
    return ANSI.sub("", (tmp_path / "console.log").read_text()).replace("\r", "")


def test_console_exit_is_quiet_and_a_crashed_console_is_still_told(
    local: str, tmp_path: Path
) -> None:
    child = console(local, tmp_path)
    try:
        child.expect(SIMPLE_PROMPT)
        child.sendline("print(6 * 7)")
        child.expect_exact("42")
        child.expect(SIMPLE_PROMPT)
        child.sendline("exit")
        # until the proxy, holding the terminal too, has exited as well: a warning it wrote
        # on its way out would be in the transcript
        read_until_the_terminal_closes(child)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.terminate(force=True)
        child.logfile_read.close()
    normal = transcript(tmp_path)
    assert "Shutting down kernel" in normal
    assert "is gone" not in normal and "WARNING" not in normal, normal[-2000:]

    crashed = console(local, tmp_path)  # a frontend killed outright: the proxy says why it ends
    try:
        crashed.expect(SIMPLE_PROMPT)
        os.kill(crashed.pid, 9)
        read_until_the_terminal_closes(crashed)
    finally:
        crashed.terminate(force=True)
        crashed.logfile_read.close()
    assert re.search(
        r"WARNING .* the frontend process \d+ is gone; shutting down", transcript(tmp_path)
    )


# --- 7. a server that never answers: which limit, and the real wall time --------------------------


def test_a_silent_server_names_the_limit_it_hit_and_logs_the_wall_time(
    kernel_dir: Path, silent_server: str, tmp_path: Path
) -> None:
    history_file = tmp_path / "history.jsonl"
    env = {"CGPU_HISTORY_FILE": str(history_file)}
    install_spec(kernel_dir, "cgpu-hung", "jupyter", url=silent_server)
    begun = time.monotonic()
    done = cgpu(
        "run", "--json", "--kernel", "cgpu-hung", "1", env={**env, "CGPU_REQUEST_TIMEOUT": "3"}
    )
    wall_ms = (time.monotonic() - begun) * 1000
    document = json.loads(done.stdout)
    assert done.returncode == 21, done.stderr  # a connection error
    assert document["error"]["name"] == "RemoteUnreachable"
    assert (
        f"Could not reach the Jupyter server at {silent_server}: it accepted the connection but"
        " sent no answer within 3 s (the request timeout; raise it with --request-timeout"
        " (CGPU_REQUEST_TIMEOUT))."
    ) in document["error"]["message"]
    # one attempt, not a second one for the code: the run ends with the start's error
    assert document["notices"] == [] and document["executionCount"] is None
    [record] = json.loads(cgpu("logs", "--json", env=env).stdout)
    assert 3000 <= record["total_ms"] <= wall_ms  # the whole run, start to end
    assert record["total_ms"] == document["timing"]["total_ms"]
    table = cgpu("logs", env=env).stdout.decode().splitlines()
    assert table[0].split()[5:7] == ["duration", "wall"]
    assert f"{record['total_ms']:.0f} ms" in table[1]

    # the startup deadline, shorter than the request timeout (an option in the kernelspec)
    install_spec(kernel_dir, "cgpu-hung-deadline", "jupyter", url=silent_server,
                 extra=["--startup-timeout=2", "--request-timeout=30"])  # fmt: skip
    deadline = cgpu("run", "--json", "--kernel", "cgpu-hung-deadline", "1", env=env)
    error = json.loads(deadline.stdout)["error"]
    assert error["name"] == "RemoteStartupTimeout"
    assert "was not ready within 2 s" in error["message"]
    assert "raise --startup-timeout (CGPU_STARTUP_TIMEOUT)" in error["message"]


# --- 14. jupyter console against an unreachable server --------------------------------------------

#: The full prompt (prompt_toolkit, which asks is_complete_request on Enter), colours and all.
_ESC = r"(?:\x1b\[[0-9;?]*[A-Za-z])*"
FULL_PROMPT = rf"In \[{_ESC}\d+{_ESC}\]: "


def test_console_against_an_unreachable_server_stays_usable_and_exits(
    kernel_dir: Path, tmp_path: Path
) -> None:
    dead = f"http://127.0.0.1:{free_port()}/"
    name = install_spec(kernel_dir, "cgpu-console-dead", "jupyter", url=dead)
    child = console(name, tmp_path, simple=False)
    try:
        child.expect_exact("(not connected: Could not reach")  # the banner says why
        child.expect(FULL_PROMPT)
        child.sendline("print(6 * 7)")
        child.expect_exact("RemoteUnreachable")
        child.expect(FULL_PROMPT)
        child.sendline("for i in range(2):")  # a local is_complete: the block stays open
        child.expect_exact("...:")
        child.sendline("print(i)")
        child.sendline("")
        child.expect_exact("RemoteUnreachable")
        child.expect(FULL_PROMPT)
        child.sendline("exit")  # answered here: the console leaves
        child.expect(pexpect.EOF, timeout=60)
        child.close()
        assert child.exitstatus == 0
    finally:
        child.terminate(force=True)
        child.logfile_read.close()
    text = transcript(tmp_path)
    assert "is_complete" not in text  # no warning about an invalid or missing reply
    banner, cells = text.split("In [", 1)
    assert banner.count(f"Could not reach the Jupyter server at {dead}") == 2  # log, banner
    assert cells.count("Could not reach the Jupyter server") == 2  # once per cell
    assert "Shutting down kernel" in cells and "is gone" not in cells


# --- 17. status: every kernelspec, whatever its backend -------------------------------------------


def test_status_shows_every_kernelspec_its_target_reachability_and_kernels(
    local: str, kernel_dir: Path, jupyter_server: RemoteServer
) -> None:
    reachable = install_remote_spec(kernel_dir, "cgpu-status-up", jupyter_server)
    dead = f"http://127.0.0.1:{free_port()}/"
    install_spec(kernel_dir, "cgpu-status-down", "jupyter", url=dead)
    before = jupyter_server.kernel_ids()
    remote_km, remote_kc = start_kernel(reachable)
    local_km, local_kc = start_kernel(local)
    try:
        [remote_id] = jupyter_server.kernel_ids() - before
        local_pid = local_km.provisioner.pid  # type: ignore[union-attr]
        done = cgpu("status", "--json")
        assert done.returncode == 1, done.stderr  # one target does not answer
        rows = {row["name"]: row for row in json.loads(done.stdout)["kernelspecs"]}
        up = rows[reachable]
        assert (up["backend"], up["target"], up["reachable"]) == (
            "jupyter", jupyter_server.url, True
        )  # fmt: skip
        assert {"id": remote_id, "name": "python3", "state": "idle"} in up["kernels"]
        assert jupyter_server.token not in done.stdout.decode()
        down = rows["cgpu-status-down"]
        assert (down["target"], down["reachable"], down["kernels"]) == (dead, False, [])
        assert f"Could not reach the Jupyter server at {dead}" in down["detail"]
        assert "Connection refused" in down["detail"]
        mine = rows[local]
        assert (mine["backend"], mine["reachable"]) == ("local", None)
        assert mine["target"] == "private server on 127.0.0.1, started with each kernel"
        # (proxies of other cgpu-local kernels on this machine, with the same command, count too)
        assert {"pid": local_pid, "state": "running"} in mine["kernels"]

        text = cgpu("status")
        assert text.returncode == 1
        lines = {line.split()[0]: line.split() for line in text.stdout.decode().splitlines()}
        assert lines["KERNELSPEC"] == ["KERNELSPEC", "BACKEND", "TARGET", "REACHABLE", "KERNELS"]
        assert lines[reachable][:4] == [reachable, "jupyter", jupyter_server.url, "yes"]
        assert "python3 idle" in " ".join(lines[reachable][4:])
        assert lines["cgpu-status-down"] == ["cgpu-status-down", "jupyter", dead, "no", "-"]
        assert lines[local][:4] == [local, "local", "private", "server"]
        assert "running" in lines[local]
        assert re.search(rf"\(pid [0-9, ]*\b{local_pid}\b", " ".join(lines[local]))
        assert lines["cgpu-status-down:"][1:4] == ["Could", "not", "reach"]  # why, below
    finally:
        for km, kc in ((remote_km, remote_kc), (local_km, local_kc)):
            kc.stop_channels()
            km.shutdown_kernel()
