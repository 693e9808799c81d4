"""Google sign-in for the colab backend: your own OAuth client, ADC, or an access token.

Where the kernel gets its Google access token, first match wins:

1. ``CGPU_GOOGLE_ACCESS_TOKEN`` -- an access token (for CI). It cannot be renewed: it works
   for its lifetime (usually an hour), then Colab refuses it.
2. The credential store written by ``cgpu-kernel auth login``:

   * ``--client-secrets FILE``: the installed-app flow (a loopback redirect on 127.0.0.1) with
     **your own** OAuth client, downloaded from the Google Cloud console. cgpu-kernel ships no
     client id and never borrows another application's. The refresh token is stored.
   * ``--adc``: Application Default Credentials (``gcloud auth application-default login``);
     the store only records that choice.

3. Nothing: an error that says how to sign in.

The store is one JSON file, created with mode 0600 in a 0700 folder: ``CGPU_CREDENTIALS_FILE``
when set, else ``<jupyter data dir>/cgpu-kernel/google-credentials.json``. No token is ever
logged or printed; ``auth status`` says where the credentials come from, never what they are.
The scopes are ``profile``, ``email`` and ``https://www.googleapis.com/auth/colaboratory``.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

from cgpu_kernel import paths
from cgpu_kernel.backends.colab.models import AccessTokens
from cgpu_kernel.exceptions import ColabAuthError, ConfigurationError, RemoteUnreachableError

ACCESS_TOKEN_ENV = "CGPU_GOOGLE_ACCESS_TOKEN"  # noqa: S105 - the variable's name
CREDENTIALS_FILE_ENV = "CGPU_CREDENTIALS_FILE"
COLAB_SCOPE = "https://www.googleapis.com/auth/colaboratory"
SCOPES = ("profile", "email", COLAB_SCOPE)
RELAX_SCOPE_ENV = "OAUTHLIB_RELAX_TOKEN_SCOPE"

SIGN_IN_HINT = (
    "Sign in with `cgpu-kernel auth login --client-secrets CLIENT_SECRETS.json` (your own OAuth"
    f" client) or `cgpu-kernel auth login --adc`, or set {ACCESS_TOKEN_ENV}."
)


def credentials_path() -> Path:
    """Where the credential store lives."""
    configured = os.environ.get(CREDENTIALS_FILE_ENV)
    if configured:
        return Path(configured).expanduser()
    return paths.default_credentials_file()


def save_store(data: dict[str, Any], path: Path | None = None) -> Path:
    """Write the store atomically, mode 0600 from the first byte (never world-readable)."""
    path = path or credentials_path()
    paths.private_dir(path.parent)
    descriptor, temporary = tempfile.mkstemp(prefix=".credentials-", dir=path.parent)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(data, handle)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    path.chmod(0o600)
    return path


def load_store(path: Path | None = None) -> dict[str, Any] | None:
    """The store's content; None when there is none. Refuses a file others can read."""
    path = path or credentials_path()
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigurationError(f"Cannot read {path}: {exc.strerror}.") from None
    with os.fdopen(descriptor) as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigurationError(
                f"{path} holds your Google credentials but others may read it"
                f" (mode {stat.S_IMODE(mode):o}). Run `chmod 600 {path}`, or sign in again."
            )
        try:
            data = json.load(handle)
        except ValueError:
            raise ConfigurationError(
                f"{path} is not a cgpu-kernel credential store. Remove it with `cgpu-kernel auth"
                " logout` and sign in again."
            ) from None
    return data if isinstance(data, dict) else None


# --- token sources --------------------------------------------------------------------------------


class StaticAccessToken:
    """An access token given from outside (``CGPU_GOOGLE_ACCESS_TOKEN``): not renewable."""

    description = f"the access token in {ACCESS_TOKEN_ENV}"

    def __init__(self, token: str) -> None:
        self._token = token

    def __repr__(self) -> str:
        return "StaticAccessToken(<hidden>)"

    async def access_token(self, *, refresh: bool = False) -> str:
        if refresh:
            raise ColabAuthError(
                f"Google refused the access token in {ACCESS_TOKEN_ENV} (they last about an"
                " hour). Set a fresh one and restart the kernel, or sign in with `cgpu-kernel"
                " auth login` for tokens that renew themselves."
            )
        return self._token


class GoogleCredentialsTokens:
    """Access tokens from google-auth credentials, renewed when expired or refused."""

    def __init__(self, credentials: Any, description: str) -> None:
        self.credentials = credentials
        self.description = description
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"GoogleCredentialsTokens({self.description})"

    async def access_token(self, *, refresh: bool = False) -> str:
        async with self._lock:
            if refresh or not self.credentials.valid:
                await asyncio.to_thread(self._refresh)
            token = self.credentials.token
        if not isinstance(token, str) or not token:
            raise ColabAuthError(f"{self.description} gave no access token. {SIGN_IN_HINT}")
        return token

    def _refresh(self) -> None:
        from google.auth.exceptions import RefreshError, TransportError
        from google.auth.transport.requests import Request

        try:
            self.credentials.refresh(Request())
        except RefreshError:
            raise ColabAuthError(
                f"Google refused to renew {self.description} (revoked, expired, or missing the"
                f" colaboratory scope). {SIGN_IN_HINT}"
            ) from None
        except TransportError as exc:
            raise RemoteUnreachableError(
                f"Could not reach Google to renew {self.description}: {exc}. Check the network."
            ) from None


def _require_google() -> None:
    try:
        import google.auth  # noqa: F401
        import google_auth_oauthlib  # noqa: F401
    except ImportError:
        raise ConfigurationError(
            "The colab backend needs google-auth and google-auth-oauthlib: install them with"
            " `pip install 'cgpu-kernel[colab]'`."
        ) from None


