"""The relay's routing rules, event by event, with no sockets and no clock."""

from __future__ import annotations

from typing import Any

import pytest

from cgpu_kernel.core.actions import (
    AwaitRestartedKernel,
    ConnectRemote,
    EndRun,
    InterruptRemote,
    Publish,
    SendToFrontend,
    SendToRemote,
    ShutdownRemote,
)
from cgpu_kernel.core.journal import LostMessage
from cgpu_kernel.core.relay import REMOTE_ERROR_KEY, Relay, RemoteState, local_is_complete
from cgpu_kernel.core.wire import Message, make_header
from cgpu_kernel.exceptions import RemoteKernelGoneError, RemoteUnreachableError

NOTEBOOK = (b"notebook",)
CONSOLE = (b"console",)


def request(msg_type: str, channel: str = "shell", **content: Any) -> Message:
    return Message.build(channel, make_header(msg_type, "frontend"), {}, {}, content)


def reply_to(req: Message, msg_type: str, channel: str = "shell", **content: Any) -> Message:
    return Message.build(channel, make_header(msg_type, "kernel"), req.header, {}, content)


def connected_relay(on_remote_death: str = "exit") -> Relay:
    relay = Relay("proxy", on_remote_death=on_remote_death)
    relay.remote_connected()
    return relay


def kinds(actions: list[Any]) -> list[str]:
    out = []
    for action in actions:
        if isinstance(action, Publish):
            out.append(f"publish:{action.msg.msg_type}")
        elif isinstance(action, SendToFrontend):
            out.append(f"{action.channel}:{action.msg.msg_type}")
        else:
            out.append(type(action).__name__)
    return out


def test_start_says_starting_and_asks_for_remote() -> None:
    actions = Relay("proxy").start()
    assert isinstance(actions[0], Publish)
    assert actions[0].msg.content == {"execution_state": "starting"}
    assert isinstance(actions[1], ConnectRemote)


def test_reply_goes_to_the_identity_that_asked() -> None:
    relay = connected_relay()
    from_notebook = request("execute_request", code="1")
    from_console = request("execute_request", code="2")
    assert kinds(relay.frontend_message("shell", NOTEBOOK, from_notebook)) == ["SendToRemote"]
    relay.frontend_message("shell", CONSOLE, from_console)
    out = relay.remote_message(reply_to(from_console, "execute_reply", status="ok"))
    assert len(out) == 1 and isinstance(out[0], SendToFrontend)
    assert out[0].identities == CONSOLE
    out = relay.remote_message(reply_to(from_notebook, "execute_reply", status="ok"))
    assert isinstance(out[0], SendToFrontend) and out[0].identities == NOTEBOOK
    assert relay.inflight == []


def test_input_request_goes_to_requester_stdin() -> None:
    relay = connected_relay()
    execute = request("execute_request", code="input()", allow_stdin=True)
    relay.frontend_message("shell", CONSOLE, execute)
    out = relay.remote_message(reply_to(execute, "input_request", "stdin", prompt=""))
    assert isinstance(out[0], SendToFrontend)
    assert (out[0].channel, out[0].identities) == ("stdin", CONSOLE)
    answer = request("input_reply", "stdin", value="42")
    out = relay.frontend_message("stdin", CONSOLE, answer)
    assert isinstance(out[0], SendToRemote) and out[0].msg is answer
    # the execute request is still waiting for its reply
    assert [r.msg for r in relay.inflight] == [execute]


def test_iopub_is_published_and_duplicates_dropped() -> None:
    relay = connected_relay()
    execute = request("execute_request", code="print(1)")
    relay.frontend_message("shell", NOTEBOOK, execute)
    stream = reply_to(execute, "stream", "iopub", name="stdout", text="1\n")
    assert kinds(relay.remote_message(stream)) == ["publish:stream"]
    assert relay.remote_message(stream) == []  # a server replay after reconnect


def test_requests_queue_until_connected_and_keep_order() -> None:
    relay = Relay("proxy")
    first = request("kernel_info_request")
    second = request("execute_request", code="x = 1")
    assert relay.frontend_message("shell", NOTEBOOK, first) == []
    queued = relay.frontend_message("shell", NOTEBOOK, second)
    assert kinds(queued) == ["publish:status", "publish:stream"]  # busy + "waiting for" notice
    assert isinstance(queued[1], Publish)
    assert "waiting for" in queued[1].msg.content["text"]
    sent = relay.remote_connected()
    assert [a.msg for a in sent if isinstance(a, SendToRemote)] == [first, second]


def test_queue_bound_refuses_with_error() -> None:
    relay = Relay("proxy", max_queue=1)
    relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="1"))
    refused = request("execute_request", code="2")
    out = relay.frontend_message("shell", NOTEBOOK, refused)
    replies = [a for a in out if isinstance(a, SendToFrontend)]
    assert replies[0].msg.content["status"] == "error"
    assert "already waiting" in replies[0].msg.content["evalue"]
    assert len(relay.queued) == 1


def test_failure_answers_every_waiting_request() -> None:
    relay = Relay("proxy")
    execute = request("execute_request", code="1")
    complete = request("complete_request", code="pri", cursor_pos=3)
    info = request("kernel_info_request")
    for msg in (execute, complete, info):
        relay.frontend_message("shell", NOTEBOOK, msg)
    out = relay.remote_failed(RemoteUnreachableError("Could not reach http://h:1/: refused."))
    assert relay.state is RemoteState.FAILED
    replies = {a.msg.msg_type: a.msg for a in out if isinstance(a, SendToFrontend)}
    assert replies["execute_reply"].content["status"] == "error"
    assert replies["execute_reply"].content["ename"] == "RemoteUnreachable"
    assert replies["complete_reply"].content["status"] == "error"
    # kernel_info gets a local answer so frontends start and show the error in the cell
    assert replies["kernel_info_reply"].content["status"] == "ok"
    assert "not connected" in replies["kernel_info_reply"].content["banner"]
    errors = [a.msg for a in out if isinstance(a, Publish) and a.msg.msg_type == "error"]
    assert errors and "Could not reach" in errors[0].content["evalue"]
    idles = [
        a.msg.parent_header["msg_id"]
        for a in out
        if isinstance(a, Publish) and a.msg.content.get("execution_state") == "idle"
    ]
    assert sorted(idles) == sorted(m.msg_id for m in (execute, complete, info))


