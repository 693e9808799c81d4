"""The local syntax check ``cgpu-kernel run`` does before it starts anything.

A syntax error found here costs no kernel start (a remote one can take minutes). The check uses
IPython's own input transformer, so magics (``%pip``, ``%%bash``) and ``!`` shell lines are not
mistaken for errors. ``runner`` calls :func:`is_python` on the kernelspec, then
:func:`check_syntax` on the code.
"""

from __future__ import annotations

import ast
import os
import traceback
import warnings
from typing import Any

from cgpu_kernel import kernelspec


def is_python(spec: dict[str, Any]) -> bool:
    """Whether the remote kernel speaks Python, so the local syntax check applies."""
    if not str(spec.get("language", "python")).lower().startswith("python"):
        return False
    argv = [str(a) for a in spec.get("argv", [])]
    remote = kernelspec.argv_option(argv, "--remote-kernel", "--ProxyKernel.remote_kernel")
    if remote is None:
        remote = os.environ.get("CGPU_REMOTE_KERNEL", "")
    return not remote or remote.lower().startswith("python")


def check_syntax(code: str) -> dict[str, Any] | None:
    """None when ``code`` is valid IPython input, else ``{name, message, line, column}``.

    IPython's transformer turns magics and ``!`` lines into plain calls first; top-level
    ``await`` is allowed, as it is in IPython.
    """
    # Imported here for start-up time only: IPython is heavy, and every `cgpu-kernel` command
    # imports this module (through the `run` subcommand's parser), not only `run`.
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        source = TransformerManager().transform_cell(code)  # type: ignore[no-untyped-call]
    except (SyntaxError, ValueError, IndexError):
        source = code
    flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning about escapes is the remote's to give
            compile(source, "<cell>", "exec", flags, dont_inherit=True)
    except SyntaxError as exc:
        return {
            "name": type(exc).__name__,
            "message": exc.msg,
            "line": exc.lineno,
            "column": exc.offset,
            "traceback": traceback.format_exception_only(type(exc), exc),
        }
    return None
