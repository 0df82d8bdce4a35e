"""`gradmon dashboards push` against a fake Grafana: a real HTTP server on port 0 that
answers the endpoints grafana-client calls and records every request."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from gradmon import GradmonError
from gradmon.ops.dashboards import DASHBOARD_FILES
from gradmon.ops.grafana_push import push_dashboards, resolve_auth
from gradmon.tools.cli import main as cli_main

TOKEN = "glsa_secret-token-value"
PASSWORD = "pa55-word-secret"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    authorization: str | None
    body: Any


@dataclass
class FakeGrafana:
    """What Grafana's HTTP API does for a push, in memory."""

    accept: set[str] | None = None  # Authorization headers let in; None: any
    deny_writes: bool = False  # 403 on writes (a Viewer's token)
    folders: dict[str, str] = field(default_factory=dict)  # uid -> title
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> saved
    requests: list[Request] = field(default_factory=list)

    def handle(self, req: Request) -> tuple[int, Any]:
        self.requests.append(req)
        if self.accept is not None and req.authorization not in self.accept:
            return 401, {"message": "Unauthorized"}
        if req.method == "GET" and req.path == "/api/frontend/settings":
            return 200, {"buildInfo": {"version": "11.6.2"}}
        if req.method == "GET" and req.path == "/api/search":
            text = req.query.get("query", [""])[0].lower()
            return 200, [
                {"uid": uid, "title": title, "type": "dash-folder"}
                for uid, title in self.folders.items()
                if text in title.lower() and req.query.get("type") == ["dash-folder"]
            ]
        if req.method == "POST" and self.deny_writes:
            return 403, {"message": "Access denied"}
        if req.method == "POST" and req.path == "/api/folders":
            uid = f"folder{len(self.folders) + 1}"
            self.folders[uid] = req.body["title"]
            return 200, {"id": len(self.folders), "uid": uid, "title": req.body["title"]}
        if req.method == "POST" and req.path == "/api/dashboards/db":
            dash = req.body["dashboard"]
            old = self.dashboards.get(dash["uid"])
            if old is not None and not req.body.get("overwrite"):
                return 412, {"message": "A dashboard with the same uid already exists"}
            version = (old["version"] + 1) if old else 1
            self.dashboards[dash["uid"]] = {**dash, "version": version}
            return 200, {
                "id": 7,
                "uid": dash["uid"],
                "url": f"/d/{dash['uid']}/slug",
                "status": "success",
                "version": version,
            }
        return 404, {"message": "Not found"}

    def posts(self, path: str) -> list[Request]:
        return [r for r in self.requests if r.method == "POST" and r.path == path]


@pytest.fixture
def grafana() -> Iterator[tuple[FakeGrafana, str]]:
    fake = FakeGrafana()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            status, answer = fake.handle(
                Request(
                    self.command,
                    parts.path,
                    parse_qs(parts.query),
                    self.headers.get("Authorization"),
                    json.loads(raw) if raw else None,
                )
            )
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GRAFANA_TOKEN", raising=False)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])  # closed on exit: nothing listens there


