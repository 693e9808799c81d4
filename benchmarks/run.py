"""``python -m benchmarks``: every path to a kernel, measured side by side in one run.

Paths (each with its own ipykernel):

* ``zmq``: jupyter_client-style ZMQ straight to an ipykernel -- the floor.
* ``ws``, ``ws_quickack``: a direct WebSocket client (tornado) to the remote jupyter-server,
  without and with ``TCP_QUICKACK`` after each read (one connection, the option toggled).
* ``ws_websockets``: the same with the ``websockets`` library (and ``TCP_QUICKACK``).
* ``gateway``, ``gateway_quickack``: jupyter_server's gateway mode in front of the remote, driven
  by the same WebSocket client.
* ``proxy_jupyter``, ``proxy_local``: our proxy kernel (jupyter and local backends), driven over
  ZMQ exactly like the floor.
* ``proxy_baseline``: with ``--baseline DIR``, the jupyter-backend proxy imported from another
  checkout (``git worktree add DIR HEAD``): a change measured against its base in one run.
* ``relay_minimal``: the yardstick, ``benchmarks/minimal_relay.py``: the least a relay of the
  proxy's shape can do (check and make signatures, move bytes, nothing parsed), on the proxy's
  own WebSocket transport. Not a kernel for use; it shows what the goals leave for any proxy.

Metrics: trivial execute round trip (median, p99; interleaved rounds so every path sees the same
machine load), stream throughput, a binary comm buffer echoed both ways (byte-identical check,
peak RSS of whatever sits in the middle), start to ``kernel_info_reply``, import time, RSS idle and
under load. Prints a table with ratios to the floor and to gateway mode, writes JSON
(``benchmarks/results/`` by default), ``--compare OLD.json`` shows what got worse.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil
import zmq
import zmq.asyncio

from . import servers
from .clients import Msg, TornadoWsClient, WebsocketsWsClient, ZmqClient
from .suites import SUITES, compare_suites, run_suites, suite_goals

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

ALL_PATHS = (
    "zmq",
    "ws",
    "ws_quickack",
    "ws_websockets",
    "gateway",
    "gateway_quickack",
    "proxy_jupyter",
    "proxy_local",
    "proxy_baseline",
    "relay_minimal",
)
#: Paths measured only when asked for (``--baseline DIR``).
ON_REQUEST = ("proxy_baseline",)
PROXY_PATHS = ("proxy_jupyter", "proxy_local", "proxy_baseline")
#: Paths that share a connection with another, differing only in TCP_QUICKACK on the client.
TWINS = {"ws_quickack": "ws", "gateway_quickack": "gateway"}
DIRECT_WS = ("ws", "ws_quickack", "ws_websockets")

#: metric -> (unit, True when higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "rtt_x_floor": ("x", False),
    "gateway_x_faster": ("x", True),
    "stream_x_direct_ws": ("x", True),
    "rtt_median_ms": ("ms", False),
    "rtt_p99_ms": ("ms", False),
    "rtt_cpu_ms": ("ms", False),
    "stream_mbps": ("MB/s", True),
    "stream_cpu_ms_per_mib": ("ms", False),
    "buffer_mbps": ("MB/s", True),
    "buffer_peak_rss_mb": ("MB", False),
    "start_s": ("s", False),
    "ready_s": ("s", False),
    "rss_idle_mb": ("MB", False),
    "rss_load_mb": ("MB", False),
    "rss_after_buffer_mb": ("MB", False),
    "import_ms": ("ms", False),
}

ECHO_TARGET = "cgpu_bench_echo"
SETUP_CODE = f"""
import comm as _comm

def _cgpu_bench_echo(c, open_msg):
    def _on_msg(msg):
        c.send({{"echoed": len(msg["buffers"])}}, buffers=msg["buffers"])
    c.on_msg(_on_msg)

_comm.get_comm_manager().register_target({ECHO_TARGET!r}, _cgpu_bench_echo)
"""
STREAM_CODE = """
import sys as _sys
_block = ("x" * 1023 + "\\n") * 1024
for _ in range({count}):
    _sys.stdout.write(_block)
    _sys.stdout.flush()