def test_after_failure_next_request_retries() -> None:
    relay = Relay("proxy")
    relay.remote_failed(RemoteUnreachableError("down"))
    out = relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="1"))
    assert any(isinstance(a, ConnectRemote) for a in out)
    assert relay.state is RemoteState.CONNECTING
    # but kernel_info while failed is answered at once, without a retry
    relay.remote_failed(RemoteUnreachableError("down"))
    out = relay.frontend_message("shell", NOTEBOOK, request("kernel_info_request"))
    assert kinds(out) == ["publish:status", "shell:kernel_info_reply", "publish:status"]


def _answered(out: list[Any]) -> Message:
    """The one reply among ``out``, which must be busy, reply, idle and nothing else."""
    assert kinds(out)[0] == "publish:status" and kinds(out)[-1] == "publish:status", kinds(out)
    assert len(out) == 3 and isinstance(out[1], SendToFrontend)
    return out[1].msg


def test_a_failed_remote_leaves_a_console_usable_without_new_attempts() -> None:
    """Issue 15, point 14: jupyter console against an unreachable server."""
    relay = Relay("proxy")
    error = RemoteUnreachableError("Could not reach http://h:1/: refused.")
    relay.remote_failed(error)
    answers = {
        "is_complete_request": request("is_complete_request", code="for i in x:"),
        "complete_request": request("complete_request", code="pri", cursor_pos=3),
        "inspect_request": request("inspect_request", code="print", cursor_pos=5, detail_level=0),
        "history_request": request("history_request", hist_access_type="tail", n=1000),
        "comm_info_request": request("comm_info_request"),
    }
    replies = {}
    for msg_type, msg in answers.items():
        out = relay.frontend_message("shell", CONSOLE, msg)
        assert not any(isinstance(a, ConnectRemote) for a in out), msg_type  # no new attempt
        replies[msg_type] = _answered(out).content
    assert replies["is_complete_request"] == {"status": "incomplete", "indent": "    "}
    assert replies["complete_request"] == {
        "status": "ok", "matches": [], "cursor_start": 3, "cursor_end": 3, "metadata": {}
    }  # fmt: skip
    assert replies["inspect_request"]["found"] is False
    assert replies["history_request"] == {"status": "ok", "history": []}
    assert replies["comm_info_request"] == {"status": "ok", "comms": {}}
    assert relay.state is RemoteState.FAILED
    # `exit` and `quit` end the console: IPython's ask_exit payload, nothing sent anywhere
    for code in ("exit", " quit\n", "exit()"):
        out = relay.frontend_message("shell", CONSOLE, request("execute_request", code=code))
        reply = _answered(out).content
        assert reply["status"] == "ok"
        assert reply["payload"] == [{"source": "ask_exit", "keepkernel": False}]
    # any other cell tries again, and shows the error once (its error output)
    retry = relay.frontend_message("shell", CONSOLE, request("execute_request", code="exit(1)"))
    assert any(isinstance(a, ConnectRemote) for a in retry)
    out = relay.remote_failed(error)
    errors = [a for a in out if isinstance(a, Publish) and a.msg.msg_type == "error"]
    assert len(errors) == 1


def test_is_complete_is_answered_locally_whenever_the_remote_is_not_connected() -> None:
    relay = Relay("proxy")  # connecting: still no queueing for it, a console waits 1 s only
    out = relay.frontend_message("shell", CONSOLE, request("is_complete_request", code="x = 1"))
    assert _answered(out).content == {"status": "complete"}
    assert relay.queued == []
    # one sent while connected whose remote then fails is never answered with "error"
    relay.remote_connected()
    asked = request("is_complete_request", code="if x:")
    relay.frontend_message("shell", CONSOLE, asked)
    out = relay.remote_failed(RemoteUnreachableError("down"))
    assert _answered(out).content == {"status": "incomplete", "indent": "    "}
    # while connecting, exit waits for the remote like any cell (it may be just slow)
    relay = Relay("proxy")
    out = relay.frontend_message("shell", CONSOLE, request("execute_request", code="exit"))
    assert not any(isinstance(a, SendToFrontend) for a in out)


def test_local_is_complete() -> None:
    assert local_is_complete("print(1)", "python") == {"status": "complete"}
    assert local_is_complete("def f():\n    if x:", "python") == {
        "status": "incomplete", "indent": "        "
    }  # fmt: skip
    assert local_is_complete("(1,", "python") == {"status": "incomplete", "indent": ""}
    assert local_is_complete("%time x = 1", "python") == {"status": "unknown"}  # IPython's
    assert local_is_complete("1 is 1", "python") == {"status": "complete"}  # no SyntaxWarning
    assert local_is_complete("x <- 1", "r") == {"status": "unknown"}


def test_a_failed_start_tells_kernel_info_why() -> None:
    relay = Relay("proxy")
    info = request("kernel_info_request")
    relay.frontend_message("shell", NOTEBOOK, info)
    out = relay.remote_failed(RemoteUnreachableError("Could not reach http://h:1/: no answer."))
    content = _answered(out).content
    assert content[REMOTE_ERROR_KEY] == {
        "ename": "RemoteUnreachable", "evalue": "Could not reach http://h:1/: no answer."
    }  # fmt: skip
    relay.remote_connected()  # a connection that worked forgets the error
    assert relay.last_error is None


def test_lost_kernel_fails_inflight_requests() -> None:
    relay = connected_relay("continue")  # the carry-on mode; "exit" (default) below
    execute = request("execute_request", code="import time; time.sleep(100)")
    relay.frontend_message("shell", NOTEBOOK, execute)
    relay.remote_disconnected()
    assert relay.state is RemoteState.RECONNECTING
    out = relay.remote_failed(RemoteKernelGoneError("gone; variables are lost"))
    reply = next(a for a in out if isinstance(a, SendToFrontend))
    assert reply.msg.parent_header["msg_id"] == execute.msg_id
    assert reply.msg.content["ename"] == "RemoteKernelLost"