def _adc_credentials() -> Any:
    _require_google()
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, _project = google.auth.default(scopes=list(SCOPES))
    except DefaultCredentialsError:
        raise ConfigurationError(
            "No Application Default Credentials found. Run `gcloud auth application-default"
            " login --scopes=openid,https://www.googleapis.com/auth/userinfo.email,"
            "https://www.googleapis.com/auth/cloud-platform,"
            f"{COLAB_SCOPE}` first, or use `cgpu-kernel auth login --client-secrets FILE`."
        ) from None
    return credentials


def load_tokens(path: Path | None = None) -> AccessTokens:
    """The access-token source the kernel should use (see the module docstring)."""
    given = os.environ.get(ACCESS_TOKEN_ENV, "").strip()
    if given:
        return StaticAccessToken(given)
    store = load_store(path)
    if store is None:
        raise ConfigurationError(f"Not signed in to Google for Colab. {SIGN_IN_HINT}")
    if store.get("type") == "adc":
        return GoogleCredentialsTokens(_adc_credentials(), "Application Default Credentials")
    if store.get("type") == "authorized_user":
        _require_google()
        from google.oauth2.credentials import Credentials

        try:
            credentials = Credentials.from_authorized_user_info(  # type: ignore[no-untyped-call]
                store, scopes=list(SCOPES)
            )
        except ValueError:
            raise ConfigurationError(
                f"The stored Google sign-in is incomplete. {SIGN_IN_HINT}"
            ) from None
        return GoogleCredentialsTokens(credentials, "your stored Google sign-in")
    raise ConfigurationError(f"The credential store has an unknown format. {SIGN_IN_HINT}")


# --- commands -----------------------------------------------------------------------------------


def login(
    client_secrets: str,
    *,
    open_browser: bool = True,
    port: int = 0,
    timeout: float = 600.0,
    path: Path | None = None,
) -> Path:
    """The installed-app flow with the user's own OAuth client; stores the refresh token."""
    _require_google()
    from google_auth_oauthlib.flow import InstalledAppFlow, WSGITimeoutError
    from oauthlib.oauth2.rfc6749.errors import OAuth2Error

    secrets_file = Path(client_secrets).expanduser()
    if not secrets_file.is_file():
        raise ConfigurationError(
            f"{secrets_file} does not exist. Create an OAuth client of type 'Desktop app' in the"
            " Google Cloud console (APIs & Services > Credentials), download its JSON, and pass"
            " that file."
        )
    try:
        flow = InstalledAppFlow.from_client_secrets_file(str(secrets_file), scopes=list(SCOPES))
    except ValueError as exc:
        raise ConfigurationError(
            f"{secrets_file} is not an OAuth client file ({exc}). Download the JSON of a"
            " 'Desktop app' OAuth client from the Google Cloud console."
        ) from None
    # Google answers with the long names of the profile and email scopes; that is no change.
    relax = os.environ.get(RELAX_SCOPE_ENV)
    os.environ[RELAX_SCOPE_ENV] = "1"
    try:
        credentials = flow.run_local_server(
            host="localhost",
            bind_addr="127.0.0.1",
            port=port,
            open_browser=open_browser,
            authorization_prompt_message="Open this URL in a browser to sign in to Google:\n{url}",
            success_message="cgpu-kernel is signed in. You may close this window.",
            timeout_seconds=int(timeout),
        )
    except WSGITimeoutError:
        raise ConfigurationError(
            f"No answer from the browser within {timeout:g} s. Run `cgpu-kernel auth login`"
            " again and finish the sign-in in the browser."
        ) from None
    except OAuth2Error as exc:
        raise ConfigurationError(
            f"Google sign-in failed ({exc.error}). Run `cgpu-kernel auth login` again; check that"
            " your account is a test user of the OAuth consent screen."
        ) from None
    finally:
        if relax is None:
            os.environ.pop(RELAX_SCOPE_ENV, None)
        else:
            os.environ[RELAX_SCOPE_ENV] = relax
    if not getattr(credentials, "refresh_token", None):
        raise ConfigurationError(
            "Google returned no refresh token. Remove cgpu-kernel's access at"
            " https://myaccount.google.com/permissions and sign in again."
        )
    data = json.loads(credentials.to_json(strip=["token", "expiry"]))
    data["type"] = "authorized_user"
    return save_store(data, path)


def login_adc(path: Path | None = None) -> Path:
    """Check that Application Default Credentials work, and record that choice."""
    _adc_credentials()
    return save_store({"type": "adc"}, path)


def logout(path: Path | None = None) -> bool:
    """Forget the stored sign-in; True when there was one."""
    path = path or credentials_path()
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def status(path: Path | None = None) -> dict[str, str]:
    """Where the credentials would come from, without a single secret."""
    path = path or credentials_path()
    if os.environ.get(ACCESS_TOKEN_ENV, "").strip():
        return {"source": "environment", "detail": f"{ACCESS_TOKEN_ENV} is set (not shown)"}
    try:
        store = load_store(path)
    except ConfigurationError as exc:
        return {"source": "error", "detail": str(exc)}
    if store is None:
        return {"source": "none", "detail": f"Not signed in. {SIGN_IN_HINT}"}
    mode = f"{stat.S_IMODE(path.stat().st_mode):o}"
    if store.get("type") == "adc":
        return {"source": "adc", "detail": "Application Default Credentials", "file": str(path)}
    client_id = str(store.get("client_id", ""))
    return {
        "source": "stored",
        "detail": f"signed in with your OAuth client {client_id.partition('.')[0][-12:]}...",
        "file": f"{path} (mode {mode})",
    }
