"""Reconnection benchmark: outages injected while a cell prints numbered lines.

    python -m benchmarks.reconnect [--rounds 8] [--journal on off] [--json PATH]

For each fault kind (a graceful cut, an RST reset, a blackhole of 2 s that outlasts the
liveness timeout, a short blackhole TCP rides out) it runs one cell printing numbered lines
through the proxy kernel and a :class:`tests.faults.FaultyPath`, injects ``--rounds`` faults at
random moments, and reports: seconds from the path being restored to the next line reaching
the frontend (median and worst), lines lost, lines duplicated, lines out of order. Goal: 0 lost,
0 duplicated, resumed within 1 s. Each fault runs with the remote kernel's output journal on and
off, side by side: a stock jupyter-server keeps no acknowledgements, so without the journal the
lines it wrote into a socket at the instant of a cut or reset are lost; this shows how many,
and that the journal brings them back.

The stall scenarios (``stall``: the server SIGSTOPped for ``--stop`` s mid-cell, then SIGCONTed;
``stall-end``: the same, the cell ending while the server is stopped) run on a server of their
own (its IOPub rate limiter off, see docs/reconnection.md) under a cell printing ~500 lines/s of
4 kB each; ``stall-short`` stops it for ``--short-stop`` s (1.5) under 1000 lines/s of 8 kB and a
30 s ping interval, too short for the proxy to see an outage or a silent cell. They report
lines lost and duplicated, whether the cell hung (no ``idle`` within 60 s of the end), whether
a notice said "nothing was lost" while lines were missing ("false ok"), and whether lines went
missing with no notice saying so ("silent").

    python -m benchmarks.reconnect --inflight [--rounds 5] [--journal on off]

Requests in flight at a reset instead (``measure_inflight``, the rounds of
``tests.test_inflight``): an ``execute_request`` (a cell that increments a counter in the
kernel) and an ``input()`` answer, each written and then reset, held in the path so it dies
there ("held") or reset 0-2 ms after the write ("raced"). Reports per case: ran once, clear
errors, hung, lost, duplicated (ran twice), the slowest reply, journal on and off side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import signal
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.conftest import (
    install_spec,
    install_spec_via,
    run_cell,
    start_jupyter_server,
    start_kernel,
)
from tests.faults import FaultyPath
from tests.test_inflight import inflight_rounds

FAULTS = ("cut", "reset", "blackhole-2s", "blackhole-0.3s")
STALLS = ("stall", "stall-end", "stall-short")


def measure(
    kind: str, journal: bool, rounds: int, kernel_dir: Path, server: Any, seed: int
) -> dict[str, Any]:
    port = server.port
    lines = 400 + 250 * rounds
    with FaultyPath(port) as path:
        name = install_spec(
            kernel_dir,
            f"bench-{kind}-{'journal' if journal else 'nojournal'}",
            "jupyter",
            url=path.url,
            token_file=server.token_file,
            extra=[
                "--ping-interval=0.5",
                "--outage-notice-after=0",
                f"--output-journal={journal}",
            ],
        )
        km, kc = start_kernel(name)
        try:
            run_cell(kc, "1")
            msg_id = kc.execute(
                f"import time\nfor i in range({lines}):\n    print(i, flush=True)\n"
                "    time.sleep(0.004)\n"
            )
            restored: list[float] = []
            rng = random.Random(seed)

            def inject() -> None:
                for _ in range(rounds):
                    time.sleep(rng.uniform(0.2, 0.5))
                    if kind == "cut":
                        path.cut()
                    elif kind == "reset":
                        path.reset()
                    else:
                        path.blackhole()
                        time.sleep(2.0 if kind == "blackhole-2s" else 0.3)
                        path.restore()
                    restored.append(time.monotonic())

            injector = threading.Thread(target=inject, daemon=True)
            injector.start()
            arrivals: list[tuple[float, int]] = []
            while True:
                msg = kc.get_iopub_msg(timeout=120)
                if msg["parent_header"].get("msg_id") != msg_id:
                    continue
                now = time.monotonic()
                if msg["msg_type"] == "stream" and msg["content"]["name"] == "stdout":
                    arrivals.extend((now, int(x)) for x in msg["content"]["text"].split())
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    break
            injector.join()
        finally:
            kc.stop_channels()
            km.shutdown_kernel()
    seen = [n for _, n in arrivals]
    resumed = []
    for moment in restored:
        after = [t for t, _ in arrivals if t >= moment]
        if after:
            resumed.append(after[0] - moment)
    return {
        "fault": kind,
        "journal": journal,
        "rounds": rounds,
        "lines": lines,
        "lost": len(set(range(lines)) - set(seen)),
        "duplicated": len(seen) - len(set(seen)),
        "out_of_order": sum(1 for a, b in itertools.pairwise(seen) if b < a),
        "resume_median_s": statistics.median(resumed) if resumed else None,
        "resume_max_s": max(resumed) if resumed else None,
        "reconnections": path.connections_seen,
    }


def measure_stall(
    kind: str, journal: bool, stop: float, kernel_dir: Path, server: Any
) -> dict[str, Any]:
    """One cell under one SIGSTOP/SIGCONT of ``server`` (see the module's docstring)."""
    from tests.test_stall import STALL_OPTIONS, collect, freeze, numbered_cell

    # stall: 3 s of lines before the stop, 5 s after it; stall-end: the cell ends half-way in;
    # stall-short: 2 s before, 3 s after, at 1000 lines/s of 8 kB (so that a short stop drops
    # lines), pings too rare to notice the stop
    lines = {"stall": int(500 * (stop + 8)), "stall-end": int(500 * (2 + stop / 2))}.get(
        kind, int(1000 * (stop + 5))
    )
    cell = (
        numbered_cell(lines, per_second=1000, pad=8000)
        if kind == "stall-short"
        else numbered_cell(lines)
    )
    options = [*STALL_OPTIONS, f"--output-journal={journal}"]
    if kind == "stall-short":
        options = [o for o in options if not o.startswith("--ping-interval")]
        options.append("--ping-interval=30")
    name = install_spec(
        kernel_dir,
        f"bench-{kind}-{'journal' if journal else 'nojournal'}",
        "jupyter",
        url=server.url,
        token_file=server.token_file,
        extra=options,
    )
    km, kc = start_kernel(name)
    try:
        run_cell(kc, "1")
        msg_id = kc.execute(cell)
        started = time.monotonic()
        freezer = freeze(server, 3.0 if kind == "stall" else 2.0, stop)
        result = collect(kc, msg_id, started + lines / 500 + stop + 60)
        freezer.join()
        took = time.monotonic() - started
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    seen = result["lines"]
    lost = len(set(range(lines)) - set(seen))
    return {
        "fault": f"{kind}-{stop:g}s",
        "journal": journal,
        "lines": lines,
        "lost": lost,
        "duplicated": len(seen) - len(set(seen)),
        "out_of_order": sum(1 for a, b in itertools.pairwise(seen) if b < a),
        "hung": not result["idle"],
        "errors": [e.get("ename") for e in result["errors"]],
        "false_all_clear": bool(lost) and "nothing was lost" in result["notices"],
        "silent_loss": bool(lost)
        and "may be missing" not in result["notices"]
        and "never arrived" not in result["notices"],
        "notices": result["notices"],
        "cell_s": round(took, 1),
    }


def measure_inflight(
    kind: str, mode: str, journal: bool, rounds: int, kernel_dir: Path, server: Any, seed: int
) -> dict[str, Any]:
    """One in-flight case: a fresh proxy kernel behind a fresh FaultyPath, ``rounds`` rounds."""
    with FaultyPath(server.port) as path:
        name = install_spec_via(
            kernel_dir,
            f"bench-inflight-{kind}-{mode}-{journal}",
            path.url,
            server,
            f"--output-journal={journal}",
            outage_notice_after=0,
        )
        km, kc = start_kernel(name)
        try:
            result = inflight_rounds(km, kc, path, kind, rounds, mode=mode, seed=seed)
        finally:
            path.delay(0.0)
            kc.stop_channels()
            km.shutdown_kernel()
    return {"journal": journal, **result}


def print_inflight(results: list[dict[str, Any]]) -> None:
    print(
        f"{'in flight':<10}{'mode':>7}{'journal':>8}{'rounds':>7}{'ran 1x':>7}{'errors':>7}"
        f"{'hung':>5}{'lost':>5}{'dup':>5}{'slowest':>9}"
    )
    for r in results:
        slowest = f"{r['worst_s']:.2f}s" if r["worst_s"] is not None else "-"
        print(
            f"{r['kind']:<10}{r['mode']:>7}{'on' if r['journal'] else 'off':>8}{r['rounds']:>7}"
            f"{r['ok']:>7}{r['errors']:>7}{r['hung']:>5}{r['lost']:>5}{r['duplicated']:>5}"
            f"{slowest:>9}"
        )
    for message in sorted({m for r in results for m in r["messages"]}):
        print(f"  error seen: {message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument(
        "--faults", nargs="*", default=[*FAULTS, *STALLS], choices=[*FAULTS, *STALLS]
    )
    parser.add_argument("--stop", type=float, default=10.0, help="seconds a stall lasts")
    parser.add_argument(
        "--short-stop", type=float, default=1.5, help="seconds the stall-short stop lasts"
    )
    parser.add_argument("--journal", nargs="*", default=["on", "off"], choices=["on", "off"])
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--inflight",
        action="store_true",
        help="requests in flight at a reset (an execute_request, an input() answer) instead",
    )
    args = parser.parse_args()
    if args.inflight:
        main_inflight(args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        os.environ["JUPYTER_PATH"] = str(root / "jupyter")
        os.environ["CGPU_STATE_DIR"] = str(root / "state")
        server = start_jupyter_server(root / "server")
        try:
            results = [
                measure(kind, journal == "on", args.rounds, root / "jupyter", server, seed)
                for seed, kind in enumerate(args.faults)
                if kind in FAULTS
                for journal in args.journal
            ]
        finally:
            server.stop()
        stalls = [kind for kind in args.faults if kind in STALLS]
        if stalls:
            stalled = start_jupyter_server(
                root / "stalled", "--ZMQChannelsWebsocketConnection.limit_rate=False"
            )
            try:
                results += [
                    measure_stall(
                        kind,
                        journal == "on",
                        args.short_stop if kind == "stall-short" else args.stop,
                        root / "jupyter",
                        stalled,
                    )
                    for kind in stalls
                    for journal in args.journal
                ]
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(stalled.process.pid, signal.SIGCONT)
                stalled.stop()
    print(
        f"{'fault':<16}{'journal':>8}{'lines':>7}{'lost':>6}{'dup':>5}{'order':>7}"
        f"{'resume med':>12}{'max':>8}"
    )
    for r in results:
        if "hung" in r:
            continue
        med = f"{r['resume_median_s']:.3f}" if r["resume_median_s"] is not None else "-"
        worst = f"{r['resume_max_s']:.3f}" if r["resume_max_s"] is not None else "-"
        print(
            f"{r['fault']:<16}{'on' if r['journal'] else 'off':>8}{r['lines']:>7}{r['lost']:>6}"
            f"{r['duplicated']:>5}"
            f"{r['out_of_order']:>7}{med:>12}{worst:>8}"
        )
    stall_rows = [r for r in results if "hung" in r]
    if stall_rows:
        print(
            f"\n{'stall':<16}{'journal':>8}{'lines':>7}{'lost':>6}{'dup':>5}{'order':>7}"
            f"{'hung':>6}{'false ok':>10}{'silent':>8}  errors"
        )
        for r in stall_rows:
            print(
                f"{r['fault']:<16}{'on' if r['journal'] else 'off':>8}{r['lines']:>7}"
                f"{r['lost']:>6}{r['duplicated']:>5}{r['out_of_order']:>7}"
                f"{'yes' if r['hung'] else 'no':>6}{'yes' if r['false_all_clear'] else 'no':>10}"
                f"{'yes' if r['silent_loss'] else 'no':>8}"
                f"  {','.join(r['errors']) or '-'}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def main_inflight(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        os.environ["JUPYTER_PATH"] = str(root / "jupyter")
        os.environ["CGPU_STATE_DIR"] = str(root / "state")
        server = start_jupyter_server(root / "server")
        try:
            results = [
                measure_inflight(
                    kind, mode, journal == "on", args.rounds, root / "jupyter", server, seed
                )
                for seed, (kind, mode) in enumerate(
                    itertools.product(("execute", "input"), ("held", "raced"))
                )
                for journal in args.journal
            ]
        finally:
            server.stop()
    print_inflight(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
