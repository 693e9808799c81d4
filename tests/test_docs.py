"""The documentation site builds cleanly, with the option reference generated from the traits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cgpu_kernel.config import trait_reference
from cgpu_kernel.proxy.options import ProxyKernel

ROOT = Path(__file__).resolve().parent.parent


def test_mkdocs_build_strict(tmp_path: Path) -> None:
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr

    page = (site / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "CGPU_STARTUP_TIMEOUT" in page
    assert "config-reference -->" not in page, "the option table marker was not replaced"
    for row in trait_reference(ProxyKernel):
        assert row["option"] in page, f"{row['option']} is missing from the option reference"