# ------------------------------------------------------------------ pushing
def test_push_creates_the_folder_and_saves_every_dashboard(
    grafana: tuple[FakeGrafana, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, url = grafana
    argv = ["dashboards", "push", "--url", url, "--token", TOKEN, "--folder", "ML training"]
    assert cli_main(argv) == 0
    calls = [(r.method, r.path) for r in fake.requests]
    assert calls == [
        ("GET", "/api/frontend/settings"),  # grafana-client's health check
        ("GET", "/api/search"),  # the folder, looked up by title
        ("POST", "/api/folders"),
        ("POST", "/api/dashboards/db"),
        ("POST", "/api/dashboards/db"),
    ]
    assert {r.authorization for r in fake.requests} == {f"Bearer {TOKEN}"}
    search = fake.requests[1]
    assert search.query == {"query": ["ML training"], "type": ["dash-folder"]}
    assert fake.posts("/api/folders")[0].body == {"title": "ML training"}
    (folder_uid,) = fake.folders
    saves = fake.posts("/api/dashboards/db")
    assert sorted(r.body["dashboard"]["uid"] for r in saves) == sorted(DASHBOARD_FILES)
    for r in saves:
        assert r.body["overwrite"] is True
        assert r.body["folderUid"] == folder_uid
        assert r.body["dashboard"]["id"] is None  # matched by uid
        assert r.body["dashboard"]["panels"] and r.body["dashboard"]["templating"]
    out = capsys.readouterr().out
    for uid in DASHBOARD_FILES:
        assert f"pushed {uid} (version 1): {url}/d/{uid}/slug" in out
    assert TOKEN not in out


def test_push_twice_overwrites_and_reuses_the_folder(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    argv = ["dashboards", "push", "--url", url, "--token", TOKEN, "--folder", "gradmon"]
    assert cli_main(argv) == 0
    assert cli_main(argv) == 0
    assert len(fake.posts("/api/folders")) == 1
    saves = fake.posts("/api/dashboards/db")
    assert len(saves) == 2 * len(DASHBOARD_FILES)
    assert all(r.body["overwrite"] is True for r in saves)
    (folder_uid,) = fake.folders
    assert {r.body["folderUid"] for r in saves} == {folder_uid}
    assert {uid: d["version"] for uid, d in fake.dashboards.items()} == {
        uid: 2 for uid in DASHBOARD_FILES
    }


def test_an_existing_folder_is_found_by_exact_title(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    fake.folders.update({"other": "gradmon old", "mine": "gradmon"})
    auth = resolve_auth(url, token=TOKEN)
    results = push_dashboards(url, auth=auth, dashboards={"u": {"uid": "u"}}, folder="gradmon")
    assert not fake.posts("/api/folders")
    assert fake.posts("/api/dashboards/db")[0].body["folderUid"] == "mine"
    assert results[0].folder_uid == "mine" and results[0].version == 1


def test_without_folder_the_dashboards_go_to_general(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    push_dashboards(url, auth=resolve_auth(url), dashboards={"u": {"uid": "u"}})
    assert [r.path for r in fake.requests] == ["/api/frontend/settings", "/api/dashboards/db"]
    assert "folderUid" not in fake.requests[1].body
    assert fake.requests[1].authorization is None


def test_basic_auth(grafana: tuple[FakeGrafana, str]) -> None:
    fake, url = grafana
    fake.accept = {basic("admin", PASSWORD)}
    assert cli_main(["dashboards", "push", "--url", url, "--basic-auth", f"admin:{PASSWORD}"]) == 0
    assert {r.authorization for r in fake.requests} == {basic("admin", PASSWORD)}


def test_token_from_the_environment(
    grafana: tuple[FakeGrafana, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, url = grafana
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    fake.accept = {f"Bearer {TOKEN}"}
    assert cli_main(["dashboards", "push", "--url", url]) == 0
    # --basic-auth wins over the environment's token.
    fake.accept = {basic("admin", PASSWORD)}
    assert cli_main(["dashboards", "push", "--url", url, "--basic-auth", f"admin:{PASSWORD}"]) == 0


def test_credentials_in_the_url_are_used_and_never_shown(
    grafana: tuple[FakeGrafana, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, url = grafana
    fake.accept = {basic("admin", PASSWORD)}
    with_creds = url.replace("http://", f"http://admin:{PASSWORD}@") + "/"
    assert cli_main(["dashboards", "push", "--url", with_creds]) == 0
    assert PASSWORD not in capsys.readouterr().out
    fake.accept = {"nobody"}
    assert cli_main(["dashboards", "push", "--url", with_creds]) == 2
    err = capsys.readouterr().err
    assert "basic auth as user 'admin' from --url" in err and PASSWORD not in err


# ------------------------------------------------------------------ errors
def test_bad_token_is_a_clear_error_without_the_token(
    grafana: tuple[FakeGrafana, str], capsys: pytest.CaptureFixture[str]
) -> None:
    fake, url = grafana
    fake.accept = {"Bearer the-right-one"}
    assert cli_main(["dashboards", "push", "--url", url, "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and url in err and "the API token from --token" in err
    assert TOKEN not in err
    assert not fake.posts("/api/dashboards/db")


def test_bad_env_token_names_the_variable(
    grafana: tuple[FakeGrafana, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake, url = grafana
    fake.accept = {"Bearer the-right-one"}
    monkeypatch.setenv("GRAFANA_TOKEN", TOKEN)
    with pytest.raises(GradmonError, match=r"\$GRAFANA_TOKEN \(HTTP 401") as info:
        push_dashboards(url, auth=resolve_auth(url), dashboards={"u": {"uid": "u"}})
    assert TOKEN not in str(info.value)


def test_forbidden_writes_name_the_user_not_the_password(
    grafana: tuple[FakeGrafana, str],
) -> None:
    fake, url = grafana
    fake.deny_writes = True
    auth = resolve_auth(url, basic_auth=f"viewer:{PASSWORD}")
    with pytest.raises(GradmonError, match="HTTP 403") as info:
        push_dashboards(url, auth=auth, dashboards={"u": {"uid": "u"}}, folder="gradmon")
    message = str(info.value)
    assert "basic auth as user 'viewer'" in message and "Editor" in message
    assert PASSWORD not in message


def test_connection_refused_names_the_url(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    assert cli_main(["dashboards", "push", "--url", url, "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach Grafana at {url}" in err and "connection refused" in err
    assert TOKEN not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--url", "localhost:3000"], "http:// or https://"),
        (["--url", "http://h:99999"], "not a valid URL"),
        (["--url", "http://h", "--basic-auth", "no-colon"], "USER:PASSWORD"),
        (["--url", "http://h", "--token", ""], "--token is empty"),
    ],
)
def test_bad_arguments_fail_before_any_request(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["dashboards", "push", *argv]) == 2
    assert message in capsys.readouterr().err


def test_token_and_basic_auth_are_exclusive() -> None:
    with pytest.raises(SystemExit):
        cli_main(["dashboards", "push", "--url", "http://h", "--token", "t", "--basic-auth", "a:b"])
