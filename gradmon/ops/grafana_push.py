"""Push gradmon's dashboards to a running Grafana over its HTTP API, with grafana-client.

Idempotent: each dashboard is saved under its fixed uid with `overwrite: true`, and the
folder is looked up by title before it is created. Credentials never appear in a message
or a log line: errors say *which* authentication was used, not its value.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import SplitResult, urlsplit

from gradmon.errors import GradmonError

__all__ = ["TOKEN_ENV", "Auth", "PushResult", "push_dashboards", "resolve_auth"]

TOKEN_ENV = "GRAFANA_TOKEN"


@dataclass(frozen=True)
class Auth:
    """A credential for grafana-client and how to name it in messages (never its value)."""

    credential: str | tuple[str, str] | None  # token, (user, password), or none
    description: str
    secrets: tuple[str, ...] = ()  # scrubbed from every message, just in case


@dataclass(frozen=True)
class PushResult:
    uid: str
    url: str  # the dashboard's address in Grafana
    version: int | None
    folder_uid: str | None


def resolve_auth(
    url: str,
    *,
    token: str | None = None,
    basic_auth: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Auth:
    """--token, else --basic-auth USER:PASS, else $GRAFANA_TOKEN, else user:pass@ in --url."""
    if token is not None and basic_auth is not None:
        raise GradmonError("--token and --basic-auth: pass one of them, not both")
    if token is not None:
        if not token:
            raise GradmonError("--token is empty; pass a Grafana service account token")
        return Auth(token, "the API token from --token", (token,))
    if basic_auth is not None:
        user, sep, password = basic_auth.partition(":")
        if not sep or not user:
            raise GradmonError("--basic-auth must be USER:PASSWORD (the value is not shown)")
        return Auth((user, password), f"basic auth as user {user!r} (--basic-auth)", (password,))
    env_token = (os.environ if env is None else env).get(TOKEN_ENV)
    if env_token:
        return Auth(env_token, f"the API token from ${TOKEN_ENV}", (env_token,))
    parts = urlsplit(url)
    if parts.username:
        password = parts.password or ""
        return Auth(
            (parts.username, password),
            f"basic auth as user {parts.username!r} from --url",
            (password,) if password else (),
        )
    return Auth(None, f"no credentials (pass --token, --basic-auth or set ${TOKEN_ENV})")


def _parse_url(url: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise GradmonError(f"--url {_redact(url)!r} is not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise GradmonError(
            f"--url {_redact(url)!r} must be an http:// or https:// URL of Grafana, "
            "e.g. http://localhost:3000"
        )
    return parts


def _redact(url: str) -> str:
    """The URL without user:password@, for messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.username is None and parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=host).geturl()


def push_dashboards(
    url: str,
    *,
    auth: Auth,
    dashboards: Mapping[str, Mapping[str, Any]],
    folder: str | None = None,
    timeout: float = 10.0,
) -> list[PushResult]:
    """Save `dashboards` (uid -> dashboard JSON) in Grafana at `url`, in `folder` (by title;
    created when missing; None: the General folder), overwriting the same uids."""
    try:
        import niquests  # noqa: F401  (grafana-client's HTTP library: part of the check)
        from grafana_client.api import GrafanaApi
    except ImportError as exc:
        raise GradmonError(
            "gradmon dashboards push needs grafana-client: pip install 'gradmon[grafana]'"
        ) from exc

    parts = _parse_url(url)
    shown = _redact(url).rstrip("/")
    prefix = parts.path.strip("/")
    # grafana-client joins "<prefix>api": a sub-path needs its trailing slash.
    api: Any = GrafanaApi(
        auth=auth.credential,
        host=parts.hostname,
        port=parts.port,
        url_path_prefix=f"{prefix}/" if prefix else "",
        protocol=parts.scheme,
        timeout=timeout,
    )

    call = _caller(shown, auth, timeout)
    # Reachable, and a Grafana: fails early with the URL before anything is written.
    call("the health check (GET /api/frontend/settings)", api.health.check)
    folder_uid = None
    if folder:
        folder_uid = _folder_uid(api, folder, call)
    results = []
    for uid, dashboard in dashboards.items():
        body = {
            "dashboard": {**dashboard, "id": None},  # matched by uid, never by a numeric id
            "overwrite": True,
            "message": "gradmon dashboards push",
        }
        if folder_uid is not None:
            body["folderUid"] = folder_uid
        answer = call(f"saving dashboard {uid!r}", api.dashboard.update_dashboard, body)
        path = answer.get("url", f"/d/{uid}") if isinstance(answer, dict) else f"/d/{uid}"
        version = answer.get("version") if isinstance(answer, dict) else None
        results.append(PushResult(uid, shown + path, version, folder_uid))
    return results


def _caller(shown: str, auth: Auth, timeout: float) -> Callable[..., Any]:
    """`call(what, fn, *args)`: fn(*args), with Grafana's and the network's failures as a
    GradmonError that names the URL, the request and what to check (secrets scrubbed)."""
    import niquests
    from grafana_client.client import GrafanaException, GrafanaTimeoutError

    def scrub(text: str) -> str:
        for secret in auth.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

    def call(what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except GrafanaTimeoutError:
            raise GradmonError(
                f"Grafana at {shown} did not answer {what} within {timeout:g} s"
            ) from None
        except GrafanaException as exc:
            raise GradmonError(scrub(_refusal(shown, auth, what, exc))) from None
        except niquests.exceptions.RequestException as exc:
            reason = "connection refused" if "refused" in str(exc).lower() else str(exc)
            raise GradmonError(
                scrub(f"cannot reach Grafana at {shown} ({what}): {reason}; is it running?")
            ) from None

    return call


def _refusal(shown: str, auth: Auth, what: str, exc: Any) -> str:
    """What an HTTP error from Grafana means for the user."""
    status = exc.status_code
    if status == 401:
        return (
            f"Grafana at {shown} rejected {auth.description} (HTTP 401 on {what}): "
            "check the token or user and password"
        )
    if status == 403:
        return (
            f"Grafana at {shown} denied {what} to {auth.description} (HTTP 403): "
            "the credential needs the Editor role (or dashboards:write and folders:create)"
        )
    return f"Grafana at {shown} answered {what} with HTTP {status}: {exc.message}"


def _folder_uid(api: Any, title: str, call: Callable[..., Any]) -> str:
    """The uid of the folder titled `title`, created when there is none."""
    hits = call(
        f"the folder search for {title!r}",
        api.search.search_dashboards,
        query=title,
        type_="dash-folder",
    )
    matches = [h for h in hits or [] if h.get("title") == title and h.get("uid")]
    # Prefer a top-level folder when nested folders share the title.
    matches.sort(key=lambda h: bool(h.get("folderUid")))
    if matches:
        return str(matches[0]["uid"])
    created = call(f"creating folder {title!r}", api.folder.create_folder, title)
    return str(created["uid"])