def test_messages_sent_while_reconnecting_are_queued() -> None:
    relay = connected_relay()
    relay.remote_disconnected()
    execute = request("execute_request", code="1")
    out = relay.frontend_message("shell", NOTEBOOK, execute)
    assert not any(isinstance(a, SendToRemote) for a in out)
    assert "reconnecting" in next(
        a.msg.content["text"] for a in out if isinstance(a, Publish) and a.msg.msg_type == "stream"
    )
    resent = relay.remote_connected()
    assert [a.msg for a in resent if isinstance(a, SendToRemote)] == [execute]


def test_send_failure_requeues() -> None:
    relay = connected_relay()
    execute = request("execute_request", code="1")
    (send,) = relay.frontend_message("shell", NOTEBOOK, execute)
    assert isinstance(send, SendToRemote)
    relay.send_failed(send.request, connection_alive=False)
    assert relay.state is RemoteState.RECONNECTING
    assert relay.inflight == []
    assert [a.msg for a in relay.remote_connected() if isinstance(a, SendToRemote)] == [execute]
    # a write lost on an older connection, noticed after the new one is up: sent again at once
    again = relay.send_failed(relay.inflight[0], connection_alive=True)
    assert [a.msg for a in again if isinstance(a, SendToRemote)] == [execute]
    assert relay.state is RemoteState.CONNECTED


def test_interrupt_on_control_or_shell_goes_to_rest() -> None:
    for channel in ("control", "shell"):
        relay = connected_relay()
        interrupt = request("interrupt_request", channel)
        out = relay.frontend_message(channel, NOTEBOOK, interrupt)
        assert kinds(out) == ["publish:status", "InterruptRemote"]
        action = out[1]
        assert isinstance(action, InterruptRemote)
        done = relay.interrupt_finished(action.request, None)
        assert kinds(done) == [f"{channel}:interrupt_reply", "publish:status"]
        assert isinstance(done[0], SendToFrontend) and done[0].identities == NOTEBOOK


def test_interrupt_before_start_cancels_queued_cells() -> None:
    relay = Relay("proxy")
    execute = request("execute_request", code="1")
    info = request("kernel_info_request")
    relay.frontend_message("shell", NOTEBOOK, execute)
    relay.frontend_message("shell", NOTEBOOK, info)
    out = relay.frontend_message("control", NOTEBOOK, request("interrupt_request", "control"))
    cancelled = [a for a in out if isinstance(a, SendToFrontend)]
    assert cancelled[0].msg.content["ename"] == "KeyboardInterrupt"
    assert [r.msg for r in relay.queued] == [info]


def test_shutdown_answers_everything() -> None:
    relay = connected_relay()
    execute = request("execute_request", code="1")
    relay.frontend_message("shell", NOTEBOOK, execute)
    shutdown = request("shutdown_request", "control", restart=True)
    out = relay.frontend_message("control", CONSOLE, shutdown)
    assert isinstance(out[-1], ShutdownRemote) and out[-1].restart is True
    late = relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="2"))
    assert any(
        isinstance(a, SendToFrontend) and a.msg.content.get("status") == "error" for a in late
    )
    done = relay.shutdown_finished(out[-1].request, True)
    replies = [a for a in done if isinstance(a, SendToFrontend)]
    assert [r.msg.msg_type for r in replies] == ["execute_reply", "shutdown_reply"]
    assert replies[-1].identities == CONSOLE
    assert replies[-1].msg.content == {"status": "ok", "restart": True}


def test_kernel_info_is_cached_for_later_local_answers() -> None:
    relay = connected_relay()
    info = request("kernel_info_request")
    relay.frontend_message("shell", NOTEBOOK, info)
    remote_info = {"status": "ok", "implementation": "ipython", "language_info": {"name": "python"}}
    relay.remote_message(reply_to(info, "kernel_info_reply", **remote_info))
    relay.remote_failed(RemoteUnreachableError("down"))
    out = relay.frontend_message("shell", NOTEBOOK, request("kernel_info_request"))
    reply = next(a for a in out if isinstance(a, SendToFrontend))
    assert reply.msg.content["implementation"] == "ipython"


def test_subscription_is_welcomed() -> None:
    (welcome,) = Relay("proxy").subscribed(b"")
    assert isinstance(welcome, Publish)
    assert welcome.msg.msg_type == "iopub_welcome"
    assert welcome.msg.content == {"subscription": ""}
    assert welcome.msg.parent_header == {}


def test_replies_to_unknown_requests_are_not_forwarded() -> None:
    relay = connected_relay()
    stranger = request("execute_request", code="1")
    assert relay.remote_message(reply_to(stranger, "execute_reply", status="ok")) == []


def test_sigint_cancels_queued_cells_without_a_reply() -> None:
    relay = Relay("proxy")
    execute = request("execute_request", code="1")
    relay.frontend_message("shell", NOTEBOOK, execute)
    out = relay.signal_interrupt()
    assert isinstance(out[-1], InterruptRemote) and out[-1].request is None
    replies = [a for a in out if isinstance(a, SendToFrontend)]
    assert [r.msg.content["ename"] for r in replies] == ["KeyboardInterrupt"]
    assert relay.queued == []


def test_a_queued_cell_that_fails_is_busy_once_and_idle_once() -> None:
    relay = Relay("proxy")
    execute = request("execute_request", code="1")
    queued = relay.frontend_message("shell", NOTEBOOK, execute)
    failed = relay.remote_failed(RemoteUnreachableError("down"))
    states = [
        a.msg.content["execution_state"]
        for a in [*queued, *failed]
        if isinstance(a, Publish) and a.msg.msg_type == "status"
    ]
    assert states == ["busy", "idle"]


