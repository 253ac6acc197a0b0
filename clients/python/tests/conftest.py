"""A stub idgate agent: HTTP/1.1 on a unix socket, answering whois from a dict the test fills."""

from __future__ import annotations

import http.server
import json
import socketserver
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest


def rfc3339(when: datetime) -> str:
    """As the agent writes times: whole seconds, UTC, ``Z``."""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def whois_answer(
    source: str,
    user: str = "alice",
    groups: tuple[str, ...] = ("web", "staff"),
    services: tuple[tuple[str, str], ...] = (("fastapi", "web-users"),),
    ttl: timedelta = timedelta(minutes=30),
) -> dict[str, Any]:
    """A 200 whois answer shaped as the agent's ``SessionView``."""
    now = datetime.now(timezone.utc)
    expires = rfc3339(now + ttl)
    return {
        "source": source,
        "identity_id": 1,
        "user": user,
        "subject": f"sub-{user}",
        "issuer": "https://idp.example/realms/test",
        "groups": list(groups),
        "since": rfc3339(now),
        "token_expires_at": expires,
        "expires_at": expires,
        "services": [
            {
                "service": name,
                "service_id": i + 1,
                "rule": {"id": i + 1, "name": rule},
                "expires_at": expires,
            }
            for i, (name, rule) in enumerate(services)
        ],
    }


class StubAgent:
    """The sessions it knows, the paths it was asked, and a switch to answer garbage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sessions: dict[str, dict[str, Any]] = {}
        self.asked: list[str] = []
        self.raw_answer: bytes | None = None
        self._lock = threading.Lock()

    def answer(self, path: str) -> tuple[int, dict[str, Any]]:
        with self._lock:
            self.asked.append(path)
        if not path.startswith("/v1/whois/"):
            return 404, {"error": "not_found", "reason": "not_found", "description": "unknown"}
        addr = unquote(path[len("/v1/whois/") :])
        if addr in self.sessions:
            return 200, self.sessions[addr]
        return 404, {
            "error": "not_found",
            "reason": "no_session",
            "description": f"no identity is logged in from {addr}",
        }


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _handler(agent: StubAgent) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            if agent.raw_answer is not None:
                self.wfile.write(agent.raw_answer)
                self.close_connection = True
                return
            status, body = agent.answer(self.path)
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def address_string(self) -> str:
            return "unix"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    return Handler


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[StubAgent]:
    """A stub agent serving on ``tmp_path/admin.sock`` for the test's duration."""
    stub = StubAgent(tmp_path / "admin.sock")
    server = _Server(str(stub.path), _handler(stub))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield stub
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