"""
MB = 1_000_000
MIB = 1 << 20
#: Cells each path runs before :func:`measure_rtt` times any (the WAN suite counts them too).
WARM_UP_CELLS = 3


@dataclass
class Settings:
    rtt_runs: int = 300
    rtt_round: int = 25
    stream_mib: int = 50
    stream_rounds: int = 3  # each path's stream, in rounds of all paths in random order
    buffer_mb: int = 100
    import_runs: int = 5
    paths: tuple[str, ...] = ALL_PATHS
    timeout: float = 60.0
    profile: Path | None = None  # py-spy the processes in the middle during the measurements
    buffer_timeout: float = 10.0
    parallel_setup: bool = False
    baseline: Path | None = None  # a checkout whose proxy is measured as proxy_baseline


QUICK = Settings(
    rtt_runs=10,
    rtt_round=10,
    stream_mib=2,
    stream_rounds=1,
    buffer_mb=2,
    import_runs=1,
    buffer_timeout=4.0,
    parallel_setup=True,
)


@dataclass
class Path_:
    """One way of reaching a kernel, with what was measured on it."""

    name: str
    client: Any = None
    pid: int | None = None  # the process in the middle (proxy or gateway-mode server)
    results: dict[str, Any] = field(default_factory=dict)
    rtts: list[float] = field(default_factory=list)
    cpu: float = 0.0  # CPU seconds the process in the middle spent on the round trips
    closers: list[Any] = field(default_factory=list)


class Failed(Exception):
    pass


# --- helpers ---------------------------------------------------------------------------------


async def recv(client: Any, deadline: float) -> Msg:
    remaining = deadline - time.perf_counter()
    if remaining <= 0:
        raise Failed("timed out")
    try:
        return await asyncio.wait_for(client.recv(), remaining)
    except asyncio.TimeoutError:
        raise Failed("timed out") from None


async def execute(client: Any, code: str, timeout: float = 60.0) -> tuple[Msg, int]:
    """Run ``code``; the execute_reply and the number of stdout characters, once idle."""
    msg_id = client.send(
        "shell",
        "execute_request",
        {
            "code": code,
            "silent": False,
            "store_history": False,
            "user_expressions": {},
            "allow_stdin": False,
            "stop_on_error": True,
        },
    )
    deadline = time.perf_counter() + timeout
    reply: Msg | None = None
    idle = False
    stdout = 0
    while reply is None or not idle:
        msg = await recv(client, deadline)
        if msg.parent_id != msg_id:
            continue
        if msg.msg_type == "execute_reply":
            reply = msg
        elif msg.msg_type == "status" and msg.content.get("execution_state") == "idle":
            idle = True
        elif msg.msg_type == "stream" and msg.content.get("name") == "stdout":
            stdout += len(msg.content.get("text", ""))
    if reply.content.get("status") != "ok":
        raise Failed(f"cell failed: {reply.content.get('evalue')}")
    return reply, stdout


async def kernel_info(client: Any, timeout: float) -> Msg:
    """The ``kernel_info_reply``, once iopub also carried output of the request.

    A ZMQ SUB socket misses what is published before its subscription reached the publisher:
    a cell run right after the reply could lose its ``idle`` and hang the run. So the request is
    sent again until its iopub status arrives, as ``jupyter_client``'s ``wait_for_ready`` does.
    """
    deadline = time.perf_counter() + timeout
    while True:
        msg_id = client.send("shell", "kernel_info_request", {})
        reply: Msg | None = None
        iopub = False
        ask_again = deadline
        while reply is None or not iopub:
            try:
                msg = await recv(client, min(deadline, ask_again))
            except Failed:
                if time.perf_counter() >= deadline:
                    raise
                break  # the reply came, its iopub status did not: ask again
            if msg.parent_id != msg_id:
                continue
            if msg.msg_type == "kernel_info_reply":
                reply = msg
                ask_again = time.perf_counter() + 0.5
            elif msg.channel == "iopub":
                iopub = True
        if reply is not None and iopub:
            return reply


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def cpu_seconds(pid: int | None) -> float:
    if pid is None:
        return 0.0
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def rss_mb(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / MB


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's high-water mark of ``pid``'s RSS (Linux ``clear_refs`` 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb(pid: int) -> float | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 / MB if match else None


class RssSampler:
    """Samples a process's RSS every few milliseconds in a thread; ``peak`` is the max seen."""

    def __init__(self, pid: int | None, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self.pid is None:
            return
        process = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, process.memory_info().rss / MB)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --- setting paths up ------------------------------------------------------------------------