def test_backend_intercepted_requests_are_answered_on_stdin() -> None:
    from cgpu_kernel.core.actions import AnswerRemoteRequest

    relay = Relay("proxy", intercept=lambda m: m.msg_type == "colab_request")
    relay.remote_connected()
    execute = request("execute_request", code="drive.mount('/content/drive')")
    relay.frontend_message("shell", NOTEBOOK, execute)
    asked = reply_to(execute, "colab_request", "stdin", request={"authType": "dfs_ephemeral"})
    (action,) = relay.remote_message(asked)
    assert isinstance(action, AnswerRemoteRequest)
    assert action.request is not None and action.request.msg is execute
    (notice,) = relay.notice(action.request, "open https://example.org/auth")
    assert isinstance(notice, Publish) and notice.msg.parent_header["msg_id"] == execute.msg_id
    (send,) = relay.answer_remote(asked, {"value": {"type": "colab_reply"}})
    assert isinstance(send, SendToRemote)
    assert send.msg.msg_type == "input_reply" and send.msg.channel == "stdin"
    assert send.msg.parent_header["msg_id"] == asked.msg_id


def test_outage_notices_once_then_reconnected() -> None:
    relay = connected_relay()
    execute = request("execute_request", code="train()")
    relay.frontend_message("shell", NOTEBOOK, execute)
    relay.remote_disconnected()
    first = relay.outage_notice(6.0)
    assert len(first) == 1 and "lost the connection" in first[0].msg.content["text"]
    assert relay.outage_notice(12.0) == []  # once per cell
    assert relay.remote_connected() == []
    back = relay.outage_over(14.2, complete=True)
    texts = [a.msg.content["text"] for a in back if isinstance(a, Publish)]
    assert texts == [
        "cgpu-kernel: reconnected after 14 s; nothing was lost (the kernel's output journal"
        " confirmed it).\n"
    ]
    assert relay.outage_over(1.0, complete=True) == []  # nobody was told about that one


def test_output_the_numbers_prove_lost_is_told_with_its_count() -> None:
    """Numbered messages that never arrived and the journal no longer had: told to the running
    cell even after an all-clear (the numbers prove it), else in the asking request's output."""
    relay = connected_relay()
    execute = request("execute_request", code="train()")
    relay.frontend_message("shell", NOTEBOOK, execute)
    (told,) = relay.output_lost(3, parent={})
    assert isinstance(told, Publish) and told.msg.parent_header["msg_id"] == execute.msg_id
    text = told.msg.content["text"]
    assert "3 output messages" in text and "never arrived" in text and "missing" in text
    relay.remote_message(reply_to(execute, "execute_reply", status="ok"))
    (later,) = relay.output_lost(1, parent=execute.header)  # no cell runs: the asker's output
    assert isinstance(later, Publish) and later.msg.parent_header["msg_id"] == execute.msg_id
    assert "1 output message from" in later.msg.content["text"]
    assert relay.output_lost(2, parent={}) == []  # nobody to tell: logged


@pytest.mark.parametrize(
    ("complete", "says"),
    [(False, "may be missing"), (None, "could not check what the outage cost")],
)
def test_outage_over_says_what_may_be_missing(complete: bool | None, says: str) -> None:
    relay = connected_relay()
    relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="train()"))
    relay.remote_disconnected()
    relay.outage_notice(6.0)
    relay.remote_connected()
    (notice,) = relay.outage_over(7.0, complete)
    assert isinstance(notice, Publish) and says in notice.msg.content["text"]


def test_server_restarting_the_kernel_fails_waiting_cells() -> None:
    relay = connected_relay("continue")  # the carry-on mode; "exit" (default) below
    execute = request("execute_request", code="crash()")
    relay.frontend_message("shell", NOTEBOOK, execute)
    restarting = Message.build(
        "iopub", make_header("status", "server"), {}, {}, {"execution_state": "restarting"}
    )
    out = relay.remote_message(restarting)
    assert isinstance(out[0], Publish)  # frontends see the restart too
    reply = next(a for a in out if isinstance(a, SendToFrontend))
    assert reply.msg.content["ename"] == "RemoteKernelLost"
    assert "variables are lost" in reply.msg.content["evalue"]
    assert isinstance(out[-1], AwaitRestartedKernel)  # the proxy prepares the new process
    # Same kernel id, a new process: the next cell waits until the proxy says it is up (what a
    # restarting kernel is sent, or publishes before the server listens again, can be lost).
    assert relay.state is RemoteState.RESTARTING
    after = request("execute_request", code="1")
    held = relay.frontend_message("shell", NOTEBOOK, after)
    assert not any(isinstance(a, SendToRemote) for a in held)
    notices = [a.msg.content.get("text", "") for a in held if isinstance(a, Publish)]
    assert any("to restart" in text for text in notices)
    assert [a.msg for a in relay.remote_connected() if isinstance(a, SendToRemote)] == [after]
    assert relay.state is RemoteState.CONNECTED


def server_status(state: str) -> Message:
    """The status the server publishes (no parent) when it restarts a kernel or gives it up."""
    return Message.build(
        "iopub", make_header("status", "server"), {}, {}, {"execution_state": state}
    )


@pytest.mark.parametrize("state", ["restarting", "dead"])
def test_a_remote_kernel_that_dies_ends_the_proxy_by_default(state: str) -> None:
    """on_remote_death=exit: the cell shows the error, gets no reply (a dead local kernel sends
    none, and a reply would make nbclient report a failed cell, not a dead kernel), and the
    proxy ends; requests sent meanwhile are refused, never sent to the restarted kernel."""
    relay = connected_relay()
    execute = request("execute_request", code="crash()")
    relay.frontend_message("shell", NOTEBOOK, execute)
    relay.frontend_message("shell", NOTEBOOK, request("complete_request", code="x", cursor_pos=1))
    out = relay.remote_message(server_status(state))
    assert not any(isinstance(a, SendToFrontend) for a in out)
    errors = [a.msg for a in out if isinstance(a, Publish) and a.msg.msg_type == "error"]
    assert [e.parent_id for e in errors] == [execute.msg_id]
    assert errors[0].content["ename"] == "RemoteKernelLost"
    assert "on_remote_death=continue" in errors[0].content["evalue"]
    assert isinstance(out[-1], EndRun) and out[-1].error.ename == "RemoteKernelLost"
    assert relay.state is RemoteState.SHUTTING_DOWN and relay.inflight == []
    later = relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="1"))
    assert not any(isinstance(a, (SendToRemote, EndRun)) for a in later)
    assert relay.remote_message(server_status("restarting"))[1:] == []  # ends once


