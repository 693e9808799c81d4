"""The execution loop of ``cgpu-kernel run``: one cell on a kernel client that is already started.

``runner`` calls :func:`wait_ready` and then :meth:`Execution.run`, for a fresh kernel and for a
named session's alike; both fill in a :class:`~cgpu_kernel.run.outcomes.RunResult`. Streamed
output goes through :class:`Output` as it arrives. Liveness is a callable (the kernel process,
or the session's host), not the heartbeat: see :func:`wait_ready`.
"""

from __future__ import annotations

import queue
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

from jupyter_client.blocking.client import BlockingKernelClient

from cgpu_kernel.run.outcomes import RunResult, categorize

#: Seconds an interrupted cell gets to finish before the run gives up on it.
INTERRUPT_GRACE = 15.0
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Output:
    """Where streamed output goes: our stdout/stderr as UTF-8, written as it arrives."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def write(self, stream: IO[str], text: str) -> None:
        if not self.enabled or not text:
            return
        stream.flush()
        buffer = getattr(stream, "buffer", None)
        if buffer is None:
            stream.write(text)
        else:
            buffer.write(text.encode("utf-8", "backslashreplace"))
            buffer.flush()
        stream.flush()


def wait_ready(
    kc: BlockingKernelClient, timeout: float, alive: Callable[[], bool], result: RunResult
) -> bool:
    """Wait until the kernel answers ``kernel_info`` *and* our iopub subscription works.

    Like ``jupyter_client``'s ``wait_for_ready``, but liveness is ``alive()`` (the process),
    not the heartbeat, which a loaded machine can miss for a second: that is not a dead kernel.
    An iopub message must follow the reply, else output printed right away could be lost to a
    subscription still on its way; the request is repeated each second until both arrive.
    On failure, classifies it into ``result`` and returns False.
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
                try:
                    kc.get_iopub_msg(timeout=0.5)
                except queue.Empty:
                    break  # iopub not connected yet: ask again
                while True:  # drain what the wait left on iopub
                    try:
                        kc.get_iopub_msg(timeout=0.05)
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
        msg_id = self.kc.execute(code, store_history=True, allow_stdin=False, stop_on_error=True)
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
                if reply is None:
                    reply = self.poll_reply(msg_id)
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
            if content.get("name") == "stderr":
                result.stderr += text
                self.output.write(sys.stderr, text)
            else:
                result.stdout += text
                self.output.write(sys.stdout, text)
        elif kind in ("execute_result", "display_data"):
            output = {"output_type": kind, "data": content.get("data", {})}
            output["metadata"] = content.get("metadata", {})
            if kind == "execute_result":
                output["execution_count"] = content.get("execution_count")
            result.outputs.append(output)
            text = output["data"].get("text/plain")
            if text:
                self.output.write(sys.stdout, str(text) + "\n")
        elif kind == "error":
            self.result.shown = True
            self.output.write(sys.stderr, "\n".join(content.get("traceback", [])) + "\n")
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
