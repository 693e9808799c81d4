"""Publishing on iopub with stream bursts merged (``proxy.publisher.IopubPublisher``).

A fake ``publish`` records what would reach the frontend's iopub socket: no sockets, no server.
"""

from __future__ import annotations

import asyncio

from cgpu_kernel.core.wire import Message, make_header
from cgpu_kernel.proxy.publisher import IopubPublisher


def stream(text: str, parent: str = "cell-1") -> Message:
    header = make_header("stream", "session")
    parent_header = {"msg_id": parent, "msg_type": "execute_request"}
    return Message.build("iopub", header, parent_header, {}, {"name": "stdout", "text": text})


def status(state: str) -> Message:
    header = make_header("status", "session")
    return Message.build("iopub", header, {}, {}, {"execution_state": state})


def texts(sent: list[Message]) -> list[str]:
    return [str(m.content.get("text", m.content.get("execution_state"))) for m in sent]


def test_without_a_window_every_message_goes_at_once() -> None:
    sent: list[Message] = []
    publisher = IopubPublisher(sent.append, window=0)
    for text in ("a", "b", "c"):
        publisher.publish(stream(text))
    assert texts(sent) == ["a", "b", "c"]


def test_a_burst_goes_as_its_first_message_then_one_merged_message() -> None:
    sent: list[Message] = []

    async def main() -> None:
        publisher = IopubPublisher(sent.append, window=0.05)
        for text in ("a\n", "b\n", "c\n", "d\n"):
            publisher.publish(stream(text))
        assert texts(sent) == ["a\n"]  # the leading edge is not delayed
        await asyncio.sleep(0.2)

    asyncio.run(main())
    assert texts(sent) == ["a\n", "b\nc\nd\n"]


def test_a_status_flushes_the_spool_first_and_is_not_held() -> None:
    sent: list[Message] = []
    flushed: list[int] = []

    async def main() -> None:
        publisher = IopubPublisher(
            sent.append, window=10.0, before_status=lambda: flushed.append(len(sent))
        )
        publisher.publish(stream("a"))
        publisher.publish(stream("b"))
        publisher.publish(status("idle"))

    asyncio.run(main())
    assert texts(sent) == ["a", "b", "idle"]  # what was merged goes before the status
    assert flushed == [1]


def test_close_publishes_what_is_held() -> None:
    sent: list[Message] = []

    async def main() -> None:
        publisher = IopubPublisher(sent.append, window=10.0)
        for text in ("a", "b", "c"):
            publisher.publish(stream(text))
        publisher.close()

    asyncio.run(main())
    assert texts(sent) == ["a", "bc"]
