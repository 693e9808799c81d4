"""WAN suite: a cell, a stream and a buffer over a shaped link, proxy against direct and gateway.

    nice python -m benchmarks.wan [--quick] [--suite-json PATH] [--markdown]

Issue 19, goal 1. A user never runs on loopback: between their laptop and the remote kernel
(Colab, a cluster) is a WAN. Three paths to one loopback jupyter-server (the remote), each
through its own :mod:`benchmarks.shaper` process with the same link, so that they differ only
in what they are:

* ``direct``: the benchmarks' tornado WebSocket client with ``TCP_QUICKACK``, straight to the
  remote over the link (the best a client can do: what the goal compares with);
* ``gateway``: jupyter_server's gateway mode on the laptop's side (loopback from the client),
  its own connection to the remote over the link;
* ``proxy``: the proxy kernel (jupyter backend) on the laptop's side, driven over ZMQ as a
  frontend does, its WebSocket (and REST) to the remote over the link;
* ``relay_minimal``, with ``--yardstick``: ``benchmarks/minimal_relay.py`` in the proxy's
  place, the least a relay of the proxy's shape (ZMQ in, WebSocket out) can do: what part of a
  gap to the direct client any such relay pays.

The kernels and connections are set up once; each link setting (25 ms one way at 100 Mbit/s,
80 ms at 20 Mbit/s) is then applied to all three shapers together and measured with the path
table's own measurements (:mod:`benchmarks.run`): trivial cell round trips interleaved across the
paths, a 50 MiB stream in rounds of every path in random order, a 100 MB comm buffer echoed
both ways. Around the round trips each shaper's counts give, per cell, the WebSocket data
messages each way and the turn-arounds over the link: the proxy must not add one.

Goals (``write_report``, for ``python -m benchmarks``): on every metric the proxy within 1.03x
of the direct client (as a ratio of times: a throughput's ratio is inverted), and the ratio to
gateway mode printed (gateway time over the proxy's; met when the proxy is not behind it by
more than the same 3%: where the link is the bottleneck both run at its rate; gateway mode
loses binary buffers, so there it only says whether the proxy carried what gateway mode lost).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from . import servers
from .run import (
    MB,
    SETUP_CODE,
    WARM_UP_CELLS,
    Failed,
    Path_,
    Settings,
    execute,
    fmt,
    measure_buffer,
    measure_rtt,
    measure_streams,
    setup_proxy,
    setup_ws,
    tear_down,
)
from .shaper import Counts, Link, ShaperProcess
from .suites import goal, metric, write_report

#: Link settings measured, by name: the issue's two (ms one way, Mbit/s).
LINKS: dict[str, Link] = {
    "25ms_100mbit": Link.of(25, 100),
    "80ms_20mbit": Link.of(80, 20),
}
PATHS = ("direct", "gateway", "proxy")
YARDSTICK = "relay_minimal"
#: What each path's name stands for in the path table (the client's TCP_QUICKACK follows it).
TABLE_NAMES = {
    "direct": "ws_quickack",
    "gateway": "gateway",
    "proxy": "proxy_jupyter",
    YARDSTICK: YARDSTICK,
}
TARGET = 1.03  # the proxy's times within this of the direct client's

FULL = Settings(
    rtt_runs=100, rtt_round=20, stream_mib=50, stream_rounds=3, buffer_mb=100, timeout=120.0
)
QUICK = Settings(rtt_runs=5, rtt_round=5, stream_mib=1, stream_rounds=1, buffer_mb=1, timeout=60.0)


def link_settings(
    base: Settings, link: Link, buffer_mb: int, slack: float = 10, times: float = 3
) -> Settings:
    """``base`` with a buffer timeout the link allows: ``times`` the echo's time on it (both
    ways, and four one-way delays) and ``slack`` seconds."""
    wire = (2 * buffer_mb * MB / link.rate if link.rate else 0.0) + 4 * link.delay
    return dataclasses.replace(base, buffer_mb=buffer_mb, buffer_timeout=slack + times * wire)


def per_cell(before: Counts, after: Counts, cells: int) -> dict[str, float]:
    """What crossed a shaper per cell, from its counts around ``cells`` round trips."""
    return {
        "turns_per_cell": (after.turns - before.turns) / cells,
        "ws_up_per_cell": (after.ws_up - before.ws_up) / cells,
        "ws_down_per_cell": (after.ws_down - before.ws_down) / cells,
        "connections_during_cells": after.connections - before.connections,
    }


async def measure_link(
    paths: dict[str, Path_],
    shapers: dict[str, ShaperProcess],
    link: Link,
    settings: Settings,
    log: Any,
) -> dict[str, dict[str, Any]]:
    """Every measurement at one link setting, already applied to the shapers by :func:`run`:
    the results by path (the cells' counts from the shapers included)."""
    table = {
        TABLE_NAMES[name]: Path_(TABLE_NAMES[name], p.client, p.pid) for name, p in paths.items()
    }
    by_name = dict(zip(paths, table.values(), strict=True))
    for path in table.values():  # whatever came before is answered: the counts are the cells'
        await execute(path.client, "pass", settings.timeout)
    before = {name: await asyncio.to_thread(s.counts) for name, s in shapers.items()}
    log("round trips...")
    await measure_rtt(list(table.values()), settings)
    after = {name: await asyncio.to_thread(s.counts) for name, s in shapers.items()}
    for name, path in by_name.items():
        cells = WARM_UP_CELLS + settings.rtt_runs
        path.results.update(per_cell(before[name], after[name], cells))
    await measure_streams(table, settings, log)
    order = list(by_name.items())
    random.shuffle(order)
    for name, path in order:
        if hasattr(path.client, "quickack"):
            path.client.quickack = path.name.endswith("quickack")
        if name == "gateway":
            continue  # see probe_gateway_buffer
        log(f"buffer {settings.buffer_mb} MB both ways: {name}")
        await measure_buffer(path, link_settings(settings, link, settings.buffer_mb))
        await execute(path.client, "pass", settings.timeout)  # its comm_close answered
    return {name: path.results for name, path in by_name.items()}


async def probe_gateway_buffer(
    gateway: Path_,
    shapers: dict[str, ShaperProcess],
    links: dict[str, Link],
    settings: Settings,
    out: dict[str, dict[str, dict[str, Any]]],
    log: Any,
) -> None:
    """Gateway mode's buffer, into ``out``: a 1 MB probe, once all else is measured.

    Gateway mode relays binary frames as text and loses them, whatever the link; waiting for a
    lost 100 MB echo at each link would cost its whole timeout, and after the loss its
    connection sometimes stops answering. So a 1 MB probe comes last; only if gateway mode
    carries it is the full buffer measured at each link.
    """
    path = Path_("gateway", gateway.client, gateway.pid)
    last = list(links.values())[-1]
    log("buffer: gateway, a 1 MB probe")
    try:
        await measure_buffer(path, link_settings(settings, last, 1, slack=1, times=2))
        await execute(path.client, "pass", settings.timeout)
    except Failed as exc:
        path.results["buffer_ok"] = False
        path.results["buffer_error"] = (
            f"{path.results.get('buffer_error', 'lost')}; then it stopped answering ({exc})"
        )
    if not path.results.get("buffer_ok") or settings.buffer_mb == 1:
        for results in out.values():
            results["gateway"]["buffer_ok"] = bool(path.results.get("buffer_ok"))
            for key in ("buffer_error", "buffer_mbps"):
                if key in path.results:
                    results["gateway"][key] = path.results[key]
        return
    for link_name, link in links.items():
        for shaper in shapers.values():
            await asyncio.to_thread(shaper.set_link, link)
        path = Path_("gateway", gateway.client, gateway.pid)
        log(f"buffer {settings.buffer_mb} MB both ways: gateway at {link_name}")
        await measure_buffer(path, link_settings(settings, link, settings.buffer_mb))
        out[link_name]["gateway"].update(path.results)


async def run(
    settings: Settings,
    links: dict[str, Link],
    workdir: Path,
    log: Any,
    names: tuple[str, ...] = PATHS,
) -> dict[str, dict[str, dict[str, Any]]]:
    """Set the paths up once, then measure at each link: {link: {path: results}}."""
    first = next(iter(links.values()))
    remote = servers.start_server(workdir, "remote")
    started = [remote]
    shapers: dict[str, ShaperProcess] = {}
    paths = {name: Path_(name) for name in names}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    try:
        port = int(remote.url.rsplit(":", 1)[1].strip("/"))
        made = await asyncio.gather(*(asyncio.to_thread(ShaperProcess, port, first) for _ in names))
        shapers.update(zip(names, made, strict=True))
        shaped = {n: dataclasses.replace(remote, url=s.url) for n, s in shapers.items()}
        gateway = servers.start_gateway_mode(workdir, shaped["gateway"])
        started.append(gateway)
        await asyncio.gather(*(asyncio.to_thread(s.wait_up) for s in started))
        log(f"remote {remote.url}; shapers {', '.join(s.url for s in shapers.values())}")

        async def set_up(name: str, path: Path_) -> None:
            if name == "direct":
                await setup_ws(path, shaped["direct"], settings, "tornado")
            elif name == "gateway":
                await setup_ws(path, gateway, settings, "tornado")
                path.pid = gateway.process.pid
            elif name == "proxy":
                await setup_proxy(path, workdir, "jupyter", shaped["proxy"], settings)
            else:
                await setup_proxy(
                    path,
                    workdir,
                    "jupyter",
                    shaped[name],
                    settings,
                    module="benchmarks.minimal_relay",
                )
            await execute(path.client, SETUP_CODE, settings.timeout)
            log(f"{name}: ready in {path.results['start_s']:.2f} s")

        await asyncio.gather(*(set_up(name, path) for name, path in paths.items()))
        for link_name, link in links.items():
            log(f"link {link_name}: {link}")
            for shaper in shapers.values():
                await asyncio.to_thread(shaper.set_link, link)
            out[link_name] = await measure_link(paths, shapers, link, settings, log)
        await probe_gateway_buffer(paths["gateway"], shapers, links, settings, out, log)
    finally:
        await asyncio.gather(*(tear_down(path, log) for path in paths.values()))
        for server in reversed(started):
            await asyncio.to_thread(server.stop)
        for shaper in shapers.values():
            await asyncio.to_thread(shaper.stop)
    return out


# --- reporting -------------------------------------------------------------------------------


def time_ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    """How many times as long ``a`` takes as ``b`` for ``key`` (a time, or a rate inverted)."""
    x, y = a.get(key), b.get(key)
    if not x or not y:
        return None
    return float(x / y) if key.endswith("_ms") else float(y / x)


MEASURES = (
    ("cell round trip", "rtt_median_ms"),
    ("stream", "stream_mbps"),
    ("buffer both ways", "buffer_mbps"),
)


def report(
    results: dict[str, dict[str, dict[str, Any]]], settings: Settings
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The suite's metrics and goals (``write_report``'s arguments)."""
    metrics: dict[str, Any] = {}
    goals: list[dict[str, Any]] = []
    units = {
        "rtt_median_ms": ("ms", False),
        "rtt_p99_ms": ("ms", False),
        "stream_mbps": ("MB/s", True),
        "buffer_mbps": ("MB/s", True),
        "turns_per_cell": ("", False),
        "ws_up_per_cell": ("", False),
        "ws_down_per_cell": ("", False),
        "connections_during_cells": ("", False),
    }
    sizes = {
        "stream": f"{settings.stream_mib} MiB stream",
        "buffer both ways": f"{settings.buffer_mb} MB buffer both ways",
    }
    for link, paths in results.items():
        for name, values in paths.items():
            for key, (unit, higher) in units.items():
                if isinstance(values.get(key), int | float):
                    metrics[f"{link}.{name}.{key}"] = metric(
                        float(values[key]), unit, higher_better=higher
                    )
        proxy, direct, gateway = paths["proxy"], paths["direct"], paths["gateway"]
        for title, key in MEASURES:
            least = time_ratio(paths.get(YARDSTICK, {}), direct, key)
            if least is not None:
                metrics[f"{link}.yardstick_x_direct.{key}"] = metric(
                    least, "x", higher_better=False
                )
            what = f"{link} {sizes.get(title, title)}"
            ratio = time_ratio(proxy, direct, key)
            if key == "buffer_mbps" and not proxy.get("buffer_ok"):
                goals.append(goal(f"{what}: proxy / direct", "failed", "identical", False))
                continue
            if ratio is not None:
                metrics[f"{link}.proxy_x_direct.{key}"] = metric(ratio, "x", higher_better=False)
                goals.append(
                    goal(
                        f"{what}: proxy / direct", round(ratio, 3), f"<= {TARGET}x", ratio <= TARGET
                    )
                )
            faster = time_ratio(gateway, proxy, key)
            if key == "buffer_mbps" and not gateway.get("buffer_ok"):
                goals.append(
                    goal(
                        f"{what}: gateway mode lost it, the proxy",
                        "carried it",
                        "carried",
                        bool(proxy.get("buffer_ok")),
                    )
                )
            elif faster is not None:
                metrics[f"{link}.gateway_x_proxy.{key}"] = metric(faster, "x", higher_better=True)
                # Ahead by what the link allows: on a link-bound stream both paths run at the
                # link's rate, so "not behind" is within the same tolerance as the direct goal.
                goals.append(
                    goal(
                        f"{what}: gateway / proxy",
                        round(faster, 3),
                        f">= {1 / TARGET:.2f}x",
                        faster >= 1 / TARGET,
                    )
                )
        turns, direct_turns = proxy.get("turns_per_cell"), direct.get("turns_per_cell")
        if turns is not None and direct_turns is not None:
            goals.append(
                goal(
                    f"{link} WAN turn-arounds per cell, proxy",
                    round(turns, 2),
                    f"<= direct ({direct_turns:.2f})",
                    turns <= direct_turns + 1e-9,
                )
            )
    return metrics, goals


COLUMNS = [
    ("rtt med ms", "rtt_median_ms", 1),
    ("rtt p99 ms", "rtt_p99_ms", 1),
    ("stream MB/s", "stream_mbps", 2),
    ("buffer MB/s", "buffer_mbps", 2),
    ("buffer ok", "buffer_ok", 0),
    ("turns/cell", "turns_per_cell", 2),
    ("ws up/cell", "ws_up_per_cell", 2),
    ("ws down/cell", "ws_down_per_cell", 2),
    ("new conns", "connections_during_cells", 0),
]


def table(results: dict[str, dict[str, dict[str, Any]]], markdown: bool = False) -> str:
    """The measurements, a row per link and path, for a person (the suite's stdout)."""
    rows = [["link", "path", *(title for title, _, _ in COLUMNS)]]
    for link, paths in results.items():
        for name, values in paths.items():
            rows.append([link, name, *(fmt(values.get(key), d) for _, key, d in COLUMNS)])
    if markdown:
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows[1:]])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.wan",
        description="A cell, a stream and a buffer over a WAN-shaped link: the proxy against a"
        " direct WebSocket client and jupyter_server's gateway mode.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--suite-json", type=Path, help="write the suite's report here")
    parser.add_argument(
        "--links", help=f"comma-separated subset of: {', '.join(LINKS)} (default: all)"
    )
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="jitter on every link")
    parser.add_argument("--runs", type=int, help="cell round trips per path and link")
    parser.add_argument("--stream-mib", type=int, help="MiB a cell prints")
    parser.add_argument("--buffer-mb", type=int, help="comm buffer size in MB")
    parser.add_argument(
        "--yardstick",
        action="store_true",
        help="also measure benchmarks/minimal_relay.py in the proxy's place (the least a relay"
        " of its shape adds)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="keep the servers' and proxies' folders and logs here"
    )
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    settings = dataclasses.replace(
        base,
        rtt_runs=args.runs or base.rtt_runs,
        stream_mib=args.stream_mib or base.stream_mib,
        buffer_mb=args.buffer_mb or base.buffer_mb,
    )
    wanted = args.links.split(",") if args.links else list(LINKS)
    unknown = set(wanted) - set(LINKS)
    if unknown:
        print(f"unknown links: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    links = {n: dataclasses.replace(LINKS[n], jitter=args.jitter_ms / 1000) for n in wanted}

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] wan: {text}", file=sys.stderr, flush=True)

    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cgpu-wan-") as scratch:
        folder = Path(scratch)
        if args.workdir is not None:
            args.workdir.mkdir(parents=True, exist_ok=True)
            folder = args.workdir.resolve()
        chosen = (*PATHS, YARDSTICK) if args.yardstick else PATHS
        results = asyncio.run(run(settings, links, folder, log, chosen))
    for paths in results.values():
        for values in paths.values():
            values.pop("log", None)
    metrics, goals = report(results, settings)
    print(table(results, markdown=args.markdown))
    print()
    for g in goals:
        mark = "met" if g["met"] else "NOT met"
        print(f"{g['goal']:<58} {fmt(g['value'], 3):>10} {g['target']:<16} {mark}")
    for key, entry in metrics.items():
        if ".yardstick_x_direct." in key:
            print(f"{key:<58} {entry['value']:>10.3f} (the least a relay of the proxy's shape)")
    print(f"\n{time.perf_counter() - began:.0f} s")
    if args.suite_json:
        write_report(args.suite_json, metrics, goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
