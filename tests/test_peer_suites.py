"""Jupyter's own test suites, run on plain ipykernel and then through the proxy
(``benchmarks/peer_suites.py``; docs/testing.md, "Peer test suites").

The bounded subset: ipykernel's ``test_message_spec.py`` (24 tests), from the sdist of the
installed ipykernel, run twice (about 50 s here with the download, on two shared cores). It
needs the package registry for the sdist, and is skipped, saying so, without it. The whole set
of suites is ``python -m benchmarks.peer_suites``.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks.peer_suites import compare, fetch_suite


@pytest.mark.slow  # 50 s; the default run has jupyter_kernel_test (test_conformance)
@pytest.mark.timeout(900)
def test_ipykernel_message_spec_passes_through_the_proxy_as_on_ipykernel(tmp_path: Path) -> None:
    try:
        fetch_suite("ipykernel", tmp_path)  # kept in tmp_path for compare
    except subprocess.CalledProcessError:
        pytest.skip("pip could not download ipykernel's sdist (no package registry here)")
    results, regressed = compare(
        ["ipykernel"], {"ipykernel": ["tests/test_message_spec.py"]}, tmp_path
    )
    suite = results["ipykernel"]
    assert isinstance(suite, dict)
    assert len(suite["proxy"]) >= 20, "the tests did not run through the proxy"
    assert set(suite["proxy"].values()) == {"passed"}, suite["differences"]
    assert suite["differences"] == [] and not regressed