def test_a_remote_kernel_deleted_or_gone_ends_the_proxy_by_default() -> None:
    relay = connected_relay()
    relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="train()"))
    theirs = request("shutdown_request", "control", restart=False)
    out = relay.remote_message(reply_to(theirs, "shutdown_reply", "iopub", restart=False))
    assert isinstance(out[-1], EndRun) and "another client" in str(out[-1].error)
    relay = connected_relay()  # a reconnection finds the kernel gone
    relay.remote_disconnected()
    out = relay.remote_failed(RemoteKernelGoneError("The server no longer knows it."))
    assert isinstance(out[-1], EndRun)


def test_a_kernel_lost_before_it_ever_ran_is_a_failed_start_not_a_death() -> None:
    """No remote kernel was ever connected: the proxy stays (the next cell tries again), so a
    remote that cannot start does not make the frontend restart the proxy in a loop."""
    relay = Relay("proxy")
    relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="1"))
    out = relay.remote_failed(RemoteKernelGoneError("The server no longer knows it."))
    assert not any(isinstance(a, EndRun) for a in out)
    assert relay.state is RemoteState.FAILED


def test_a_connection_lost_while_the_kernel_restarts_is_reconnected() -> None:
    relay = connected_relay("continue")  # the carry-on mode; "exit" (default) below
    restarting = Message.build(
        "iopub", make_header("status", "server"), {}, {}, {"execution_state": "restarting"}
    )
    relay.remote_message(restarting)
    relay.remote_disconnected()
    assert relay.state is RemoteState.RECONNECTING  # not stuck waiting for a restart forever


def test_lost_replies_are_failed_on_request() -> None:
    relay = connected_relay()
    execute = request("execute_request", code="1")
    relay.frontend_message("shell", NOTEBOOK, execute)
    (cell,) = relay.unanswered_cells()
    out = relay.fail_requests([cell], RemoteKernelGoneError("lost"))
    assert any(isinstance(a, SendToFrontend) for a in out)
    assert relay.unanswered_cells() == []
    assert relay.fail_requests([cell], RemoteKernelGoneError("lost")) == []  # only once


def test_kernel_shut_down_by_someone_else() -> None:
    from cgpu_kernel.core.actions import CloseRemote

    relay = connected_relay("continue")  # the carry-on mode; "exit" (default) below
    execute = request("execute_request", code="import time; time.sleep(100)")
    relay.frontend_message("shell", NOTEBOOK, execute)
    theirs = request("shutdown_request", "control", restart=False)
    out = relay.remote_message(reply_to(theirs, "shutdown_reply", "iopub", restart=False))
    assert isinstance(out[0], Publish)
    assert isinstance(out[-1], CloseRemote)
    reply = next(a for a in out if isinstance(a, SendToFrontend))
    assert "shut down by another client" in reply.msg.content["evalue"]
    assert relay.state is RemoteState.FAILED


def test_comm_messages_are_not_held_waiting_for_a_reply() -> None:
    relay = connected_relay()
    comm = Message.build(
        "shell", make_header("comm_msg", "frontend"), {}, {}, {"comm_id": "c", "data": {}},
        [b"\0" * 1_000_000],
    )  # fmt: skip
    (send,) = relay.frontend_message("shell", NOTEBOOK, comm)
    assert isinstance(send, SendToRemote)
    assert relay.inflight == []  # no reply will come: nothing kept, buffers included
    assert relay.remote_failed(RemoteUnreachableError("down")) == []  # and no bogus reply


def test_something_known_missing_is_told_even_to_cells_not_told_of_the_outage() -> None:
    """A short outage (no outage notice yet) that the journal says lost output: said anyway;
    one it could not check: not said to a cell never told of it (no noise for a hiccup)."""
    relay = connected_relay()
    relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="train()"))
    relay.remote_disconnected()
    relay.remote_connected()
    assert relay.outage_over(0.0, None) == []
    (notice,) = relay.outage_over(0.0, False)
    assert isinstance(notice, Publish) and "may be missing" in notice.msg.content["text"]


def test_a_cell_whose_idle_was_lost_is_ended_with_a_notice() -> None:
    relay = connected_relay()
    execute = request("execute_request", code="x = 1")
    relay.frontend_message("shell", NOTEBOOK, execute)
    other = request("execute_request", code="y = 2")
    relay.frontend_message("shell", NOTEBOOK, other)
    assert [r.msg for r in relay.open_cells()] == [execute, other]
    relay.remote_message(reply_to(execute, "execute_reply", status="ok"))
    idle = reply_to(other, "status", channel="iopub", execution_state="idle")
    relay.remote_message(reply_to(other, "execute_reply", status="ok"))
    relay.remote_message(idle)
    assert [r.msg for r in relay.open_cells()] == [execute]  # its idle never came
    actions = relay.end_cells_without_idle(relay.open_cells())
    assert kinds(actions) == ["publish:stream", "publish:status"]
    assert "final status was lost" in actions[0].msg.content["text"]
    assert actions[1].msg.parent_header["msg_id"] == execute.msg_id
    assert relay.open_cells() == []
    assert relay.end_cells_without_idle([]) == []


def test_a_cell_still_without_its_reply_is_not_ended_as_idle() -> None:
    relay = connected_relay()
    execute = request("execute_request", code="train()")
    relay.frontend_message("shell", NOTEBOOK, execute)
    assert relay.end_cells_without_idle(relay.open_cells()) == []
    failed = relay.fail_requests(relay.unanswered_cells(), RemoteUnreachableError("lost"))
    assert "publish:status" in kinds(failed)
    assert relay.open_cells() == []


