"""Command-line options meant for the kernel, not the proxy: kept apart, applied remotely.

Frontends pass options to the kernelspec's command that they mean for a Python kernel: nbclient
adds ``--HistoryManager.hist_file=:memory:``, ipykernel's own tests ``--profile-dir DIR``. The
proxy owns only its own options (``ProxyKernel``'s, ``-f``, the log level); anything else must
never make it unusable. ``split_argv`` (called by ``proxy.app.launch_kernel`` before traitlets
reads the command line) sets them aside. The ``--Class.trait=value`` ones are applied to the
remote IPython kernel, as ``%config`` would, by a silent request sent before the first cell
(``apply_request``, sent by ``proxy.supervisor``); the rest, and settings no configurable of the
remote kernel takes, are named once, in the log and in the first cell's output
(``not_applied_notice``).

Sans-I/O: builds the request and reads its reply; nothing here sends or waits.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Collection
from dataclasses import dataclass, field

from cgpu_kernel.core.journal import silent_execute_request
from cgpu_kernel.core.wire import Message

#: The ename the remote code raises to list what it could not apply (the reply carries it).
NOT_APPLIED = "CgpuKernelOptionsNotApplied"

# Runs inside the remote kernel: the settings' own configurables, found as ``%config`` finds
# them (the shell and its configurables), plus ipykernel's kernel and application. Values are
# strings from a command line: traitlets turns them into each trait's type (DeferredConfigString),
# exactly as it would have at the kernel's start.
_REMOTE_CODE = """
def _cgpu_apply(settings):
    import json
    from traitlets.config import Config
    from traitlets.config.loader import DeferredConfigString
    shell = get_ipython()
    targets = [shell, *getattr(shell, "configurables", [])]
    kernel = getattr(shell, "kernel", None)
    if kernel is not None:
        targets += [kernel, getattr(kernel, "parent", None)]
    unique = []
    for target in targets:
        if target is not None and all(target is not seen for seen in unique):
            unique.append(target)
    missed = []
    for option, section, name, value in settings:
        matched = [
            t for t in unique
            if any(k.__name__ == section for k in type(t).__mro__)
            and t.has_trait(name) and t.trait_metadata(name, "config")
        ]
        if not matched:
            missed.append([option, "no configurable of the remote kernel has this option"])
            continue
        config = Config()
        config[section][name] = DeferredConfigString(value)
        for target in matched:
            try:
                target.update_config(config)
            except Exception as exc:
                missed.append([option, f"{type(exc).__name__}: {exc}"])
                break
    if missed:
        raise RuntimeError(json.dumps(missed))
"""


@dataclass
class KernelOptions:
    """What the command line held for the kernel rather than the proxy."""

    #: ``--Class.trait=value`` settings: (the option as given, class, trait, value)
    settings: list[tuple[str, str, str, str]] = field(default_factory=list)
    #: options that cannot be applied remotely (``--profile-dir DIR``...), as given
    unusable: list[str] = field(default_factory=list)
    #: of those, the ones that look like a misspelt option of the proxy: option -> the proxy's
    suggestions: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.settings or self.unusable)


def split_argv(
    argv: list[str], ours: Collection[str], our_classes: Collection[str]
) -> tuple[list[str], KernelOptions]:
    """The proxy's own arguments, and those meant for the kernel.

    ``ours``: the option names the proxy's command line takes (aliases and flags, without
    dashes); ``our_classes``: the configurable classes whose ``--Class.trait`` are the proxy's.
    An option not ours takes the next argument as its value unless it has ``=`` or the next one
    starts with ``-`` (``--profile-dir DIR``, ``--debug``).
    """
    kept: list[str] = []
    theirs = KernelOptions()
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if not arg.startswith("-") or arg in ("-", "--"):
            kept.append(arg)
            continue
        name, has_value, value = arg.lstrip("-").partition("=")
        section = name.split(".", 1)[0] if "." in name else None
        if name in ours or name.replace("_", "-") in ours or section in our_classes:
            kept.append(arg)
            continue
        given = [arg]
        if not has_value and index < len(argv) and not argv[index].startswith("-"):
            value = argv[index]
            given.append(value)
            has_value = "="
            index += 1
        option = " ".join(given)
        if section is not None and has_value and name.count(".") == 1:
            theirs.settings.append((option, section, name.split(".", 1)[1], value))
        else:
            theirs.unusable.append(option)
            close = difflib.get_close_matches(name.replace("_", "-"), ours, n=1, cutoff=0.8)
            if close:
                theirs.suggestions[option] = f"--{close[0]}"
    return kept, theirs


def apply_request(session: str, options: KernelOptions) -> Message:
    """A silent ``execute_request`` (nothing in the history, the user's variables or the
    frontend) applying ``options.settings`` to the remote kernel; its reply's error, if any,
    lists what was not applied (:func:`not_applied`)."""
    settings = [list(s) for s in options.settings]
    code = (
        f"exec(compile({_REMOTE_CODE!r} + '\\n_cgpu_apply(' + {json.dumps(settings)!r} + ')',"
        " '<cgpu-kernel options>', 'exec'), {'get_ipython': get_ipython})"
    )
    return silent_execute_request(session, code)


def not_applied(options: KernelOptions, reply: Message | None) -> list[tuple[str, str]]:
    """Each option that did not take effect remotely, with the reason, from ``reply`` (None:
    no reply came, or none was asked)."""
    why = "only --Class.trait=value options can be passed on"
    missed = [
        (
            option,
            f"not the proxy's either: did you mean {options.suggestions[option]}?"
            if option in options.suggestions
            else why,
        )
        for option in options.unusable
    ]
    if not options.settings:
        return missed
    if reply is None:
        return missed + [(s[0], "the remote kernel did not answer") for s in options.settings]
    content = reply.content
    if content.get("status") == "ok":
        return missed
    evalue = str(content.get("evalue", ""))
    try:
        listed = json.loads(evalue)
        return missed + [(str(option), str(reason)) for option, reason in listed]
    except (ValueError, TypeError):
        why = f"{content.get('ename')}: {evalue}"[:200]
        return missed + [(s[0], why) for s in options.settings]


def not_applied_notice(missed: list[tuple[str, str]]) -> str:
    """The one line that says which kernel options the remote kernel did not get."""
    listed = "; ".join(f"{option} ({reason})" for option, reason in missed)
    return (
        "cgpu-kernel: these kernel command-line options were not applied to the remote kernel:"
        f" {listed}. The proxy passes --Class.trait=value options on, as %config would, after"
        " the remote kernel started; options for the proxy itself go in the kernelspec"
        " (`cgpu-kernel install --option NAME=VALUE`)."
    )
