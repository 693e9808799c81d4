"""The execution loop of ``cgpu-kernel run``: one cell on a kernel client that is already started.

``runner`` calls :func:`wait_ready` and then :meth:`Execution.run`, for a fresh kernel and for a
named session's alike; both fill in a :class:`~cgpu_kernel.run.outcomes.RunResult`. Streamed
output goes through :class:`Output` as it arrives. Liveness is a callable (the kernel process,
or the session's host), not the heartbeat: see :func:`wait_ready`.
"""

from __future__ import annotations

import getpass
import queue
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from jupyter_client.blocking.client import BlockingKernelClient

from cgpu_kernel.core.limits import NOTICE_METADATA
from cgpu_kernel.core.relay import REMOTE_ERROR_KEY
from cgpu_kernel.run.outcomes import RunResult, categorize

#: Seconds an interrupted cell gets to finish before the run gives up on it.
INTERRUPT_GRACE = 15.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Output:
    """Where a run's output goes, as it arrives, without holding it in memory.

    Text mode (``stream=True``): the program's stdout/stderr go to ours as UTF-8, written as
    they arrive. ``--json`` mode: they go to two temporary files, which ``report.write_json``
    copies into the document at the end. The proxy's own notices (marked in the message metadata,
    see ``core.limits.NOTICE_METADATA``) never join the program's streams: they are kept in
    :attr:`notices` and, in text mode, written to stderr at once, marked ``cgpu-kernel:``.
    """

    def __init__(self, stream: bool, color: bool = False) -> None:
        self.stream = stream
        self.color = color  # may tracebacks keep their ANSI colours (a terminal, no NO_COLOR)
        self.bytes_written = 0
        self.notices: list[dict[str, Any]] = []
        self.files: dict[str, IO[str]] = {}
        if not stream:
            for name in ("stdout", "stderr"):
                self.files[name] = tempfile.TemporaryFile(  # noqa: SIM115 - closed by close()
                    "w+", encoding="utf-8", errors="surrogatepass", newline=""
                )

    def program(self, name: str, text: str) -> None:
        """Text the program wrote to its stream ``name`` ("stdout" or "stderr")."""
        if not text:
            return
        self.bytes_written += len(text.encode("utf-8", "surrogatepass"))
        if self.stream:
            write(sys.stderr if name == "stderr" else sys.stdout, text)
        else:
            self.files[name].write(text)

    def display(self, text: str) -> None:
        """The text/plain of a result or display, shown in text mode only (JSON has outputs)."""
        if self.stream and text:
            write(sys.stdout, text)

    def traceback(self, lines: list[str]) -> None:
        """An error's traceback, shown in text mode (colours only on a terminal)."""
        if not self.stream:
            return
        text = "\n".join(lines) + "\n"
        write(sys.stderr, text if self.color else ANSI.sub("", text))

    def notice(self, text: str, detail: dict[str, Any]) -> None:
        """A line from the proxy itself (waiting, reconnecting, output held back...)."""
        self.notices.append({"text": text, **detail})
        if self.stream:
            marked = text.lstrip().startswith(("[cgpu-kernel", "cgpu-kernel:"))
            shown = text if marked else f"cgpu-kernel: {text}"
            write(sys.stderr, shown if shown.endswith("\n") else shown + "\n")

    def read(self, name: str) -> IO[str] | None:
        """The captured stream ``name`` (JSON mode), rewound; None in text mode."""
        handle = self.files.get(name)
        if handle is not None:
            handle.flush()
            handle.seek(0)
        return handle

    def close(self) -> None:
        for handle in self.files.values():
            handle.close()


def write(stream: IO[str], text: str) -> None:
    """Write ``text`` to ``stream`` as UTF-8 at once (a BrokenPipeError goes to the caller)."""
    stream.flush()
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        stream.write(text)
    else:
        buffer.write(text.encode("utf-8", "backslashreplace"))
        buffer.flush()
    stream.flush()