def test_a_large_message_lost_in_a_cut_is_told_to_the_running_cell_or_its_parent() -> None:
    relay = connected_relay()
    execute = request("execute_request", code="upload()")
    relay.frontend_message("shell", NOTEBOOK, execute)
    gone = LostMessage("iopub", "comm_msg", 24_000_000, execute.header, "c0ffee")
    (notice,) = relay.lost_messages([gone])
    assert isinstance(notice, Publish)
    text = notice.msg.content["text"]
    assert "24.0 MB comm_msg (comm c0ffee)" in text and "--journal-max-bytes" in text
    assert notice.msg.parent_header["msg_id"] == execute.msg_id
    relay.remote_message(reply_to(execute, "execute_reply", status="ok"))
    # No cell runs now: the notice goes to the lost message's own parent.
    comm_msg = request("comm_msg", comm_id="c0ffee", data={})
    later = LostMessage("iopub", "comm_msg", 30_000_000, comm_msg.header, "c0ffee")
    (notice,) = relay.lost_messages([later])
    assert isinstance(notice, Publish) and notice.msg.parent_header["msg_id"] == comm_msg.msg_id
    assert relay.lost_messages([LostMessage("iopub", "display_data", 1, {}, None)]) == []


def test_output_recovered_late_is_said_to_be_late() -> None:
    relay = connected_relay()
    execute = request("execute_request", code="train()")
    relay.frontend_message("shell", NOTEBOOK, execute)
    line = reply_to(execute, "stream", channel="iopub", name="stdout", text="1\n")
    assert not relay.has_seen(line.msg_id)
    relay.remote_message(line)
    assert relay.has_seen(line.msg_id)
    (notice,) = relay.late_output(12, complete=True, parent={})
    assert isinstance(notice, Publish)
    assert "12 output messages it had not delivered" in notice.msg.content["text"]
    assert "out of order" in notice.msg.content["text"]
    relay.remote_message(reply_to(execute, "execute_reply", status="ok"))
    (notice,) = relay.late_output(1, complete=False, parent=execute.header)
    assert isinstance(notice, Publish) and "may still be missing" in notice.msg.content["text"]
    assert notice.msg.parent_header["msg_id"] == execute.msg_id


# --- two frontends reusing one msg_id (issue 20, item 10) -----------------------------------


def same_id(msg: Message, channel: str = "shell", **content: Any) -> Message:
    """Another frontend's request that happens to carry ``msg``'s ``msg_id``."""
    header = dict(make_header(msg.msg_type, "other-frontend"), msg_id=msg.msg_id)
    return Message.build(channel, header, {}, {}, content)


def test_two_frontends_reusing_one_msg_id_both_get_their_reply() -> None:
    relay = connected_relay()
    first = request("execute_request", code="1")
    second = same_id(first, code="2")
    relay.frontend_message("shell", NOTEBOOK, first)
    relay.frontend_message("shell", CONSOLE, second)
    assert len(relay.inflight) == 2  # the second did not take the first one's place
    # the remote answers in the order it was sent: the first reply is the notebook's
    out = relay.remote_message(reply_to(first, "execute_reply", status="ok", n=1))
    assert isinstance(out[0], SendToFrontend) and out[0].identities == NOTEBOOK
    out = relay.remote_message(reply_to(second, "execute_reply", status="ok", n=2))
    assert isinstance(out[0], SendToFrontend) and out[0].identities == CONSOLE
    assert out[0].msg.content["n"] == 2
    assert relay.inflight == []


def test_a_shared_msg_id_on_control_and_shell_is_routed_by_channel() -> None:
    relay = connected_relay()
    on_shell = request("execute_request", code="1")
    on_control = same_id(on_shell, "control")
    on_control = Message.build(
        "control", dict(on_control.header, msg_type="debug_request"), {}, {}, {}
    )
    relay.frontend_message("shell", NOTEBOOK, on_shell)
    relay.frontend_message("control", CONSOLE, on_control)
    out = relay.remote_message(reply_to(on_control, "debug_reply", "control"))
    assert isinstance(out[0], SendToFrontend)
    assert (out[0].channel, out[0].identities) == ("control", CONSOLE)
    assert [r.msg for r in relay.inflight] == [on_shell]


def test_a_failed_send_forgets_only_that_frontends_request() -> None:
    relay = connected_relay()
    first = request("execute_request", code="1")
    second = same_id(first, code="2")
    relay.frontend_message("shell", NOTEBOOK, first)
    (send,) = relay.frontend_message("shell", CONSOLE, second)
    assert isinstance(send, SendToRemote)
    relay.send_failed(send.request, connection_alive=False)
    assert [r.identities for r in relay.inflight] == [NOTEBOOK]
    assert [r.identities for r in relay.queued] == [CONSOLE]


@pytest.mark.parametrize(
    ("health", "says"),
    [
        (None, "not known yet"),
        ("unreachable", "The server does not answer"),
        ("alive", "The server says the kernel is still running"),
    ],
)
def test_outage_notice_says_only_what_the_server_answered(health: str | None, says: str) -> None:
    """A killed server takes its kernel with it: "keeps running" is said only when the server
    said the kernel is alive (issue 20, item 10)."""
    relay = connected_relay()
    relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="train()"))
    relay.remote_disconnected()
    (notice,) = relay.outage_notice(6.0, health)
    text = notice.msg.content["text"]
    assert says in text and "keeps running" not in text


def test_an_announcement_goes_to_running_cells_else_the_last_cell() -> None:
    """``announce`` (Colab's coming keep-alive stop): no cell sent yet, the log only; a running
    cell gets it; with none running, the last cell sent (frontends that show late output)."""
    relay = connected_relay()
    assert relay.announce("soon") == []
    first = request("execute_request", code="1")
    relay.frontend_message("shell", NOTEBOOK, first)
    (running,) = relay.announce("soon")
    assert isinstance(running, Publish) and running.msg.parent_header == first.header
    assert running.msg.content == {"name": "stderr", "text": "soon\n"}
    relay.remote_message(reply_to(first, "execute_reply", status="ok"))
    second = request("execute_request", code="2")
    relay.frontend_message("shell", CONSOLE, second)
    relay.remote_message(reply_to(second, "execute_reply", status="ok"))
    relay.frontend_message("shell", NOTEBOOK, request("complete_request", code="x"))
    (late,) = relay.announce("soon")
    assert isinstance(late, Publish) and late.msg.parent_header == second.header