async def setup_zmq(path: Path_, settings: Settings) -> None:
    from jupyter_client.manager import AsyncKernelManager

    km = AsyncKernelManager(kernel_name="python3")
    started = time.perf_counter()
    await km.start_kernel()
    client = ZmqClient(dict(km.get_connection_info()))
    await client.start()
    path.closers += [client.close, lambda: km.shutdown_kernel(now=True)]
    await kernel_info(client, settings.timeout)
    path.results["start_s"] = time.perf_counter() - started
    path.client = client


async def setup_ws(path: Path_, server: servers.Server, settings: Settings, kind: str) -> None:
    started = time.perf_counter()
    kernel_id = await server.start_kernel()
    if kind == "websockets":
        client: Any = await WebsocketsWsClient.connect(server.url, server.token, kernel_id)
    else:
        client = await TornadoWsClient.connect(server.url, server.token, kernel_id)
    path.closers.append(client.close)
    await kernel_info(client, settings.timeout)
    path.results["start_s"] = time.perf_counter() - started
    path.results["subprotocol"] = client.subprotocol or "legacy"
    path.client = client


async def hb_ready(info: dict[str, Any], timeout: float) -> None:
    """Wait for the heartbeat echo: the proxy process is up and has bound its sockets."""
    context = zmq.asyncio.Context()
    try:
        deadline = time.perf_counter() + timeout
        while time.perf_counter() < deadline:
            sock = context.socket(zmq.REQ)
            sock.linger = 0
            sock.connect(f"tcp://127.0.0.1:{info['hb_port']}")
            await sock.send(b"ping")
            if await sock.poll(100):
                await sock.recv()
                sock.close()
                return
            sock.close()
        raise Failed("no heartbeat")
    finally:
        context.destroy(linger=0)


async def setup_proxy(
    path: Path_,
    workdir: Path,
    backend: str,
    remote: servers.Server | None,
    settings: Settings,
    source: Path | None = None,
    module: str = "cgpu_kernel",
) -> None:
    proxy = servers.start_proxy(workdir, path.name, backend, remote, source, module)
    path.closers.append(proxy.stop)
    path.pid = proxy.pid
    path.results["log"] = str(proxy.log_path)
    client = ZmqClient(proxy.info)
    await client.start()
    path.closers.insert(0, client.close)
    info_task = asyncio.ensure_future(kernel_info(client, settings.timeout))
    try:
        await hb_ready(proxy.info, settings.timeout)
        path.results["ready_s"] = time.perf_counter() - proxy.started
        await info_task
    except Failed as exc:
        info_task.cancel()
        tail = proxy.log_path.read_text(errors="replace")[-3000:]
        raise Failed(f"{path.name} did not answer kernel_info ({exc}); its log:\n{tail}") from None
    path.results["start_s"] = time.perf_counter() - proxy.started
    path.client = client


# --- measurements ----------------------------------------------------------------------------


async def measure_rtt(paths: list[Path_], settings: Settings) -> None:
    """Trivial execute round trips, in interleaved rounds across every path."""
    for path in paths:
        for _ in range(WARM_UP_CELLS):
            await execute(path.client, "pass", settings.timeout)
    done = 0
    while done < settings.rtt_runs:
        batch = min(settings.rtt_round, settings.rtt_runs - done)
        for path in random.sample(paths, len(paths)):
            if hasattr(path.client, "quickack"):
                path.client.quickack = path.name.endswith(("quickack", "websockets"))
            cpu_before = cpu_seconds(path.pid)
            for _ in range(batch):
                started = time.perf_counter()
                await execute(path.client, "pass", settings.timeout)
                path.rtts.append((time.perf_counter() - started) * 1000)
            path.cpu += cpu_seconds(path.pid) - cpu_before
        done += batch
    for path in paths:
        if path.pid is not None:
            path.results["rtt_cpu_ms"] = path.cpu * 1000 / len(path.rtts)
        path.results["rtt_median_ms"] = statistics.median(path.rtts)
        path.results["rtt_p99_ms"] = percentile(path.rtts, 0.99)
        path.results["rtt_runs"] = len(path.rtts)


