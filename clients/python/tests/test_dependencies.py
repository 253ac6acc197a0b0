"""The FastAPI dependencies, in a real FastAPI app, against a stub agent on a unix socket."""

from __future__ import annotations

import warnings
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi import Depends, FastAPI

from conftest import StubAgent, whois_answer
from idgate_fastapi import Identity, Idgate

with warnings.catch_warnings():
    # Starlette announces a move of its test client to another package; the client still works.
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

PEER = "192.0.2.2"


def make_app(idgate: Idgate) -> FastAPI:
    app = FastAPI()

    @app.get("/me")
    async def me(who: Identity = Depends(idgate.identity)) -> Identity:
        return who

    @app.get("/staff")
    async def staff(who: Identity = Depends(idgate.require_groups("staff"))) -> dict[str, str]:
        return {"welcome": who.user}

    @app.get("/ops", dependencies=[Depends(idgate.require_groups("ops"))])
    async def ops() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/sync")
    def sync_route(who: Identity = Depends(idgate.identity)) -> dict[str, str]:
        return {"user": who.user}

    return app


def client_for(idgate: Idgate, peer: str = PEER) -> TestClient:
    return TestClient(make_app(idgate), client=(peer, 50000))


def test_a_logged_in_peer_gets_its_identity(agent: StubAgent) -> None:
    agent.sessions[PEER] = whois_answer(PEER, groups=("web", "staff"))
    client = client_for(Idgate(str(agent.path)))
    resp = client.get("/me")
    assert resp.status_code == 200, resp.text
    me = resp.json()
    assert me["user"] == "alice"
    assert me["groups"] == ["web", "staff"]
    assert me["issuer"] == "https://idp.example/realms/test"
    assert (me["service"], me["rule"]) == ("fastapi", "web-users")
    assert me["expires_at"].startswith("20")
    assert client.get("/sync").json() == {"user": "alice"}


def test_groups_gate_routes(agent: StubAgent) -> None:
    agent.sessions[PEER] = whois_answer(PEER, groups=("web", "staff"))
    client = client_for(Idgate(str(agent.path)))
    assert client.get("/staff").json() == {"welcome": "alice"}
    resp = client.get("/ops")
    assert resp.status_code == 403
    assert resp.json()["detail"] == "alice is not in the group(s) ops"


def test_nobody_logged_in_gets_401_with_a_challenge(agent: StubAgent) -> None:
    client = client_for(Idgate(str(agent.path)))
    for path in ("/me", "/staff", "/ops"):
        resp = client.get(path)
        assert resp.status_code == 401, path
        assert resp.headers["www-authenticate"] == 'Bearer realm="idgate"'
        assert "no idgate session from 192.0.2.2" in resp.json()["detail"]


def test_a_peer_without_an_ip_gets_401(agent: StubAgent) -> None:
    client = client_for(Idgate(str(agent.path)), peer="testclient")
    resp = client.get("/me")
    assert resp.status_code == 401
    assert "not an IP address" in resp.json()["detail"]
    assert agent.asked == []


def test_an_unreachable_agent_gives_503_and_a_clear_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = client_for(Idgate(str(tmp_path / "absent.sock")))
    with caplog.at_level("WARNING", logger="idgate_fastapi"):
        resp = client.get("/me")
    assert resp.status_code == 503
    assert resp.json()["detail"] == "idgate agent unreachable: no socket"
    # The path is in the log, not in the answer to the peer.
    assert "absent.sock" not in resp.text
    assert "absent.sock: no socket (is idgate running?" in caplog.text


def test_identities_are_cached_and_a_fresh_login_is_seen_at_once(agent: StubAgent) -> None:
    client = client_for(Idgate(str(agent.path), ttl=60))
    assert client.get("/me").status_code == 401
    agent.sessions[PEER] = whois_answer(PEER)  # the peer logs in
    assert client.get("/me").status_code == 200
    assert client.get("/staff").status_code == 200
    assert agent.asked == [f"/v1/whois/{PEER}"] * 2


def test_an_expired_session_is_not_an_identity(agent: StubAgent) -> None:
    agent.sessions[PEER] = whois_answer(PEER, ttl=timedelta(seconds=-5))
    resp = client_for(Idgate(str(agent.path))).get("/me")
    assert resp.status_code == 401


def test_the_service_picks_the_grant_and_requires_one(agent: StubAgent) -> None:
    agent.sessions[PEER] = whois_answer(
        PEER, services=(("fastapi", "web-users"), ("ssh", "ops-ssh"))
    )
    me = client_for(Idgate(str(agent.path), service="ssh")).get("/me").json()
    assert (me["service"], me["rule"]) == ("ssh", "ops-ssh")
    assert len(me["services"]) == 2
    resp = client_for(Idgate(str(agent.path), service="db")).get("/me")
    assert resp.status_code == 403
    assert resp.json()["detail"] == "alice has no idgate grant for the service 'db'"
    # Unconfigured with two grants: no single rule to name.
    me = client_for(Idgate(str(agent.path), service="")).get("/me").json()
    assert (me["service"], me["rule"]) == (None, None)


def test_the_service_comes_from_the_environment(
    agent: StubAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDGATE_SERVICE", "db")
    monkeypatch.setenv("IDGATE_WHOIS_SOCKET", str(agent.path))
    agent.sessions[PEER] = whois_answer(PEER)
    assert client_for(Idgate()).get("/me").status_code == 403


def test_require_groups_refuses_bad_names_when_the_route_is_declared() -> None:
    idgate = Idgate("/unused.sock")
    for bad in ((), ("",), ("ops", 3)):
        with pytest.raises(ValueError):
            idgate.require_groups(*bad)  # type: ignore[arg-type]


def test_the_module_level_dependencies_read_the_environment(
    agent: StubAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    import idgate_fastapi
    import idgate_fastapi.dependencies as deps

    monkeypatch.setenv("IDGATE_WHOIS_SOCKET", str(agent.path))
    monkeypatch.delenv("IDGATE_SERVICE", raising=False)
    monkeypatch.setattr(deps, "_default", None)
    agent.sessions[PEER] = whois_answer(PEER, groups=("web",))
    app = FastAPI()

    @app.get("/me")
    async def me(who: Identity = Depends(idgate_fastapi.identity)) -> dict[str, str]:
        return {"user": who.user}

    @app.get("/ops", dependencies=[Depends(idgate_fastapi.require_groups("ops"))])
    async def ops() -> None:
        return None

    client = TestClient(app, client=(PEER, 50000))
    assert client.get("/me").json() == {"user": "alice"}
    assert client.get("/ops").status_code == 403
    assert idgate_fastapi.default_idgate().client.socket_path == str(agent.path)


@pytest.mark.parametrize("header", ["X-Forwarded-For", "Forwarded", "X-Real-IP"])
def test_a_request_naming_another_peer_in_a_proxy_header_is_refused(
    agent: StubAgent, header: str
) -> None:
    agent.sessions[PEER] = whois_answer(PEER)
    client = client_for(Idgate(str(agent.path)))
    resp = client.get("/me", headers={header: "192.0.2.77"})
    assert resp.status_code == 403
    assert header.lower() in resp.json()["detail"]
    assert "direct peers only" in resp.json()["detail"]
    assert agent.asked == []