def test_startup_progress_goes_to_waiting_cells_only_while_starting() -> None:
    """The relay's side of the progress notices (no sockets): only while a kernel is being
    started, only to cells waiting for it."""
    relay = Relay("proxy", remote_description="the gateway's kernel")
    relay.start()
    assert relay.startup_progress(10, 60) == []  # nobody waiting yet
    header = make_header("execute_request", "frontend")
    cell = Message.build("shell", header, {}, {}, {"code": "1", "silent": False})
    relay.frontend_message("shell", (b"notebook",), cell)
    (notice,) = relay.startup_progress(10.4, 60)
    assert isinstance(notice, Publish)
    assert notice.msg.parent_header["msg_id"] == cell.msg_id
    assert notice.msg.content["text"] == (
        "cgpu-kernel: still starting the gateway's kernel: 10 s so far (waiting up to 60 s)...\n"
    )
    relay.remote_connected()
    assert relay.startup_progress(20, 60) == []  # up: nothing more to say


# --- %cgpu cells (core.files) ----------------------------------------------------------------


def test_a_cgpu_cell_is_answered_by_the_proxy_and_later_cells_wait_for_it() -> None:
    from cgpu_kernel.core.actions import RunFiles

    relay = connected_relay()
    magic = request("execute_request", code="%cgpu upload data.csv\nprint(open('data.csv'))")
    out = relay.frontend_message("shell", NOTEBOOK, magic)
    assert kinds(out) == ["publish:status", "RunFiles"]
    run = out[1]
    assert isinstance(run, RunFiles) and run.command.args == ("data.csv",)
    after = request("execute_request", code="1")
    assert relay.frontend_message("shell", NOTEBOOK, after) == []  # held: the file is not there yet
    done = relay.files_finished(run.request, run.command.rest, None)
    # the rest of the cell goes to the remote under the cell's own msg_id, then the held cell
    assert kinds(done) == ["SendToRemote", "SendToRemote"]
    assert isinstance(done[0], SendToRemote) and isinstance(done[1], SendToRemote)
    assert done[0].msg.msg_id == magic.msg_id
    assert done[0].msg.content["code"] == "print(open('data.csv'))"
    assert done[1].msg.msg_id == after.msg_id


def test_a_cgpu_cell_alone_gets_its_reply_and_a_failed_one_an_error() -> None:
    from cgpu_kernel.core.actions import RunFiles
    from cgpu_kernel.exceptions import LocalPathError

    relay = connected_relay()
    out = relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="%cgpu ls"))
    run = out[1]
    assert isinstance(run, RunFiles)
    done = relay.files_finished(run.request, "", None)
    assert kinds(done) == ["shell:execute_reply", "publish:status"]
    assert isinstance(done[0], SendToFrontend) and done[0].msg.content["status"] == "ok"

    out = relay.frontend_message(
        "shell", NOTEBOOK, request("execute_request", code="%cgpu upload x\nprint(1)")
    )
    run = out[1]
    assert isinstance(run, RunFiles)
    failed = relay.files_finished(run.request, run.command.rest, LocalPathError("x is missing"))
    assert kinds(failed) == ["publish:error", "shell:execute_reply", "publish:status"]
    assert isinstance(failed[1], SendToFrontend)
    assert failed[1].msg.content["ename"] == "CgpuLocalPathError"


def test_a_failed_cgpu_cell_aborts_the_cells_behind_it_as_ipykernel_does() -> None:
    """After "Run All" a failed ``%cgpu upload`` must not let the cells that read the file run
    without it: each waiting cell gets ipykernel's abort (busy, an ``aborted`` reply, idle),
    and none reaches the remote. A cell that asked ``stop_on_error: false`` lets them run."""
    from cgpu_kernel.core.actions import RunFiles
    from cgpu_kernel.exceptions import LocalPathError

    relay = connected_relay()
    out = relay.frontend_message(
        "shell", NOTEBOOK, request("execute_request", code="%cgpu upload x")
    )
    run = out[1]
    assert isinstance(run, RunFiles)
    behind = [request("execute_request", code=f"print({n})") for n in range(2)]
    for cell in behind:
        assert relay.frontend_message("shell", NOTEBOOK, cell) == []
    done = relay.files_finished(run.request, "", LocalPathError("x is missing"))
    assert not any(isinstance(a, SendToRemote) for a in done)
    replies = [a.msg for a in done if isinstance(a, SendToFrontend)]
    assert [r.content["status"] for r in replies] == ["error", "aborted", "aborted"]
    assert [r.parent_header["msg_id"] for r in replies[1:]] == [c.msg_id for c in behind]
    assert all(r.metadata["status"] == "aborted" for r in replies[1:])
    assert kinds(done)[-6:] == ["publish:status", "shell:execute_reply", "publish:status"] * 2
    # the next cell, sent after the failure, runs
    later = relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="1"))
    assert any(isinstance(a, SendToRemote) for a in later)

    relay = connected_relay()
    magic = request("execute_request", code="%cgpu upload x", stop_on_error=False)
    run = relay.frontend_message("shell", NOTEBOOK, magic)[1]
    assert isinstance(run, RunFiles)
    relay.frontend_message("shell", NOTEBOOK, behind[0])
    done = relay.files_finished(run.request, "", LocalPathError("x is missing"))
    sent = [a.msg.msg_id for a in done if isinstance(a, SendToRemote)]
    assert sent == [behind[0].msg_id]


