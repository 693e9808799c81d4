"""``run`` start suite: the wall time of ``cgpu-kernel run 'print(1)'`` on the embedded default.

    nice python -m benchmarks.start [--quick] [--suite-json PATH]

Issue 19, goal 2: at most 1.0 s when run repeatedly (the warm local server kept between runs,
``backends.warm_server``), at most 2.5 s cold (no warm server yet). Each sample is one
``python -m cgpu_kernel run --kernel cgpu-local 'print(1)'`` process, timed from its start to
its exit by this process, in a private Jupyter path and state folder (a ``local``-backend
kernelspec of its own; a real user's state is never touched), its output checked (``1``, exit
0): a run that failed is no sample. Bytecode is written and read in the suite's own folder,
as for an installed package (``PYTHONDONTWRITEBYTECODE`` would recompile our modules each time).

* ``cold``: a run after ``cgpu-kernel server stop`` (it starts the warm server);
* ``warm``: runs one after another on that server (median, and the worst);
* ``private``: ``CGPU_LOCAL_SERVER=private``, a server started and stopped by each run: what
  every run cost before the warm server, measured side by side;
* ``import``: ``python -c 'import cgpu_kernel.cli'``, the CLI's share of any run.

CPU seconds per warm run are printed too, in the run and its proxy (``RUSAGE_CHILDREN``) and in
the warm server and its kernels (the spare each run has started for the next one): on a shared
machine the wall time carries its load, which the load average at the start and end puts next
to the figures. Run by ``python -m benchmarks`` as the suite ``start``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from benchmarks.suites import goal, metric, write_report
from cgpu_kernel import kernelspec

ROOT = Path(__file__).resolve().parent.parent
WARM_GOAL_S = 1.0
COLD_GOAL_S = 2.5
SPEC = "cgpu-local"


def private_environment(root: Path) -> dict[str, str]:
    """Jupyter paths and cgpu-kernel state inside ``root``, with its own local kernelspec."""
    env = dict(os.environ)
    # An installed package has its bytecode; a checkout run with PYTHONDONTWRITEBYTECODE would
    # compile every module of ours in every process (50 ms and more per process, measured), so
    # the runs write and read bytecode in a folder of their own (the first run is no sample).
    names = ("CGPU_LOCAL_SERVER", "CGPU_LOCAL_SERVER_IDLE_TIMEOUT", "CGPU_TOKEN")
    for name in (*names, "PYTHONDONTWRITEBYTECODE"):
        env.pop(name, None)
    env.update(
        PYTHONPYCACHEPREFIX=str(root / "pycache"),
        JUPYTER_PATH=str(root / "jupyter"),
        JUPYTER_DATA_DIR=str(root / "data"),
        JUPYTER_CONFIG_DIR=str(root / "config"),
        JUPYTER_RUNTIME_DIR=str(root / "runtime"),
        CGPU_STATE_DIR=str(root / "state"),
        CGPU_SPOOL_DIR=str(root / "spool"),
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    argv = kernelspec.make_argv("local", python=sys.executable)
    spec = kernelspec.make_kernel_dict(argv, "cgpu local (benchmark)", backend="local")
    kernelspec.write_kernel_spec(spec, root / "jupyter" / "kernels" / SPEC)
    return env


def cgpu(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cgpu_kernel", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def timed_run(env: dict[str, str]) -> float:
    """Seconds one ``run 'print(1)'`` took, start to exit; raises if it did not print 1."""
    began = time.perf_counter()
    done = cgpu(env, "run", "--kernel", SPEC, "print(1)")
    seconds = time.perf_counter() - began
    if done.returncode != 0 or done.stdout != "1\n":
        raise RuntimeError(
            f"`cgpu-kernel run 'print(1)'` failed (exit {done.returncode}): {done.stdout!r}"
            f" {done.stderr[-2000:]}"
        )
    return seconds


def stop_servers(env: dict[str, str]) -> None:
    done = cgpu(env, "server", "stop")
    if done.returncode != 0:
        raise RuntimeError(f"`cgpu-kernel server stop` failed: {done.stderr[-2000:]}")


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def warm_server_process(root: Path) -> psutil.Process:
    """The warm server the cold runs left (its record is in the suite's state folder)."""
    (record,) = (root / "state" / "cgpu-kernel" / "warm-servers").glob("*.json")
    return psutil.Process(int(json.loads(record.read_text())["pid"]))


def tree_cpu(process: psutil.Process) -> float:
    """CPU seconds of ``process``, its live children and the children it has reaped: the warm
    server and its kernels (each run's kernel is reaped by the server when deleted)."""
    total = sum(process.cpu_times())  # user, system, children_user, children_system, ...
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return float(total)


def import_seconds(env: dict[str, str], runs: int) -> float:
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        subprocess.run(
            [sys.executable, "-c", "import cgpu_kernel.cli"], cwd=ROOT, env=env, check=True
        )
        samples.append(time.perf_counter() - began)
    return statistics.median(samples)


def measure(quick: bool) -> dict[str, Any]:
    cold_runs, warm_runs, private_runs = (1, 3, 1) if quick else (5, 11, 3)
    root = Path(tempfile.mkdtemp(prefix="cgpu-bench-start-"))
    env = private_environment(root)
    results: dict[str, Any] = {"load_before": os.getloadavg()[0]}
    try:
        timed_run(env)  # the first run compiles the bytecode (see private_environment)
        stop_servers(env)
        cold = []
        for _ in range(cold_runs):
            stop_servers(env)
            cold.append(timed_run(env))
        server = warm_server_process(root)
        cpu_before, server_before = children_cpu(), tree_cpu(server)
        warm = [timed_run(env) for _ in range(warm_runs)]
        results["warm_cpu"] = (children_cpu() - cpu_before) / warm_runs
        results["warm_server_cpu"] = (tree_cpu(server) - server_before) / warm_runs
        stop_servers(env)
        private_env = dict(env, CGPU_LOCAL_SERVER="private")
        private = [timed_run(private_env) for _ in range(private_runs)]
        results.update(cold=cold, warm=warm, private=private, imports=import_seconds(env, 5))
    finally:
        stop_servers(env)
        shutil.rmtree(root, ignore_errors=True)
    results["load_after"] = os.getloadavg()[0]
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (CI smoke)")
    parser.add_argument("--suite-json", type=Path, help="write the suite report here")
    args = parser.parse_args(argv)
    results = measure(args.quick)
    warm = statistics.median(results["warm"])
    cold = statistics.median(results["cold"])
    private = statistics.median(results["private"])
    metrics = {
        "warm_median_s": metric(round(warm, 3), "s", higher_better=False),
        "warm_worst_s": metric(round(max(results["warm"]), 3), "s", higher_better=False),
        "cold_median_s": metric(round(cold, 3), "s", higher_better=False),
        "private_median_s": metric(round(private, 3), "s", higher_better=False),
        "warm_cpu_s": metric(round(results["warm_cpu"], 3), "s", higher_better=False),
        "warm_server_cpu_s": metric(round(results["warm_server_cpu"], 3), "s", higher_better=False),
        "cli_import_s": metric(round(results["imports"], 3), "s", higher_better=False),
    }
    goals = [
        goal(
            "run 'print(1)' warm (median)",
            round(warm, 3),
            f"<= {WARM_GOAL_S} s",
            warm <= WARM_GOAL_S,
        ),
        goal(
            "run 'print(1)' cold (median)",
            round(cold, 3),
            f"<= {COLD_GOAL_S} s",
            cold <= COLD_GOAL_S,
        ),
    ]
    print(
        f"cgpu-kernel run 'print(1)', wall seconds (load average {results['load_before']:.1f}"
        f" before, {results['load_after']:.1f} after):"
    )
    for name in ("warm", "cold", "private"):
        samples = " ".join(f"{s:.2f}" for s in results[name])
        print(f"  {name:<8} median {statistics.median(results[name]):.2f}  samples {samples}")
    print(
        f"  CPU per warm run: {results['warm_cpu']:.2f} s in the run and its proxy,"
        f" {results['warm_server_cpu']:.2f} s in the warm server and its kernels"
    )
    print(f"  import cgpu_kernel.cli: {results['imports']:.2f} s")
    for entry in goals:
        state = "met" if entry["met"] else "NOT met"
        print(f"  goal {entry['goal']}: {entry['value']} s, target {entry['target']}: {state}")
    if args.suite_json:
        write_report(args.suite_json, metrics, goals)
    return 0


if __name__ == "__main__":
    sys.exit(main())