def wait_ready(
    kc: BlockingKernelClient,
    timeout: float,
    alive: Callable[[], bool],
    result: RunResult,
    *,
    fresh: bool = False,
) -> bool:
    """Wait until the kernel answers ``kernel_info`` *and* our iopub subscription works.

    Like ``jupyter_client``'s ``wait_for_ready``, but liveness is ``alive()`` (the process),
    not the heartbeat, which a loaded machine can miss for a second: that is not a dead kernel.
    An iopub message must follow the reply, else output printed right away could be lost to a
    subscription still on its way; the request is repeated each second until both arrive.
    On failure, classifies it into ``result`` and returns False. For a ``fresh`` kernel, a
    reply saying the remote could not be started (the relay's ``REMOTE_ERROR_KEY``) ends the
    run with that error at once: sending the code would only start a second attempt, doubling
    the wait. A reused session's kernel gets that attempt (its remote may be back).
    """
    deadline = time.monotonic() + timeout
    while True:
        kc.kernel_info()
        ask_again = time.monotonic() + 1.0
        while time.monotonic() < ask_again:
            try:
                msg = kc.get_shell_msg(timeout=0.1)
            except queue.Empty:
                continue
            if msg["msg_type"] == "kernel_info_reply":
                failed = msg["content"].get(REMOTE_ERROR_KEY)
                if fresh and isinstance(failed, dict):
                    ename, evalue = str(failed.get("ename")), str(failed.get("evalue"))
                    result.fail(categorize(ename, evalue), ename, evalue)
                    return False
                try:
                    kc.get_iopub_msg(timeout=0.5)
                except queue.Empty:
                    break  # iopub not connected yet: ask again
                while True:  # drain what the wait left on iopub (what is late, the
                    try:  # execution ignores: it reads only its own cell's messages)
                        kc.get_iopub_msg(timeout=0.005)
                    except queue.Empty:
                        return True
        if not alive():
            result.fail(
                "kernel_lost",
                "KernelDied",
                "The kernel process exited while starting: run `jupyter kernelspec list` and"
                " check the kernelspec's argv works.",
            )
            return False
        if time.monotonic() > deadline:
            result.fail(
                "kernel_timeout",
                "KernelStartupTimeout",
                f"The kernel was not ready within {timeout:g} s.",
            )
            return False


