"""MkDocs hook: generate the option reference in ``configuration.md`` from the code itself.

``configuration.md`` holds two markers that this hook replaces while the site builds:

* ``<!-- config-reference -->``: the option table, exactly what ``cgpu-kernel config-reference``
  prints (built by :func:`cgpu_kernel.config.trait_reference` from the ``ProxyKernel`` traits:
  name, type, default, environment variable, help text).
* ``<!-- kernel-flags -->``: the short command-line flags of the kernel process, from
  ``ProxyKernelApp.aliases``.

A marker that has gone missing fails the build, so the reference can never silently disappear.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

from mkdocs.exceptions import PluginError

PAGE = "configuration.md"
OPTIONS_MARKER = "<!-- config-reference -->"
FLAGS_MARKER = "<!-- kernel-flags -->"


def option_table() -> str:
    """The Markdown option table, as ``cgpu-kernel config-reference`` prints it."""
    from cgpu_kernel.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main(["config-reference"])
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise PluginError(
                    f"`cgpu-kernel config-reference` exited with {exc.code}: {out.getvalue()}"
                ) from None
    table = out.getvalue().strip()
    if not table.startswith("| Option |"):
        raise PluginError(f"`cgpu-kernel config-reference` printed no table: {table[:200]!r}")
    return table


def flag_table() -> str:
    """The kernel process's short flags and the option each one sets."""
    from cgpu_kernel.proxy.app import ProxyKernelApp

    rows = ["| Flag | Sets |", "|---|---|"]
    for alias, target in ProxyKernelApp.aliases.items():
        flag = f"-{alias}" if len(alias) == 1 else f"--{alias}"
        rows.append(f"| `{flag}` | `{target}` |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, *, page: Any, **kwargs: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    for marker, build in ((OPTIONS_MARKER, option_table), (FLAGS_MARKER, flag_table)):
        if marker not in markdown:
            raise PluginError(f"{PAGE} lost its {marker} marker; the generated table needs it.")
        markdown = markdown.replace(marker, build())
    return markdown