async def measure_streams(paths: dict[str, Path_], settings: Settings, log: Any) -> None:
    """Each path's stream, ``stream_rounds`` times, in rounds of every path in a random order
    (a stream takes a fraction of a second: one path after the other, a burst of load on the
    shared machine would land on one of them); the median of each path's rounds."""
    runs: dict[str, list[tuple[float, bool, float | None, float | None]]] = {n: [] for n in paths}
    for round_index in range(settings.stream_rounds):
        order = list(paths.items())
        random.shuffle(order)
        for name, path in order:
            log(f"stream {settings.stream_mib} MiB: {name} (round {round_index + 1})")
            if hasattr(path.client, "quickack"):
                path.client.quickack = name.endswith(("quickack", "websockets"))
            profiling = settings.profile if round_index == 0 else None
            profilers = start_profilers({name: path}, profiling, "stream")
            runs[name].append(await measure_stream(path, settings))
            stop_profilers(profilers)
    for name, path in paths.items():
        mbps = [run[0] for run in runs[name]]
        cpu = [run[2] for run in runs[name] if run[2] is not None]
        peaks = [run[3] for run in runs[name] if run[3] is not None]
        path.results["stream_bytes_ok"] = all(run[1] for run in runs[name])
        path.results["stream_mbps"] = statistics.median(mbps)
        path.results["stream_mbps_runs"] = [round(value, 1) for value in mbps]
        if cpu:
            path.results["stream_cpu_ms_per_mib"] = statistics.median(cpu)
        if peaks:
            path.results["rss_load_mb"] = max(peaks)


async def measure_stream(
    path: Path_, settings: Settings
) -> tuple[float, bool, float | None, float | None]:
    """One stream: (MB/s, every byte arrived, CPU ms per MiB in the middle, its peak RSS)."""
    count = settings.stream_mib
    expected = count * MIB
    cpu_before = cpu_seconds(path.pid)
    with RssSampler(path.pid) as sampler:
        started = time.perf_counter()
        _, received = await execute(
            path.client, STREAM_CODE.format(count=count), settings.timeout + count
        )
        elapsed = time.perf_counter() - started
    cpu = None
    if path.pid is not None and received:
        cpu = (cpu_seconds(path.pid) - cpu_before) * 1000 / (received / MIB)
    peak = sampler.peak if path.pid is not None else None
    return received / MB / elapsed, received == expected, cpu, peak


async def measure_buffer(path: Path_, settings: Settings) -> None:
    size = settings.buffer_mb * MB
    client = path.client
    comm_id = uuid.uuid4().hex
    client.send("shell", "comm_open", {"comm_id": comm_id, "target_name": ECHO_TARGET, "data": {}})
    payload = random.randbytes(size)
    timeout = settings.buffer_timeout + size / (10 * MB)
    peak_reset = path.pid is not None and reset_peak_rss(path.pid)
    with RssSampler(path.pid) as sampler:
        started = time.perf_counter()
        client.send("shell", "comm_msg", {"comm_id": comm_id, "data": {}}, buffers=[payload])
        deadline = started + timeout
        echoed: Msg | None = None
        try:
            while echoed is None:
                msg = await recv(client, deadline)
                if msg.msg_type == "comm_msg" and msg.content.get("comm_id") == comm_id:
                    echoed = msg
        except (Failed, ConnectionError) as exc:
            path.results["buffer_ok"] = False
            path.results["buffer_error"] = f"no echo within {timeout:.0f} s ({exc})"
        elapsed = time.perf_counter() - started
    if echoed is not None:
        same = len(echoed.buffers) == 1 and bytes(echoed.buffers[0]) == payload
        path.results["buffer_ok"] = same
        if same:
            path.results["buffer_mbps"] = 2 * size / MB / elapsed
        else:
            path.results["buffer_error"] = "the echoed buffer differs from what was sent"
    if path.pid is not None:
        peak = peak_rss_mb(path.pid) if peak_reset else None
        path.results["buffer_peak_rss_mb"] = max(peak or 0.0, sampler.peak)
    client.send("shell", "comm_close", {"comm_id": comm_id, "data": {}})
    if path.pid is not None:
        # What stays after the buffer went through: a proxy should give it all back.
        await execute(client, "pass", settings.timeout)
        await asyncio.sleep(0.2)
        path.results["rss_after_buffer_mb"] = rss_mb(path.pid)


