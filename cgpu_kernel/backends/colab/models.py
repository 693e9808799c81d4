"""Colab's data, parsed: assignments, runtime proxies, accelerator names, notebook hashes.

No I/O here. Colab's endpoints are undocumented and change (FIELD-NOTES section 4): everything
that reads the shape of its JSON lives in this module, and an answer in an unknown shape raises
:exc:`~cgpu_kernel.exceptions.ColabAPIChangedError`. Used by :mod:`.api` (which parses what it
fetches) and :mod:`.backend`; :class:`AccessTokens` is what :mod:`.auth` provides.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from cgpu_kernel.exceptions import ColabAPIChangedError, ConfigurationError, RemoteProtocolError

DEFAULT_COLAB_URL = "https://colab.research.google.com/"
#: The host of colab-vscode's ``v1/user-info`` (``client/v1/index.ts`` ``getUserInfo``). It may
#: refuse ordinary user tokens (google-colab-cli AGENTS.md: ``USER_PROJECT_DENIED``), so what it
#: says is a bonus, never a requirement.
DEFAULT_GAPI_URL = "https://colab.pa.googleapis.com/"
XSSI_PREFIX = b")]}'"
#: Accelerators Colab offers (google-colab-cli ``client.py``'s accelerator names, colab-vscode's
#: tests); others are passed through as typed (uppercased). ``V28`` (TPU v2-8) is older.
GPUS = ("T4", "L4", "G4", "A100", "H100")
TPUS = ("V5E1", "V6E1", "V28")
#: Accelerators that come on one (high-memory) machine only, so they take *no* ``shape``
#: parameter: colab-vscode ``api.ts`` ``HIGHMEM_ONLY_ACCELERATORS`` / ``buildAssignUrl``.
HIGHMEM_ONLY = frozenset({"L4", "V28", "V5E1", "V6E1"})
#: ``colab_request`` auth types answered by credentials propagation.
AUTH_TYPES = ("dfs_ephemeral", "auth_user_ephemeral")
#: Assignment outcomes (POST ``tun/m/assign``).
OUTCOME_SUCCESS = 4
OUTCOMES_NO_QUOTA = (1, 2)
OUTCOME_DENIED = 5

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]*$")
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_NOTEBOOK_NAMESPACE = uuid.UUID("5d1c6f0e-8a5b-4b8f-9a39-3c2b0f0c6a11")


class AccessTokens(Protocol):
    """Where the Google access token comes from (see :mod:`cgpu_kernel.backends.colab.auth`)."""

    async def access_token(self, *, refresh: bool = False) -> str:
        """A current access token; ``refresh`` asks for a new one (the last was refused)."""
        ...


def notebook_hash(seed: str | None = None) -> str:
    """Colab's ``nbh``: a UUID with ``-`` turned to ``_``, padded with ``.`` to 44 characters.

    The same ``seed`` (a connection file's path, a user-chosen key) gives the same hash, so a
    restarted kernel finds its runtime again; no seed gives a fresh one.
    """
    ident = uuid.uuid5(_NOTEBOOK_NAMESPACE, seed) if seed else uuid.uuid4()
    return str(ident).replace("-", "_").ljust(44, ".")


def normalize_accelerator(value: str) -> str:
    """``T4``, ``a100`` -> ``A100``, ``none``/``cpu``/empty -> ``none``; refuses odd names."""
    name = value.strip().upper()
    if name in ("", "NONE", "CPU"):
        return "none"
    if not re.fullmatch(r"[A-Z0-9]{1,16}", name):
        raise ConfigurationError(
            f"{value!r} is not an accelerator name. Choose one of {', '.join(GPUS)}, a TPU such"
            f" as {TPUS[0]}, or none."
        )
    return name


def assignment_query(
    nbh: str, accelerator: str, high_memory: bool, runtime_version: str = ""
) -> dict[str, str]:
    """The query of ``tun/m/assign`` for one accelerator, as colab-vscode's ``buildAssignUrl``
    builds it: CPU has no variant and no accelerator; ``shape=hm`` only when high memory was
    asked for on an accelerator that has two shapes (never for L4 or a TPU, which come on one
    machine only); ``runtime_version_label`` only when a version is pinned (empty: latest)."""
    query = {"nbh": nbh}
    if accelerator != "none":
        query["variant"] = "TPU" if accelerator in TPUS else "GPU"
        query["accelerator"] = accelerator
    if high_memory and accelerator not in HIGHMEM_ONLY:
        query["shape"] = "hm"
    if runtime_version:
        query["runtime_version_label"] = runtime_version
    return query


def ignores_high_memory(accelerator: str) -> bool:
    """True for accelerators that come on one machine only (high memory asked for in vain)."""
    return accelerator in HIGHMEM_ONLY


def check_service_url(url: str, what: str) -> str:
    """``https://host/path/`` (``http`` only on loopback, for test doubles); no credentials."""
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    if (
        parts.scheme not in ("http", "https")
        or not parts.netloc
        or (parts.scheme == "http" and host not in LOOPBACK)
    ):
        raise ConfigurationError(
            f"The {what} URL must be an https:// URL (http only on loopback), got"
            f" {parts.scheme or 'no scheme'}://{host}."
        )
    if parts.username or parts.password or parts.query:
        raise ConfigurationError(f"The {what} URL must not carry credentials or a query.")
    path = parts.path if parts.path.endswith("/") else parts.path + "/"
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def parse_json(body: bytes, where: str) -> Any:
    """JSON from a Colab response, without its XSSI prefix (``)]}'`` and a newline)."""
    text = body.lstrip()
    if text.startswith(XSSI_PREFIX):
        text = text[len(XSSI_PREFIX) :]
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise ColabAPIChangedError(f"{where} did not answer with JSON") from None


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise ColabAPIChangedError(f"Colab sent no usable {what}")
    return value


@dataclass
class RuntimeProxy:
    """Where the runtime's Jupyter server is and the short-lived token that opens it."""

    url: str
    token: str = field(repr=False)
    lifetime: float
    obtained_at: float

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.lifetime

    @classmethod
    def parse(cls, info: Any, colab_url: str) -> RuntimeProxy | None:
        """From ``runtimeProxyInfo`` (or the runtime-proxy-token answer); None when absent."""
        if not isinstance(info, dict):
            return None
        url, token = info.get("url"), info.get("token")
        if not isinstance(url, str) or not isinstance(token, str) or not token:
            return None
        lifetime: Any = info.get("tokenExpiresInSeconds", info.get("tokenTtl", 3600))
        if isinstance(lifetime, str):
            lifetime = lifetime.rstrip("s")
        try:
            seconds = float(lifetime)
        except (TypeError, ValueError):
            seconds = 3600.0
        proxy_url = check_service_url(url, "runtime proxy")
        if urlsplit(proxy_url).scheme == "http" and urlsplit(colab_url).scheme != "http":
            raise RemoteProtocolError("Colab named a runtime proxy without TLS; refusing it.")
        return cls(proxy_url, token, max(seconds, 1.0), time.monotonic())


@dataclass
class Assignment:
    """One Colab runtime assigned to us."""

    endpoint: str
    accelerator: str
    variant: str = ""
    machine_shape: str = ""
    proxy: RuntimeProxy | None = None
    reused: bool = False
    idle_timeout: float | None = None
    #: Named by endpoint (``colab_endpoint``), not assigned by this kernel: never released.
    attached: bool = False
    #: The account's tier as the assignment says it (``subTier``), "unknown" when it does not.
    tier: str = "unknown"

    @classmethod
    def parse(
        cls, data: dict[str, Any], colab_url: str, *, reused: bool, attached: bool = False
    ) -> Assignment:
        """From an assign answer (or a listing item, ``attached``). ``variant`` and
        ``machineShape`` come as numbers (``/tun/m``) or as enum names (colab.pa listings)."""
        fit = data.get("fit")
        return cls(
            attached=attached,
            endpoint=check_name(data.get("endpoint"), "runtime endpoint"),
            accelerator=str(data.get("accelerator") or data.get("acc") or "none").upper(),
            variant=str(data.get("variant", "")),
            machine_shape=str(data.get("machineShape", "")),
            proxy=RuntimeProxy.parse(data.get("runtimeProxyInfo"), colab_url),
            reused=reused,
            idle_timeout=float(fit) if isinstance(fit, int | float) else None,
            tier=tier_name(data.get("subTier")),
        )


def label(accelerator: str) -> str:
    """How an accelerator is named in messages (``none`` reads "CPU-only")."""
    return "CPU-only" if accelerator == "none" else accelerator


def safe_link(url: str) -> str | None:
    """``url`` if it is fit to show the user as a link to open (https, or loopback)."""
    parts = urlsplit(url)
    if parts.scheme == "https" or (parts.scheme == "http" and parts.hostname in LOOPBACK):
        return url
    return None


#: Subscription tiers as users read them. ``subTier`` in an assignment is a number (``/tun/m``),
#: ``subscriptionTier`` in user-info an enum name (colab-vscode ``api.ts`` ``normalizeSubTier``).
_TIERS: dict[object, str] = {
    1: "Colab Pro",
    2: "Colab Pro+",
    "SUBSCRIPTION_TIER_PRO": "Colab Pro",
    "SUBSCRIPTION_TIER_PRO_PLUS": "Colab Pro+",
    "SUBSCRIPTION_TIER_NONE": "no subscription (free)",
}


def tier_name(value: object) -> str:
    """A tier as users read it; anything unknown (0, ``UNSPECIFIED``, absent) is "unknown"."""
    return _TIERS.get(value, "unknown")


@dataclass
class UserInfo:
    """What Colab says this account may ask for (colab-vscode ``api.ts`` ``UserInfoSchema``)."""

    tier: str
    eligible: list[str]
    ineligible: list[str]
    #: Paid compute units left, when Colab says.
    compute_units: float | None = None

    @classmethod
    def parse(cls, data: Any) -> UserInfo:
        if not isinstance(data, dict) or "subscriptionTier" not in data:
            raise ColabAPIChangedError("Colab's user-info answer has no subscriptionTier")
        balance = data.get("paidComputeUnitsBalance")
        return cls(
            tier=tier_name(data.get("subscriptionTier")),
            eligible=_accelerator_models(data.get("eligibleAccelerators")),
            ineligible=_accelerator_models(data.get("ineligibleAccelerators")),
            compute_units=float(balance) if isinstance(balance, int | float) else None,
        )

    def describe(self) -> str:
        """One sentence for an error or ``auth status``: the tier and what it allows."""
        text = f"Colab says this account has {self.tier}"
        if self.eligible:
            text += f" and may ask for {', '.join(self.eligible)}"
        if self.ineligible:
            text += f" (not: {', '.join(self.ineligible)})"
        if self.compute_units is not None:
            text += f"; {self.compute_units:g} paid compute units left"
        return text + "."


def _accelerator_models(items: Any) -> list[str]:
    """``[{variant, models: [...]}, ...]`` as accelerator names (``none`` never listed)."""
    names: list[str] = []
    for item in items if isinstance(items, list) else []:
        models = item.get("models") if isinstance(item, dict) else None
        for model in models if isinstance(models, list) else []:
            if isinstance(model, str) and model.upper() not in names:
                names.append(model.upper())
    return names