def test_an_interrupt_during_a_transfer_alone_stops_only_the_transfer() -> None:
    """The remote kernel is idle while a ``%cgpu`` transfer runs: the interrupt cancels the
    transfer and is answered at once. A REST interrupt sent as well could reach the kernel
    late, under load, and stop the user's next cell (CI saw ``print('after')`` print nothing).
    With a remote cell running too, that cell is interrupted as before."""
    from cgpu_kernel.core.actions import CancelFiles

    relay = connected_relay()
    relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="%cgpu download x"))
    interrupt = request("interrupt_request", "control")
    out = relay.frontend_message("control", NOTEBOOK, interrupt)
    assert kinds(out) == [
        "publish:status",
        "CancelFiles",
        "control:interrupt_reply",
        "publish:status",
    ]
    assert not any(isinstance(a, InterruptRemote) for a in relay.signal_interrupt())
    assert any(isinstance(a, CancelFiles) for a in relay.signal_interrupt())

    relay = connected_relay()
    running = request("execute_request", code="import time; time.sleep(60)")
    relay.frontend_message("shell", NOTEBOOK, running)
    relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="%cgpu ls"))
    out = relay.frontend_message("control", NOTEBOOK, interrupt)
    assert kinds(out) == ["publish:status", "CancelFiles", "InterruptRemote"]
    assert isinstance(relay.signal_interrupt()[-1], InterruptRemote)


def test_a_bad_cgpu_line_is_an_error_reply_that_never_reaches_the_remote() -> None:
    relay = connected_relay()
    out = relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="%cgpu nope"))
    assert "SendToRemote" not in kinds(out) and "publish:error" in kinds(out)
    # %cgpux is not the magic: it goes to the remote as it is
    out = relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="%cgpux"))
    assert kinds(out) == ["SendToRemote"]


def test_a_failed_upload_on_start_fails_the_first_cell_and_aborts_the_rest() -> None:
    from cgpu_kernel.exceptions import LocalPathError

    relay = connected_relay()
    assert relay.files_on_start() == []
    first = request("execute_request", code="1")
    assert relay.frontend_message("shell", NOTEBOOK, first) == []
    behind = request("execute_request", code="open('inputs.csv')")  # "Run All"
    assert relay.frontend_message("shell", NOTEBOOK, behind) == []
    out = relay.files_finished(None, "", LocalPathError("inputs.csv is missing"))
    assert kinds(out) == [
        "publish:status",
        "publish:error",
        "shell:execute_reply",
        "publish:status",
        # the cell behind the failed one is aborted, as ipykernel aborts its queue
        "publish:status",
        "shell:execute_reply",
        "publish:status",
    ]
    replies = [a.msg for a in out if isinstance(a, SendToFrontend)]
    assert [r.parent_header["msg_id"] for r in replies] == [first.msg_id, behind.msg_id]
    assert [r.content["status"] for r in replies] == ["error", "aborted"]
    assert kinds(
        relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="2"))
    ) == ["SendToRemote"]


def test_a_first_cell_notice_goes_to_the_running_cell_or_the_next_one_once() -> None:
    relay = connected_relay()
    assert relay.first_cell_notice("cgpu-kernel: options not applied") == []
    first = request("execute_request", code="1")
    out = relay.frontend_message("shell", NOTEBOOK, first)
    assert not any(isinstance(a, Publish) for a in out)  # not before the cell's busy
    busy = Message.build(
        "iopub", make_header("status", "kernel"), first.header, {}, {"execution_state": "busy"}
    )
    (status,) = relay.remote_message(busy)  # busy and execute_input first (the spec's order)
    assert isinstance(status, Publish) and status.msg.msg_type == "status"
    echo = Message.build(
        "iopub", make_header("execute_input", "kernel"), first.header, {}, {"code": "1"}
    )
    echoed, notice = relay.remote_message(echo)
    assert isinstance(echoed, Publish) and echoed.msg.msg_type == "execute_input"
    assert isinstance(notice, Publish)
    assert notice.msg.parent_id == first.msg_id and "not applied" in notice.msg.content["text"]
    out = relay.frontend_message("shell", NOTEBOOK, request("execute_request", code="2"))
    assert not any(isinstance(a, Publish) for a in out)  # once
    (told,) = relay.first_cell_notice("late")  # a cell runs: told there at once
    assert isinstance(told, Publish) and told.msg.parent_id == first.msg_id


# --- large messages (issue 19) -----------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        {"code": "x" * 100_000, "execution_count": 7},
        # the count's own text inside the code, at its end: escaped, so not taken for it
        {"code": "y" * 100_000 + ', "execution_count": 99}', "execution_count": 7},
        {"execution_count": 7, "code": "z" * 100_000},  # not at the end: parsed
        {"code": "w" * 100_000, "execution_count": 7.0},  # not an int: parsed, and ignored
        {"code": "small", "execution_count": 7},
    ],
)
def test_execute_input_count_is_read_without_parsing_a_large_code(content: dict[str, Any]) -> None:
    from cgpu_kernel.core.relay import _execution_count

    msg = Message.build("iopub", make_header("execute_input", "s"), {}, {}, content)
    msg._content = None  # as it came from the wire: not parsed yet
    expected = content["execution_count"] if type(content["execution_count"]) is int else None
    assert _execution_count(msg) == expected
    at_end = list(content)[-1] == "execution_count" and expected is not None
    assert (msg._content is None) == (at_end and len(msg.parts[3]) >= 65536)


def test_a_magic_cell_is_found_as_before_without_copying_the_cell() -> None:
    import itertools

    from cgpu_kernel.core.files import MAGIC, is_magic_cell

    def before(code: str) -> bool:  # the definition it replaces (lstrip, split, strip)
        first = code.lstrip().split("\n", 1)[0].strip()
        return first == MAGIC or first.startswith(MAGIC + " ")

    alphabet = [MAGIC, " ", "\t", "\n", "\r", "\x0b", "x", "%cg", "pu", "\u2003"]
    for n in range(1, 5):
        for cell in map("".join, itertools.product(alphabet, repeat=n)):
            assert is_magic_cell(cell) == before(cell), repr(cell)
    assert is_magic_cell(MAGIC + " upload a b\n" + "x" * 1_000_000)
    assert not is_magic_cell("x" * 1_000_000 + "\n" + MAGIC)
    assert not is_magic_cell(None)