def measure_import(runs: int) -> dict[str, float]:
    """``python -X importtime -c "import cgpu_kernel.proxy.app"``: the cumulative import time."""
    best = float("inf")
    wall = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import cgpu_kernel.proxy.app"],
            capture_output=True,
            text=True,
            check=True,
            cwd=ROOT,
        )
        wall = min(wall, time.perf_counter() - started)
        for line in done.stderr.splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) == 3 and parts[2] == "cgpu_kernel.proxy.app":
                best = min(best, int(parts[1]) / 1000)
    return {"import_ms": best, "import_wall_ms": wall * 1000}


def start_profilers(
    paths: dict[str, Path_], folder: Path | None, phase: str
) -> list[subprocess.Popen[bytes]]:
    """``py-spy record`` on each process in the middle (``--profile DIR``)."""
    if folder is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).parent / "py-spy"
    started = []
    for name, path in paths.items():
        if path.pid is None or name in TWINS:
            continue
        out = folder / f"{name}-{phase}.txt"
        started.append(
            subprocess.Popen(
                [
                    str(spy),
                    "record",
                    "--pid",
                    str(path.pid),
                    "-f",
                    "raw",
                    "-r",
                    "1000",
                    "--gil",
                    "-o",
                    str(out),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    time.sleep(0.5 if started else 0)
    return started


def stop_profilers(profilers: list[subprocess.Popen[bytes]]) -> None:
    for process in profilers:
        process.send_signal(2)
    for process in profilers:
        process.wait(30)


# --- the run ---------------------------------------------------------------------------------


async def tear_down(path: Path_, log: Any) -> None:
    """Run a path's closers in order (clients first), each bounded, logging what fails; called
    once a run is over, by :func:`run` and by the suites that set paths up with these helpers."""
    for closer in path.closers:
        try:
            if asyncio.iscoroutinefunction(closer):
                await asyncio.wait_for(closer(), 15)
            else:
                result = await asyncio.to_thread(closer)
                if asyncio.iscoroutine(result):
                    await asyncio.wait_for(result, 15)
        except Exception as exc:
            log(f"teardown of {path.name}: {exc}")


async def run(settings: Settings, workdir: Path, log: Any) -> dict[str, Any]:
    wanted = set(settings.paths)
    if settings.baseline is None:
        wanted.discard("proxy_baseline")
    for twin, base in TWINS.items():
        if twin in wanted:
            wanted.add(base)
    paths = {name: Path_(name) for name in ALL_PATHS if name in wanted}
    remote = gateway = None
    started_servers: list[servers.Server] = []
    try:
        needs_remote = wanted & {
            "ws",
            "ws_websockets",
            "gateway",
            "proxy_jupyter",
            "proxy_baseline",
            "relay_minimal",
        }
        if needs_remote:
            remote = servers.start_server(workdir, "remote")
            started_servers.append(remote)
        if "gateway" in wanted and remote is not None:  # asks the remote nothing until used
            gateway = servers.start_gateway_mode(workdir, remote)
            started_servers.append(gateway)
        await asyncio.gather(*(asyncio.to_thread(s.wait_up) for s in started_servers))
        log(f"servers up: {', '.join(s.url for s in started_servers) or 'none'}")

        async def set_up(name: str, path: Path_) -> None:
            if name == "zmq":
                await setup_zmq(path, settings)
            elif name in ("ws", "ws_websockets"):
                assert remote is not None
                kind = "websockets" if name == "ws_websockets" else "tornado"
                await setup_ws(path, remote, settings, kind)
            elif name == "gateway":
                assert gateway is not None
                await setup_ws(path, gateway, settings, "tornado")
                path.pid = gateway.process.pid
            elif name == "proxy_jupyter":
                await setup_proxy(path, workdir, "jupyter", remote, settings)
            elif name == "proxy_local":
                await setup_proxy(path, workdir, "local", None, settings)
            elif name == "proxy_baseline":
                await setup_proxy(
                    path, workdir, "jupyter", remote, settings, source=settings.baseline
                )
            elif name == "relay_minimal":
                await setup_proxy(
                    path, workdir, "jupyter", remote, settings, module="benchmarks.minimal_relay"
                )
            await execute(path.client, SETUP_CODE, settings.timeout)
            log(f"{name}: ready in {path.results['start_s']:.2f} s")

        todo = [(name, path) for name, path in paths.items() if name not in TWINS]
        if settings.parallel_setup:  # quick: start-up times inflate each other, but it is quick
            await asyncio.gather(*(set_up(name, path) for name, path in todo))
        else:  # one path at a time, so start-up times are not inflated by each other
            for name, path in todo:
                await set_up(name, path)
        for twin, base in TWINS.items():
            if twin in paths:
                paths[twin].client = paths[base].client
                paths[twin].pid = paths[base].pid

        for path in paths.values():
            if path.pid is not None:
                path.results["rss_idle_mb"] = rss_mb(path.pid)

        profilers = start_profilers(paths, settings.profile, "rtt")
        log("round trips...")
        await measure_rtt(list(paths.values()), settings)
        stop_profilers(profilers)
        await measure_streams(paths, settings, log)
        for name, path in paths.items():
            if name in TWINS:
                continue
            log(f"buffer {settings.buffer_mb} MB both ways: {name}")
            if hasattr(path.client, "quickack"):
                path.client.quickack = name.endswith(("quickack", "websockets"))
            await measure_buffer(path, settings)
            if not path.results.get("buffer_ok"):
                log(f"  {name}: {path.results.get('buffer_error')}")
        for twin, base in TWINS.items():
            if twin in paths:
                for key in ("buffer_ok", "buffer_error", "buffer_mbps", "buffer_peak_rss_mb"):
                    if key in paths[base].results:
                        paths[twin].results[key] = paths[base].results[key]
                for key in ("start_s", "subprotocol", "rss_idle_mb"):
                    if key in paths[base].results:
                        paths[twin].results[key] = paths[base].results[key]
    finally:
        stopping = time.perf_counter()
        await asyncio.gather(*(tear_down(path, log) for path in paths.values()))
        log(f"paths closed in {time.perf_counter() - stopping:.1f} s")
        for server in reversed(started_servers):  # gateway mode first: it talks to the remote
            await asyncio.to_thread(server.stop)
        log(f"servers stopped in {time.perf_counter() - stopping:.1f} s")

    results = {name: path.results for name, path in paths.items()}
    if any(name in paths for name in PROXY_PATHS):
        imports = measure_import(settings.import_runs)
        for name in PROXY_PATHS:
            if name in results:
                results[name].update(imports)
    return results


# --- reporting -------------------------------------------------------------------------------


def ratios(results: dict[str, dict[str, Any]]) -> None:
    """Add ratios to the floor and to gateway mode, in place."""
    floor = results.get("zmq", {}).get("rtt_median_ms")
    gateway = results.get("gateway", {}).get("rtt_median_ms")
    direct = [results[n]["stream_mbps"] for n in DIRECT_WS if "stream_mbps" in results.get(n, {})]
    for values in results.values():
        rtt = values.get("rtt_median_ms")
        if rtt:
            if floor:
                values["rtt_x_floor"] = rtt / floor
            if gateway:
                values["gateway_x_faster"] = gateway / rtt
        if direct and "stream_mbps" in values:
            values["stream_x_direct_ws"] = values["stream_mbps"] / max(direct)


def goals(results: dict[str, dict[str, Any]], settings: Settings) -> list[dict[str, Any]]:
    """The issue's goals, met or not, for each proxy path measured."""
    out: list[dict[str, Any]] = []

    def goal(path: str, name: str, value: Any, target: str, met: bool | None) -> None:
        out.append({"path": path, "goal": name, "value": value, "target": target, "met": met})

    yardstick_cpu = (results.get("relay_minimal") or {}).get("stream_cpu_ms_per_mib")
    for name in PROXY_PATHS:
        r = results.get(name)
        if not r:
            continue
        cpu = r.get("stream_cpu_ms_per_mib")
        if cpu is not None and yardstick_cpu:
            # Issue 19, goal 4: the proxy's CPU per streamed MiB against the yardstick relay's,
            # the same stream measured side by side in the same rounds.
            ratio = cpu / yardstick_cpu
            goal(
                name, "CPU per streamed MiB vs yardstick", round(ratio, 2), "<= 1.2x", ratio <= 1.2
            )
        if "rtt_x_floor" in r:
            # Retired by issue 19 (no relay of this shape meets it on two shared cores): shown
            # for the record, judged neither way.
            goal(name, "round trip vs floor (retired)", round(r["rtt_x_floor"], 2), "-", None)
        if "gateway_x_faster" in r:
            goal(
                name,
                "round trip vs gateway",
                round(r["gateway_x_faster"], 2),
                ">= 5x faster",
                r["gateway_x_faster"] >= 5,
            )
        if "stream_x_direct_ws" in r:
            goal(
                name,
                "stream vs direct WebSocket (retired)",
                round(r["stream_x_direct_ws"], 2),
                "-",
                None,
            )
        if "buffer_ok" in r:
            peak = r.get("buffer_peak_rss_mb")
            limit = 3 * settings.buffer_mb
            goal(
                name,
                f"{settings.buffer_mb} MB buffer both ways, byte-identical",
                r["buffer_ok"],
                "identical",
                bool(r["buffer_ok"]),
            )
            if peak is not None:
                goal(
                    name,
                    "peak RSS during the buffer",
                    round(peak, 1),
                    f"< {limit} MB",
                    peak < limit,
                )
        if "start_s" in r:
            goal(
                name,
                "start to kernel_info_reply",
                round(r["start_s"], 2),
                "< 1 s",
                r["start_s"] < 1,
            )
        if "rss_idle_mb" in r:
            goal(name, "idle RSS", round(r["rss_idle_mb"], 1), "< 60 MB", r["rss_idle_mb"] < 60)
    return out


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = [
    ("path", None, 0),
    ("rtt med ms", "rtt_median_ms", 2),
    ("rtt p99 ms", "rtt_p99_ms", 2),
    ("x floor", "rtt_x_floor", 2),
    ("cpu ms/rt", "rtt_cpu_ms", 2),
    ("x faster than gw", "gateway_x_faster", 1),
    ("stream MB/s", "stream_mbps", 1),
    ("x direct ws", "stream_x_direct_ws", 2),
    ("cpu ms/MiB", "stream_cpu_ms_per_mib", 1),
    ("buffer ok", "buffer_ok", 0),
    ("buffer MB/s", "buffer_mbps", 1),
    ("peak RSS MB", "buffer_peak_rss_mb", 0),
    ("start s", "start_s", 2),
    ("RSS idle MB", "rss_idle_mb", 1),
    ("RSS load MB", "rss_load_mb", 1),
    ("RSS after buf MB", "rss_after_buffer_mb", 0),
]


def table(results: dict[str, dict[str, Any]], markdown: bool = False) -> str:
    rows = [[title for title, _, _ in COLUMNS]]
    for name, values in results.items():
        row = [name]
        for _, key, digits in COLUMNS[1:]:
            assert key is not None  # only the first column, the path's name, has none
            row.append(fmt(values.get(key), digits))
        rows.append(row)
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def compare(old: dict[str, Any], new: dict[str, Any], threshold: float) -> tuple[str, int]:
    """Lines comparing two runs, and how many metrics got worse by more than ``threshold``."""
    lines = [f"{'path':<18} {'metric':<20} {'old':>10} {'new':>10} {'change':>8}"]
    worse = 0
    for name, values in new["paths"].items():
        before = old.get("paths", {}).get(name, {})
        for metric, (_unit, higher_better) in METRICS.items():
            a, b = before.get(metric), values.get(metric)
            if not isinstance(a, int | float) or not isinstance(b, int | float) or not a:
                continue
            change = (b - a) / a
            regressed = -change > threshold if higher_better else change > threshold
            worse += regressed
            flag = "  REGRESSION" if regressed else ""
            lines.append(f"{name:<18} {metric:<20} {a:>10.2f} {b:>10.2f} {change:>+8.0%}{flag}")
        for check in ("buffer_ok", "stream_bytes_ok"):
            if before.get(check) is True and values.get(check) is False:
                worse += 1
                lines.append(f"{name:<18} {check:<20} {'yes':>10} {'NO':>10}  REGRESSION")
    return "\n".join(lines), worse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Measure every path to a kernel side by side: ZMQ floor, direct WebSocket,"
        " jupyter_server gateway mode, and the cgpu-kernel proxy (jupyter and local backends).",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and few runs (a smoke test, not a measurement)",
    )
    parser.add_argument("--runs", type=int, help="round trips per path (default 300)")
    parser.add_argument("--stream-mib", type=int, help="MiB a cell prints (default 50)")
    parser.add_argument(
        "--stream-rounds", type=int, help="streams per path, interleaved (default 3)"
    )
    parser.add_argument("--buffer-mb", type=int, help="comm buffer size in MB (default 100)")
    parser.add_argument(
        "--paths",
        help=f"comma-separated subset of: {', '.join(ALL_PATHS)} (default: all)",
    )
    parser.add_argument("--out", type=Path, help="JSON output (default benchmarks/results/)")
    parser.add_argument(
        "--compare",
        type=Path,
        metavar="OLD.json",
        help="compare with an earlier run; exit 1 when something got worse",
    )
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.25,
        help="relative change that counts as a regression (default 0.25)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="py-spy the proxies and gateway while measuring (raw stacks in DIR)",
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help="also measure the proxy from another checkout (say, a git worktree of HEAD) as"
        " proxy_baseline",
    )
    parser.add_argument(
        "--suites",
        help=f"comma-separated suites to run after the paths, of: {', '.join(SUITES) or 'none yet'}"
        " ('none' for none; default: all, or none with --quick)",
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = QUICK if args.quick else Settings()
    settings = Settings(
        rtt_runs=args.runs or base.rtt_runs,
        rtt_round=base.rtt_round,
        stream_mib=args.stream_mib or base.stream_mib,
        stream_rounds=args.stream_rounds or base.stream_rounds,
        buffer_mb=args.buffer_mb or base.buffer_mb,
        import_runs=base.import_runs,
        buffer_timeout=base.buffer_timeout,
        parallel_setup=base.parallel_setup,
        paths=tuple(args.paths.split(",")) if args.paths else ALL_PATHS,
        profile=args.profile,
        baseline=args.baseline.resolve() if args.baseline else None,
    )
    if args.suites is None:
        suite_names = [] if args.quick else list(SUITES)
    else:
        suite_names = [n for n in args.suites.split(",") if n and n != "none"]
    unknown_suites = set(suite_names) - set(SUITES)
    if unknown_suites:
        print(f"unknown suites: {', '.join(sorted(unknown_suites))}", file=sys.stderr)
        return 2
    if settings.baseline is not None and "proxy_baseline" not in settings.paths:
        settings.paths = (*settings.paths, "proxy_baseline")
    unknown = set(settings.paths) - set(ALL_PATHS)
    if unknown:
        print(f"unknown paths: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cgpu-bench-") as folder:
        os.environ.pop("CGPU_TOKEN", None)
        results = asyncio.run(run(settings, Path(folder), log))
        for values in results.values():
            values.pop("log", None)
    ratios(results)
    suite_reports = run_suites(suite_names, quick=args.quick, log=log)
    report: dict[str, Any] = {
        "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_avg": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "settings": {
            "quick": args.quick,
            "rtt_runs": settings.rtt_runs,
            "stream_mib": settings.stream_mib,
            "stream_rounds": settings.stream_rounds,
            "buffer_mb": settings.buffer_mb,
        },
        "seconds": round(time.perf_counter() - began, 1),
        "paths": results,
        "suites": suite_reports,
        "goals": goals(results, settings) + suite_goals(suite_reports),
    }
    out = args.out or RESULTS / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    print(table(results, markdown=args.markdown))
    print()
    for g in report["goals"]:
        mark = "-" if g["met"] is None else "met" if g["met"] else "NOT met"
        print(f"{g['path']:<14} {g['goal']:<44} {fmt(g['value'], 2):>8} {g['target']:<14} {mark}")
    for name, suite_report in suite_reports.items():
        if "failed" in suite_report:
            print(f"\nsuite {name} FAILED: {suite_report['failed']}")
    print(f"\n{report['seconds']} s; JSON written to {out}")
    if args.compare:
        old = json.loads(args.compare.read_text())
        text, worse = compare(old, report, args.threshold)
        suite_lines, suite_worse = compare_suites(old, report, args.threshold)
        text, worse = "\n".join([text, *suite_lines]), worse + suite_worse
        print(f"\ncompared with {args.compare}:\n{text}")
        if worse:
            print(f"\n{worse} metric(s) worse by more than {args.threshold:.0%}")
            return 1
    return 1 if any("failed" in r for r in suite_reports.values()) else 0