@dataclass
class Execution:
    """Runs one cell on a started client and fills in ``result``."""

    kc: BlockingKernelClient
    result: RunResult
    output: Output
    timeout: float | None
    alive: Callable[[], bool]  # is the kernel still there?
    idle_seen: bool = field(default=False, init=False)

    def run(self, code: str) -> None:
        """Send ``code`` and wait for both its reply and its ``idle``, interrupting on timeout."""
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=True, stop_on_error=True)
        sent = time.monotonic()
        reply: dict[str, Any] | None = None
        interrupted_at: float | None = None
        timed_out = False
        next_alive_check = sent + 1.0
        while reply is None or not self.idle_seen:
            try:
                now = time.monotonic()
                if self.timeout and interrupted_at is None and now - sent > self.timeout:
                    timed_out, interrupted_at = True, now
                    self.interrupt()
                if interrupted_at is not None and now - interrupted_at > INTERRUPT_GRACE:
                    break
                if now > next_alive_check:
                    next_alive_check = now + 1.0
                    if not self.alive():
                        self.result.fail(
                            "kernel_lost",
                            "KernelDied",
                            "The kernel process exited before the code finished.",
                        )
                        break
                self.drain_iopub(msg_id, sent)
                self.answer_input(msg_id, sent)
                if reply is None:
                    reply = self.poll_reply(msg_id)
            except BrokenPipeError:
                # The reader of our stdout went away (`| head`): stop the code, as a local
                # program would stop on SIGPIPE; the CLI ends quietly (run.cli).
                self.interrupt()
                raise
            except KeyboardInterrupt:
                if interrupted_at is not None:
                    raise  # a second Ctrl-C: give up at once
                interrupted_at = time.monotonic()
                self.interrupt()
        self.result.duration_ms = (time.monotonic() - sent) * 1000
        self.finish(reply, timed_out)

    def poll_reply(self, msg_id: str) -> dict[str, Any] | None:
        while True:
            try:
                msg: dict[str, Any] = self.kc.get_shell_msg(timeout=0)
            except queue.Empty:
                return None
            if msg["parent_header"].get("msg_id") == msg_id:
                return msg

    def answer_input(self, msg_id: str, sent: float) -> None:
        """Answer the code's ``input()`` from our stdin (a terminal or a pipe).

        The prompt goes where ``input()`` would put it: stdout in text mode, stderr under
        ``--json`` (stdout is the document). At the end of stdin the answer is ``"\\x04"``, which
        ipykernel turns into ``EOFError`` -- what ``input()`` raises on an exhausted stdin.
        """
        try:
            msg = self.kc.get_stdin_msg(timeout=0)
        except queue.Empty:
            return
        if msg["msg_type"] != "input_request":
            return
        self.drain_iopub(msg_id, sent)  # what the code printed before asking comes first
        content = msg["content"]
        prompt, password = str(content.get("prompt", "")), bool(content.get("password"))
        self.kc.input(read_answer(prompt, password, self.output.stream))

    def interrupt(self) -> None:
        """``interrupt_request`` on control: the proxy interrupts the remote over REST."""
        self.kc.control_channel.send(self.kc.session.msg("interrupt_request", {}))

    def drain_iopub(self, msg_id: str, sent: float) -> None:
        """Handle what iopub has for our cell, waiting briefly for the first message."""
        wait = 0.1
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=wait)
            except queue.Empty:
                return
            wait = 0
            if msg["parent_header"].get("msg_id") == msg_id:
                self.handle_iopub(msg, sent)

    def handle_iopub(self, msg: dict[str, Any], sent: float) -> None:
        result, content, kind = self.result, msg["content"], msg["msg_type"]
        if kind == "stream":
            text = str(content.get("text", ""))
            notice = msg.get("metadata", {}).get(NOTICE_METADATA)
            if isinstance(notice, dict):
                self.output.notice(text, notice)
                if notice.get("kind") == "held_back":
                    result.truncated = True
                    result.spool.extend(str(f) for f in notice.get("files", []))
            else:
                name = "stderr" if content.get("name") == "stderr" else "stdout"
                self.output.program(name, text)
        elif kind in ("execute_result", "display_data"):
            output = {"output_type": kind, "data": content.get("data", {})}
            output["metadata"] = content.get("metadata", {})
            if kind == "execute_result":
                output["execution_count"] = content.get("execution_count")
            result.outputs.append(output)
            text = output["data"].get("text/plain")
            if text:
                self.output.display(str(text) + "\n")
        elif kind == "error":
            self.result.shown = True
            self.output.traceback([str(line) for line in content.get("traceback", [])])
        elif kind == "execute_input":
            result.execution_count = content.get("execution_count", result.execution_count)
            if result.queue_ms is None:
                result.queue_ms = (time.monotonic() - sent) * 1000
        elif kind == "status" and content.get("execution_state") == "idle":
            self.idle_seen = True

    def finish(self, reply: dict[str, Any] | None, timed_out: bool) -> None:
        result = self.result
        if result.status == "error":
            return  # already classified (the kernel died)
        if reply is None:
            if timed_out:
                result.fail("timeout", "TimeoutError", self._timeout_message(stuck=True))
            else:
                result.fail("unknown", "NoReply", "The kernel never answered the code.")
            return
        content = reply["content"]
        if content.get("execution_count") is not None:
            result.execution_count = content["execution_count"]
        if content.get("status") == "ok":
            return
        ename, evalue = str(content.get("ename", "")), str(content.get("evalue", ""))
        lines = [ANSI.sub("", str(line)) for line in content.get("traceback", [])]
        if timed_out:
            result.fail("timeout", "TimeoutError", self._timeout_message(), traceback_lines=lines)
            return
        if content.get("status") == "aborted":
            result.fail("unknown", "Aborted", "The kernel aborted the execution.")
            return
        result.fail(categorize(ename, evalue), ename, evalue, traceback_lines=lines)

    def _timeout_message(self, stuck: bool = False) -> str:
        message = f"Execution exceeded --timeout {self.timeout:g} s and was interrupted."
        if stuck:
            message += f" It did not stop within {INTERRUPT_GRACE:g} s of the interrupt."
        return message


def read_answer(prompt: str, password: bool, prompt_on_stdout: bool) -> str:
    """One line from our stdin for an ``input_request`` (without its newline); ``"\\x04"`` at
    the end of stdin (or with no stdin at all)."""
    stdin = sys.stdin
    if stdin is None or stdin.closed:
        return "\x04"
    if password and stdin.isatty():
        try:
            return getpass.getpass(prompt)
        except EOFError:
            return "\x04"
    if prompt:
        write(sys.stdout if prompt_on_stdout else sys.stderr, prompt)
    line = stdin.readline()
    if not line:
        return "\x04"
    return line[:-1] if line.endswith("\n") else line
