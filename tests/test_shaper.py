"""The WAN suite's path shaper (benchmarks/shaper.py): it delays, keeps every byte in order, and
counts WebSocket messages and turn-arounds right.

Only lower bounds on time are asserted (a round trip through a shaper can never take less than
twice its one-way delay, nor a transfer less than its size over the bandwidth): the machine is
shared, so an upper bound would fail for reasons that are not the shaper's.
"""

from __future__ import annotations

import asyncio
import os
import random
import time

from benchmarks.shaper import Counts, FrameCounter, Link, Shaper, ShaperProcess, _Watch


async def _echo_server() -> tuple[asyncio.Server, int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


def test_a_round_trip_takes_at_least_twice_the_delay() -> None:
    delay = 0.04

    async def go() -> list[float]:
        server, port = await _echo_server()
        shaper = Shaper(port, Link(delay=delay))
        await shaper.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", shaper.port)
        times = []
        for i in range(5):
            started = time.perf_counter()
            writer.write(b"ping %d\n" % i)
            assert await reader.readline() == b"ping %d\n" % i
            times.append(time.perf_counter() - started)
        writer.close()
        await shaper.close()
        server.close()
        return times

    times = asyncio.run(go())
    assert min(times) >= 2 * delay * 0.99, times


def test_bytes_arrive_intact_and_in_order_under_bandwidth_and_jitter() -> None:
    size = 3_000_000
    link = Link(delay=0.005, rate=20e6, jitter=0.004, window=200_000)
    payload = random.Random(1).randbytes(size)

    async def go() -> tuple[bytes, float]:
        server, port = await _echo_server()
        shaper = Shaper(port, link)
        await shaper.start()
        reader, writer = await asyncio.open_connection("127.0.0.1", shaper.port)
        started = time.perf_counter()

        async def send() -> None:  # in odd sizes, while the echo comes back
            view = memoryview(payload)
            while view:
                cut = random.randint(1, 100_000)
                writer.write(view[:cut])
                view = view[cut:]
                await writer.drain()
            writer.write_eof()

        sending = asyncio.ensure_future(send())
        received = await reader.read(-1)  # until the echo server's FIN comes through
        elapsed = time.perf_counter() - started
        await sending
        writer.close()
        await shaper.close()
        server.close()
        return received, elapsed

    received, elapsed = asyncio.run(go())
    assert len(received) == size
    assert received == payload
    # Both ways over the link, one after the other for the last byte at least: each way's bytes
    # take size/rate on the link.
    assert elapsed >= size / link.rate


def test_connections_through_one_shaper_share_its_bandwidth() -> None:
    size, rate = 1_000_000, 10e6

    async def go() -> float:
        server, port = await _echo_server()
        shaper = Shaper(port, Link(rate=rate))
        await shaper.start()

        async def one(seed: int) -> None:
            payload = random.Random(seed).randbytes(size)
            reader, writer = await asyncio.open_connection("127.0.0.1", shaper.port)
            writer.write(payload)
            writer.write_eof()
            assert await reader.read(-1) == payload
            writer.close()

        started = time.perf_counter()
        await asyncio.gather(one(1), one(2))
        elapsed = time.perf_counter() - started
        await shaper.close()
        server.close()
        return elapsed

    # Each direction carried both connections' bytes over one link.
    assert asyncio.run(go()) >= 2 * size / rate


def _frame(payload: bytes, opcode: int = 2, fin: bool = True, mask: bool = True) -> bytes:
    """An RFC 6455 frame (the mask key is random; the counter must not care)."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = bytes([first, (0x80 if mask else 0) | n])
    elif n < 65536:
        head = bytes([first, (0x80 if mask else 0) | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([first, (0x80 if mask else 0) | 127]) + n.to_bytes(8, "big")
    return head + (os.urandom(4) if mask else b"") + payload


def test_frame_counter_counts_messages_not_frames_whatever_the_cuts() -> None:
    stream = b"".join(
        [
            _frame(b"x" * 10, opcode=1),
            _frame(b"", opcode=9),  # ping: not a message
            _frame(b"a" * 70_000, fin=False),  # a fragmented message: one
            _frame(b"b" * 300, opcode=0, fin=False),
            _frame(b"c" * 5, opcode=0),
            _frame(b"y" * 200, opcode=2),
            _frame(b"", opcode=10),  # pong
            _frame(b"\x03\xe8", opcode=8),  # close
        ]
    )
    rng = random.Random(2)
    for _ in range(20):
        seen: list[int] = []
        counter = FrameCounter(lambda seen=seen: seen.append(1))
        view = memoryview(stream)
        while view:  # cut anywhere, headers included
            cut = rng.randint(1, 9) if rng.random() < 0.7 else rng.randint(1, 50_000)
            counter.feed(bytes(view[:cut]))
            view = view[cut:]
        assert len(seen) == 3


def test_turn_arounds_count_the_client_speaking_after_the_server() -> None:
    counts = Counts()
    watch = _Watch(counts)
    watch.observe(True, b"GET /api/kernels/k/channels HTTP/1.1\r\nUpgrade: websocket\r\n\r\n")
    watch.observe(False, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
    for _ in range(3):  # three cells: one request, four answers, a ping and its pong
        watch.observe(True, _frame(b"execute_request"))
        watch.observe(True, _frame(b"", opcode=9))
        for part in (b"busy", b"input", b"reply", b"idle"):
            watch.observe(False, _frame(part, mask=False))
        watch.observe(False, _frame(b"", opcode=10, mask=False))
    watch.observe(True, _frame(b"one") + _frame(b"two"))  # two messages, one turn
    assert (counts.ws_up, counts.ws_down, counts.turns) == (5, 12, 4)

    rest = Counts()
    plain = _Watch(rest)
    plain.observe(True, b"POST /api/kernels HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}")
    plain.observe(False, b"HTTP/1.1 201 Created\r\n\r\n{}")
    plain.observe(True, b"GET /api/kernels HTTP/1.1\r\n\r\n")
    assert (rest.ws_up, rest.turns) == (0, 2)
    assert rest.bytes_up > 0 and rest.bytes_down > 0


def test_the_shaper_process_relays_and_reports() -> None:
    async def go() -> Counts:
        server, port = await _echo_server()
        shaper = await asyncio.to_thread(ShaperProcess, port, Link(delay=0.01))
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", shaper.port)
            started = time.perf_counter()
            writer.write(b"hello\n")
            assert await reader.readline() == b"hello\n"
            assert time.perf_counter() - started >= 0.02 * 0.99
            writer.close()
            await asyncio.to_thread(shaper.set_link, Link(delay=0.0))
            return await asyncio.to_thread(shaper.counts)
        finally:
            await asyncio.to_thread(shaper.stop)
            server.close()

    counts = asyncio.run(go())
    assert counts.connections == 1
    assert counts.bytes_up == counts.bytes_down == 6
    assert counts.turns == 1
