"""The client's side of tests/tests/fastapi.rs: run from the client namespace after its login,
against e2e/app.py served by uvicorn on the port idgate protects.

The harness says what to expect through the environment: ``IDGATE_E2E_URL``, ``_USER``,
``_GROUPS`` (comma-separated), ``_ISSUER``, ``_SERVICE``, ``_RULE``, ``_ADDRESS`` (the
client's own address).
"""

from __future__ import annotations

import os
from datetime import datetime, timezone

import httpx
import pytest


@pytest.fixture(scope="module")
def expect() -> dict[str, str]:
    keys = ("URL", "USER", "GROUPS", "ISSUER", "SERVICE", "RULE", "ADDRESS")
    missing = [k for k in keys if not os.environ.get(f"IDGATE_E2E_{k}")]
    if missing:
        pytest.fail(
            "run by tests/tests/fastapi.rs behind a live idgate; missing "
            + ", ".join(f"IDGATE_E2E_{k}" for k in missing)
        )
    return {k.lower(): os.environ[f"IDGATE_E2E_{k}"] for k in keys}


@pytest.fixture(scope="module")
def api(expect: dict[str, str]) -> httpx.Client:
    with httpx.Client(base_url=expect["url"], timeout=10, trust_env=False) as client:
        yield client


def test_me_is_the_identity_idgate_verified(api: httpx.Client, expect: dict[str, str]) -> None:
    resp = api.get("/me")
    assert resp.status_code == 200, resp.text
    me = resp.json()
    assert me["user"] == expect["user"]
    assert sorted(me["groups"]) == sorted(expect["groups"].split(","))
    assert me["issuer"] == expect["issuer"]
    assert me["service"] == expect["service"]
    assert me["rule"] == expect["rule"]
    expires = datetime.fromisoformat(me["expires_at"].replace("Z", "+00:00"))
    assert expires > datetime.now(timezone.utc)
    assert me["address"] == expect["address"]


def test_a_group_the_caller_has_opens_its_route(api: httpx.Client, expect: dict[str, str]) -> None:
    resp = api.get("/staff")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"welcome": expect["user"]}


def test_a_group_the_caller_lacks_answers_403(api: httpx.Client, expect: dict[str, str]) -> None:
    resp = api.get("/ops")
    assert resp.status_code == 403, resp.text
    assert resp.json()["detail"] == f"{expect['user']} is not in the group(s) ops"
    # Both needed: the one it lacks is named.
    resp = api.get("/staff-and-ops")
    assert resp.status_code == 403, resp.text
    assert resp.json()["detail"] == f"{expect['user']} is not in the group(s) ops"
