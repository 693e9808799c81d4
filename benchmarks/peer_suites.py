"""Jupyter's own test suites as a conformance suite: each run on plain ipykernel, then the proxy.

    python -m benchmarks.peer_suites [--suite ipykernel nbclient jupyter_client]
        [--select ipykernel=tests/test_message_spec.py ...] [--work DIR] [--json PATH]

For each suite it downloads the sdist of the *installed* version (``pip download --no-deps
--no-binary NAME NAME==VERSION``), extracts it, and runs its ``tests/`` twice with pytest: once
as it is (the ``python3`` kernelspec is plain ipykernel), once with ``python3`` shadowed by a
proxy kernelspec (``JUPYTER_PATH`` first in the search path) whose remote is a real ipykernel
behind a jupyter-server on loopback, started here (its own environment does not see the
shadow, or its ``python3`` would be the proxy again). It prints each test whose outcome differs,
and exits 1 if a test that passes on ipykernel fails on the proxy, except those listed in
:data:`KNOWN` with the reason docs/frontends.md gives.

Needs the package registry (pip) for the sdists; each suite's own pytest plugins are what the
environment has (a test that errors for a missing plugin errors on both sides, so it is not a
difference). ``tests/test_peer_suites.py`` runs the bounded subset (ipykernel's
``test_message_spec.py``); see docs/testing.md.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, before it joined the standard library
    import tomli as tomllib

from cgpu_kernel import kernelspec

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("ipykernel", "nbclient", "jupyter_client")
#: tests that differ for a reason that is a property of every remote kernel (docs/frontends.md)
KNOWN = {
    "test_parent_header_and_ident": "the kernel sees the server's routing identity",
    "test_subclass_callables": "the kernelspec says interrupt_mode: message",
    "test_parallel_notebooks": "the frontend's environment variables do not reach the remote",
    "test_async_parallel_notebooks": "the frontend's environment variables do not reach the remote",
    "test_run_all_notebooks[Inline Image.ipynb-opts5]": (
        "the notebook's folder is not the remote kernel's working directory"
    ),
    # nbclient's conftest sets IPYKERNEL_CELL_NAME, which changes a local traceback's form
    "test_run_all_notebooks[Skip Exceptions with Cell Tags.ipynb-opts8]": (
        "the frontend's environment variables do not reach the remote"
    ),
}
SUITE_TIMEOUT = 1800  # seconds one pytest run of one suite may take


@dataclass
class Outcomes:
    """Each test's outcome in one run (passed, failed, error, skipped), and how long it took."""

    tests: dict[str, str]
    seconds: float
    returncode: int

    def summary(self) -> str:
        passed = sum(outcome == "passed" for outcome in self.tests.values())
        return f"{passed}/{len(self.tests)} passed ({self.seconds:.0f} s)"


def fetch_suite(name: str, work: Path) -> Path:
    """The extracted sdist of the installed ``name`` (downloaded once into ``work``)."""
    version = importlib.metadata.version(name)
    sdists = work / "sdists"
    sdists.mkdir(parents=True, exist_ok=True)
    project = name.replace("_", "-")
    found = [p for p in sdists.glob("*.tar.gz") if _is_sdist_of(p, name, version)]
    if not found:
        subprocess.run(
            [
                # the sdist of this project only: its build backend (for the metadata) comes
                # as a wheel (``:all:`` would build hatchling and the rest from source too)
                sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", project,
                "--quiet", "-d", str(sdists), f"{project}=={version}",
            ],
            check=True,
        )  # fmt: skip
        found = [p for p in sdists.glob("*.tar.gz") if _is_sdist_of(p, name, version)]
    if not found:
        raise SystemExit(f"pip downloaded no sdist for {project}=={version} into {sdists}")
    target = work / "src"
    with tarfile.open(found[0]) as archive:
        top = archive.getnames()[0].split("/", 1)[0]
        if not (target / top).exists():
            archive.extractall(target, filter="data")
    return target / top


def test_requirements(source: Path) -> list[str]:
    """What the suite's ``test`` extra (or dependency group) asks for and this environment
    lacks; the rest is used as installed."""
    project = tomllib.loads((source / "pyproject.toml").read_text())
    wanted = project.get("project", {}).get("optional-dependencies", {}).get("test", [])
    wanted += project.get("dependency-groups", {}).get("test", [])
    missing = []
    for text in wanted:
        if not isinstance(text, str):
            continue
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": "test"}):
            continue
        try:
            importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(str(requirement))
    return missing


def install_test_requirements(sources: list[Path], work: Path) -> Path:
    """The suites' missing test plugins, into a folder of their own (``pip install --target``,
    without their dependencies): the environment itself is not changed."""
    target = work / "test-deps"
    missing = sorted({r for source in sources for r in test_requirements(source)})
    if missing:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
             str(target), *missing],
            check=True,
        )  # fmt: skip
    return target


def _is_sdist_of(path: Path, name: str, version: str) -> bool:
    stem = path.name.removesuffix(".tar.gz").lower().replace("-", "_")
    return stem == f"{name.lower()}_{version}"


