"""Configuration plumbing: ``CGPU_*`` environment variables as a fallback for traits.

Every option is a traitlets trait with help text, settable from a config file and the command
line. A trait tagged ``.tag(env="CGPU_SOMETHING")`` also reads that environment variable when
neither the command line nor a config file set it: precedence is command line, then config
file, then environment, then the default. The documentation's option table is generated from
the same traits (``cgpu-kernel config-reference``).
"""

from __future__ import annotations

import os
from typing import Any

from traitlets import TraitError
from traitlets.config import Configurable

from cgpu_kernel.exceptions import ConfigurationError


class EnvConfigurable(Configurable):
    """A Configurable whose traits tagged with ``env=`` fall back to environment variables."""

    def __init__(self, *, use_env: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: Problems with ``CGPU_*`` values (each ignored); the proxy shows them in the cell.
        self.env_errors: list[str] = []
        if use_env:
            self._read_environment(set(kwargs))

    def _read_environment(self, explicit: set[str]) -> None:
        for cls in type(self).mro():
            section = self.config.get(cls.__name__)
            if section:
                explicit.update(section.keys())
        for name, trait in self.traits(env=lambda value: value is not None).items():
            variable = trait.metadata["env"]
            raw = os.environ.get(variable)
            if name in explicit or raw is None or raw == "":
                continue
            try:
                setattr(self, name, trait.from_string(raw))
            except (TraitError, ValueError) as exc:
                self.env_errors.append(
                    f"The environment variable {variable}={raw!r} is not a valid value for"
                    f" {type(self).__name__}.{name}: {exc}. Fix or unset it."
                )

    def check_environment(self) -> None:
        """Raise :class:`ConfigurationError` naming every invalid ``CGPU_*`` value."""
        if self.env_errors:
            raise ConfigurationError(" ".join(self.env_errors))


def trait_reference(configurable: type[Configurable]) -> list[dict[str, str]]:
    """Rows for the documentation's option table: name, type, default, env var, help."""
    rows = []
    for name, trait in sorted(configurable.class_traits(config=True).items()):
        default = trait.default_value_repr()
        rows.append(
            {
                "option": f"{configurable.__name__}.{name}",
                "type": type(trait).__name__,
                "default": default,
                "env": str(trait.metadata.get("env", "")),
                "help": " ".join(str(trait.help).split()),
            }
        )
    return rows
