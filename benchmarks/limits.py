"""Output-limit benchmark: memory while a flood passes, and the message rate during a burst.

    python -m benchmarks.limits [--gigabytes 1.0] [--json PATH]

Through the proxy kernel (local backend: a private jupyter-server with its own IOPub rate limit
off) it measures: the proxy's peak RSS while ``--gigabytes`` of stdout pass through one cell
(all but the 2 MB budget going to the spool), the throughput of that cell, and for a burst of
20 000 ``print(i, flush=True)`` the messages the kernel sent vs the messages the frontend got
(coalescing), with the text byte-exact.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.conftest import install_spec, run_cell, start_kernel
from tests.test_output_limits import FLOOD, PeakMemory, streams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gigabytes", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        os.environ["JUPYTER_PATH"] = str(root / "jupyter")
        os.environ["CGPU_STATE_DIR"] = str(root / "state")
        os.environ["CGPU_SPOOL_DIR"] = str(root / "spool")
        km, kc = start_kernel(install_spec(root / "jupyter", "bench-limits", "local"))
        try:
            pid = km.provisioner.pid  # type: ignore[union-attr]
            run_cell(kc, "1")
            blocks = int(args.gigabytes * 1024)
            with PeakMemory(pid) as memory:
                started = time.monotonic()
                run_cell(kc, FLOOD.format(blocks=blocks), timeout=3600)
                elapsed = time.monotonic() - started
            spooled = sum(p.stat().st_size for p in (root / "spool").glob("*/*"))
            results["flood"] = {
                "megabytes": blocks,
                "seconds": round(elapsed, 2),
                "throughput_mb_s": round(blocks / elapsed, 1),
                "proxy_peak_rss_mb": round(memory.peak / 2**20, 1),
                "spooled_mb": round(spooled / 2**20, 1),
            }
            burst = 20_000
            started = time.monotonic()
            _, outputs = run_cell(kc, f"for i in range({burst}):\n    print(i, flush=True)\n")
            elapsed = time.monotonic() - started
            chunks = streams(outputs)
            results["burst"] = {
                "messages_sent_by_kernel": burst,
                "messages_seen_by_frontend": len(chunks),
                "seconds": round(elapsed, 2),
                "frontend_messages_per_s": round(len(chunks) / elapsed, 1),
                "byte_exact": "".join(chunks) == "".join(f"{i}\n" for i in range(burst)),
            }
        finally:
            kc.stop_channels()
            km.shutdown_kernel()
    flood, burst_result = results["flood"], results["burst"]
    print(
        f"flood: {flood['megabytes']} MB in {flood['seconds']} s"
        f" ({flood['throughput_mb_s']} MB/s), proxy peak RSS {flood['proxy_peak_rss_mb']} MB,"
        f" spooled {flood['spooled_mb']} MB"
    )
    print(
        f"burst: kernel sent {burst_result['messages_sent_by_kernel']} messages, frontend got"
        f" {burst_result['messages_seen_by_frontend']}"
        f" ({burst_result['frontend_messages_per_s']}/s), byte-exact: {burst_result['byte_exact']}"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