def start_remote(work: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """A jupyter-server on loopback running plain ipykernels: the proxy's remote."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import start_jupyter_server

    server = start_jupyter_server(work / "server")
    return server.process, server.url, server.token_file


def shadow_python3(work: Path, url: str, token_file: Path) -> Path:
    """A Jupyter data folder whose ``python3`` kernelspec is the proxy to ``url``."""
    argv = kernelspec.make_argv("jupyter", url=url, token_file=str(token_file))
    spec = kernelspec.make_kernel_dict(argv, "Python 3 (cgpu-kernel proxy)", backend="jupyter")
    spec["language"] = "python"
    shadow = work / "shadow"
    kernelspec.write_kernel_spec(spec, shadow / "kernels" / "python3")
    return shadow


def run_suite(source: Path, selection: list[str], env: dict[str, str], report: Path) -> Outcomes:
    """pytest on ``selection`` (paths inside the suite) with the suite's own configuration."""
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable, "-m", "pytest", *selection, "-q", "-p", "no:cacheprovider",
            f"--junitxml={report}", "-o", "junit_family=xunit2", *_asyncio_option(env),
        ],
        cwd=source,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=SUITE_TIMEOUT,
        check=False,
    )  # fmt: skip
    return Outcomes(read_junit(report), time.monotonic() - started, done.returncode)


def _asyncio_option(env: dict[str, str]) -> list[str]:
    """pytest-asyncio warns at start-up without its loop scope set, and the suites make
    warnings errors; a suite without the plugin (``--strict-config``) refuses the option."""
    path = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    found = importlib.util.find_spec("pytest_asyncio") is not None or any(
        (Path(p) / "pytest_asyncio").is_dir() for p in path
    )
    return ["-o", "asyncio_default_fixture_loop_scope=function"] if found else []


def read_junit(report: Path) -> dict[str, str]:
    if not report.exists():
        return {}
    tests: dict[str, str] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
        tests[name] = outcome
    return tests


def differences(plain: Outcomes, proxy: Outcomes) -> list[tuple[str, str, str]]:
    """(test, outcome on ipykernel, outcome on the proxy) for each test whose outcome differs."""
    names = sorted(set(plain.tests) | set(proxy.tests))
    return [
        (name, plain.tests.get(name, "absent"), proxy.tests.get(name, "absent"))
        for name in names
        if plain.tests.get(name) != proxy.tests.get(name)
    ]


def known_reason(test: str) -> str | None:
    """Why ``test`` differs, when that is a property of every remote kernel (by its name with
    parameters, else by its function's name)."""
    name = test.rsplit("::", 1)[-1]
    return KNOWN.get(name) or KNOWN.get(name.split("[", 1)[0])


def compare(
    suites: list[str], selections: dict[str, list[str]], work: Path
) -> tuple[dict[str, object], bool]:
    """Run each suite both ways; the results, and whether any unexplained regression showed."""
    process, url, token_file = start_remote(work)
    try:
        shadow = shadow_python3(work, url, token_file)
        sources = {name: fetch_suite(name, work) for name in suites}
        deps = install_test_requirements(list(sources.values()), work)
        path = [str(ROOT), str(deps), os.environ.get("PYTHONPATH", "")]
        base = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p))
        base.pop("JUPYTER_PATH", None)
        base["CGPU_STATE_DIR"] = str(work / "state")
        proxied = dict(base, JUPYTER_PATH=str(shadow))
        results: dict[str, object] = {}
        regressed = False
        for name in suites:
            source = sources[name]
            selection = selections.get(name) or ["tests"]
            plain = run_suite(source, selection, base, work / f"{name}-ipykernel.xml")
            proxy = run_suite(source, selection, proxied, work / f"{name}-proxy.xml")
            diffs = differences(plain, proxy)
            print(
                f"{name} {importlib.metadata.version(name)} {' '.join(selection)}:"
                f" {plain.summary()} on ipykernel, {proxy.summary()} on the proxy"
            )
            for test, before, after in diffs:
                reason = known_reason(test)
                worse = before == "passed" and after != "passed"
                regressed = regressed or (worse and reason is None)
                note = f"  (known: {reason})" if reason else ""
                sign = "-" if worse else "+"
                print(f"  {sign} {test}: {before} on ipykernel, {after} on the proxy{note}")
            results[name] = {
                "version": importlib.metadata.version(name),
                "selection": selection,
                "ipykernel": plain.tests,
                "proxy": proxy.tests,
                "seconds": {"ipykernel": plain.seconds, "proxy": proxy.seconds},
                "differences": diffs,
            }
        return results, regressed
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", nargs="+", choices=SUITES, default=list(SUITES))
    parser.add_argument(
        "--select",
        nargs="+",
        default=[],
        metavar="SUITE=PATH",
        help="run only these test paths of a suite, e.g. ipykernel=tests/test_message_spec.py",
    )
    parser.add_argument(
        "--work", type=Path, help="keep sdists and reports here (default: a temporary folder)"
    )
    parser.add_argument("--json", type=Path, help="write every test's outcome here")
    args = parser.parse_args(argv)
    selections: dict[str, list[str]] = {}
    for item in args.select:
        suite, _, path = item.partition("=")
        selections.setdefault(suite, []).append(path)
    with tempfile.TemporaryDirectory(prefix="cgpu-peer-") as scratch:
        work = (args.work or Path(scratch)).resolve()
        results, regressed = compare(args.suite, selections, work)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 1 if regressed else 0


if __name__ == "__main__":
    raise SystemExit(main())
