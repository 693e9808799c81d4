"""The transport benchmark runs end to end at a tiny size and counts every byte it was sent.

No timing thresholds (the machine is shared). ``picows`` is measured only where installed; the
``websockets`` client, the proxy's, always is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_transport_benchmark_measures_the_proxys_client(tmp_path: Path) -> None:
    out = tmp_path / "transports.json"
    command = [sys.executable, "-m", "benchmarks.transports", "--mib", "2", "--rounds", "1"]
    done = subprocess.run(
        [*command, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr  # a byte missing fails an assert
    results = json.loads(out.read_text())
    assert "websockets" in results
    for values in results.values():
        assert set(values) == {
            "big_cpu_ms_per_mib",
            "big_mbps",
            "small_cpu_ms_per_1000",
            "rtt_median_us",
        }
        assert values["big_mbps"] > 0 and values["rtt_median_us"] > 0
