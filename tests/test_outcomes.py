"""``run.outcomes``: the categories of the proxy's errors come from the error tree's classes.

Pure functions, no servers: what ``cgpu-kernel run`` (and the kernel's history) reports for an
``ename``, and what a ``CgpuError`` raised during a run turns into.
"""

from __future__ import annotations

import ast
import gc
import json
from pathlib import Path

import pytest

from cgpu_kernel import exceptions
from cgpu_kernel.run import outcomes, runner

ROOT = Path(__file__).resolve().parent.parent


def tree() -> list[type[exceptions.CgpuError]]:
    """Every class of the error tree, the root included."""
    found, pending = [], [exceptions.CgpuError]
    while pending:
        cls = pending.pop(0)
        found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", tree(), ids=lambda cls: cls.__name__)
def test_every_error_class_maps_to_its_own_category(cls: type[exceptions.CgpuError]) -> None:
    assert cls.category in outcomes.CATEGORIES, f"{cls.__name__}: no error code for it"
    assert outcomes.categorize(cls.ename) == cls.category


def test_the_tree_is_what_run_reads() -> None:
    assert len(tree()) > 20  # the walk found the tree, not only the root
    for ename, category in exceptions.categories().items():
        assert outcomes.categorize(ename, "any message") == category


def test_the_outcomes_of_the_old_ename_table_hold() -> None:
    """What the hand-written ename table said before the categories moved onto the classes."""
    before = {
        "RemoteUnreachable": "connection",
        "RemoteAuthenticationFailed": "auth",
        "RemoteKernelSpecNotFound": "remote_start",
        "RemoteProtocolError": "remote_start",
        "RemoteKernelError": "remote_start",
        "CgpuKernelError": "remote_start",
        "CgpuConfigurationError": "configuration",
        "RemoteStartupTimeout": "kernel_timeout",
        "RemoteKernelLost": "kernel_lost",
        "RemoteConnectionLost": "connection",
        "ColabAuthenticationFailed": "auth",
        "ColabRuntimeGone": "kernel_lost",
        "ColabQuotaExceeded": "remote_start",
        "ColabAssignmentDenied": "remote_start",
        "ColabTooManyRuntimes": "remote_start",
        "ColabAcceleratorUnavailable": "remote_start",
        "ColabError": "remote_start",
        "RemoteReplyLost": "remote_start",
    }
    assert {ename: outcomes.categorize(ename) for ename in before} == before


def test_a_new_class_in_the_tree_needs_no_table_entry() -> None:
    class FreshlyAddedError(exceptions.RemoteAuthError):
        ename = "RemoteFreshlyAddedRefusal"

    try:
        assert outcomes.categorize("RemoteFreshlyAddedRefusal") == "auth"  # inherited category
    finally:
        del FreshlyAddedError
        gc.collect()  # out of __subclasses__ again for the other tests


@pytest.mark.parametrize("ename", ["RemoteNewThing", "ColabNewRefusal", "CgpuFutureError"])
def test_an_ename_from_a_newer_proxy_falls_back_to_remote_start(ename: str) -> None:
    assert ename not in exceptions.categories()
    assert outcomes.categorize(ename) == "remote_start"


@pytest.mark.parametrize(
    ("ename", "evalue", "category"),
    [
        ("", "", "unknown"),
        ("TabError", "", "syntax"),
        ("ModuleNotFoundError", "No module named 'cv2'", "import"),
        ("MemoryError", "", "memory"),
        ("XlaRuntimeError", "RESOURCE_EXHAUSTED: Out of memory", "memory"),
        ("RuntimeError", "shape mismatch", "runtime"),
        ("FileNotFoundError", "", "io"),
        ("KeyError", "'x'", "runtime"),
    ],
)
def test_the_codes_own_exceptions_by_name(ename: str, evalue: str, category: str) -> None:
    assert outcomes.categorize(ename, evalue) == category


def test_a_cgpu_error_during_a_run_reports_its_class_category(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    history_file = tmp_path / "history.jsonl"
    monkeypatch.setenv("CGPU_HISTORY_FILE", str(history_file))
    result = runner.run(runner.RunOptions(code="1", session="not a valid name!"))
    assert result.category == exceptions.ConfigurationError.category
    assert result.error is not None and result.error["name"] == "CgpuConfigurationError"
    assert (result.error_code, result.exit_status) == (2006, 26)
    record = json.loads(history_file.read_text().splitlines()[-1])
    assert (record["source"], record["status"], record["category"]) == (
        "run",
        "error",
        "configuration",
    )


#: Imports inside functions in run/ and cli/, each kept for start-up time only (said at each).
LAZY_IMPORTS = {
    ("cgpu_kernel/run/syntax.py", "IPython.core.inputtransformer2"),
    ("cgpu_kernel/cli/__init__.py", "cgpu_kernel.proxy.app"),
    ("cgpu_kernel/cli/__init__.py", "cgpu_kernel.cli.demo"),
}


def test_run_and_cli_import_at_module_top() -> None:
    """A function-level import is how a cycle gets dodged; only the start-up ones are allowed."""
    found = set()
    for path in sorted([*ROOT.glob("cgpu_kernel/run/*.py"), *ROOT.glob("cgpu_kernel/cli/*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                for inner in ast.walk(node):
                    if isinstance(inner, ast.ImportFrom):
                        found.add((path.relative_to(ROOT).as_posix(), inner.module or ""))
                    elif isinstance(inner, ast.Import):
                        found.update(
                            (path.relative_to(ROOT).as_posix(), a.name) for a in inner.names
                        )
    assert found == LAZY_IMPORTS
