"""The whois client and its cache, against a stub agent on a real unix socket."""

from __future__ import annotations

import re
import socket
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
import pytest

from conftest import StubAgent, whois_answer
from idgate_fastapi import AgentUnavailable, BadAddress, WhoisCache, WhoisClient
from idgate_fastapi.whois import _parse_http, canonical_address, parse_identity


def test_a_known_address_gives_its_identity_blocking_and_async(agent: StubAgent) -> None:
    agent.sessions["192.0.2.2"] = whois_answer("192.0.2.2", groups=("web", "staff"))
    client = WhoisClient(str(agent.path))
    for who in (client.whois("192.0.2.2"), anyio.run(client.awhois, "192.0.2.2")):
        assert who is not None
        assert who.user == "alice"
        assert who.subject == "sub-alice"
        assert who.groups == ("web", "staff")
        assert who.issuer == "https://idp.example/realms/test"
        assert who.services[0].service == "fastapi"
        assert who.services[0].rule == "web-users"
        assert who.expires_at > datetime.now(timezone.utc)
        assert who.in_groups("web", "staff") and not who.in_groups("ops")
    assert agent.asked == ["/v1/whois/192.0.2.2"] * 2


def test_nobody_is_none(agent: StubAgent) -> None:
    client = WhoisClient(str(agent.path))
    assert client.whois("192.0.2.9") is None
    assert anyio.run(client.awhois, "192.0.2.9") is None


def test_addresses_are_asked_as_the_agent_keys_them(agent: StubAgent) -> None:
    agent.sessions["192.0.2.2"] = whois_answer("192.0.2.2")
    agent.sessions["2001:db8::2"] = whois_answer("2001:db8::2", user="bob")
    client = WhoisClient(str(agent.path))
    # A dual-stack listener sees IPv4 peers as IPv4-mapped IPv6.
    assert client.whois("::ffff:192.0.2.2").user == "alice"
    assert anyio.run(client.awhois, "2001:DB8:0::2").user == "bob"
    assert agent.asked == ["/v1/whois/192.0.2.2", "/v1/whois/2001%3Adb8%3A%3A2"]
    assert canonical_address("[2001:db8::2]") == "2001:db8::2"


def test_a_non_ip_peer_is_refused_before_asking(agent: StubAgent) -> None:
    client = WhoisClient(str(agent.path))
    with pytest.raises(BadAddress, match="testclient"):
        client.whois("testclient")
    assert agent.asked == []


def test_a_missing_socket_says_so(tmp_path: Path) -> None:
    client = WhoisClient(str(tmp_path / "nothing.sock"))
    for call in (lambda: client.whois("192.0.2.2"), lambda: anyio.run(client.awhois, "192.0.2.2")):
        with pytest.raises(AgentUnavailable) as e:
            call()
        assert e.value.reason == "no socket"
        assert "nothing.sock" in str(e.value) and "is idgate running" in str(e.value)


def test_a_stale_socket_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bound.bind(str(path))  # bound, never listening: connect() is refused
    try:
        client = WhoisClient(str(path))
        for call in (
            lambda: client.whois("192.0.2.2"),
            lambda: anyio.run(client.awhois, "192.0.2.2"),
        ):
            with pytest.raises(AgentUnavailable) as e:
                call()
            assert e.value.reason == "connection refused"
    finally:
        bound.close()


def test_an_agent_that_never_answers_times_out(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(8)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        mute.settimeout(0.05)
        while not done.is_set():
            try:
                held.append(mute.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        client = WhoisClient(str(path), timeout=0.2)
        for call in (
            lambda: client.whois("192.0.2.2"),
            lambda: anyio.run(client.awhois, "192.0.2.2"),
        ):
            with pytest.raises(AgentUnavailable) as e:
                call()
            assert e.value.reason == "no answer within 0.2 s"
    finally:
        done.set()
        thread.join()
        for s in held:
            s.close()
        mute.close()


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"HTTP/1.1 500 Oops\r\nContent-Length: 2\r\n\r\nno", "not JSON"),
        (
            b"HTTP/1.1 500 Oops\r\nContent-Length: 46\r\n\r\n"
            b'{"reason":"internal","description":"it broke"}',
            re.escape("answered 500 (internal: it broke)"),
        ),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"user": 1}', "unexpected whois"),
        (b"SSH-2.0-OpenSSH\r\n\r\n", "not an HTTP"),
    ],
)
def test_a_nonsensical_answer_is_an_unavailable_agent(
    agent: StubAgent, raw: bytes, reason: str
) -> None:
    agent.raw_answer = raw
    client = WhoisClient(str(agent.path))
    for call in (lambda: client.whois("192.0.2.2"), lambda: anyio.run(client.awhois, "192.0.2.2")):
        with pytest.raises(AgentUnavailable, match=reason):
            call()


def test_chunked_answers_are_read() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert _parse_http(raw) == (200, b"abcde")
    with pytest.raises(ValueError):
        _parse_http(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        WhoisClient("/x", timeout=0)
    with pytest.raises(ValueError):
        WhoisCache(ttl=-1)
    with pytest.raises(ValueError):
        WhoisCache(max_entries=0)


def test_the_default_socket_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IDGATE_WHOIS_SOCKET", raising=False)
    assert WhoisClient().socket_path == "/run/idgate/whois.sock"
    monkeypatch.setenv("IDGATE_WHOIS_SOCKET", "/tmp/elsewhere.sock")
    assert WhoisClient().socket_path == "/tmp/elsewhere.sock"
    assert WhoisClient("/given.sock").socket_path == "/given.sock"


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_cache_keeps_identities_for_their_ttl_only() -> None:
    clock = FakeClock()
    cache = WhoisCache(ttl=2.0, clock=clock)
    alice = parse_identity(whois_answer("192.0.2.2"))
    cache.put("192.0.2.2", alice)
    assert cache.get("192.0.2.2") == (True, alice)
    clock.now += 1.9
    assert cache.get("192.0.2.2") == (True, alice)
    clock.now += 0.2
    assert cache.get("192.0.2.2") == (False, None)
    assert len(cache) == 0


def test_nobody_is_not_cached_unless_asked() -> None:
    clock = FakeClock()
    cache = WhoisCache(clock=clock)
    cache.put("192.0.2.9", None)
    assert cache.get("192.0.2.9") == (False, None)
    short = WhoisCache(negative_ttl=0.5, clock=clock)
    short.put("192.0.2.9", None)
    assert short.get("192.0.2.9") == (True, None)
    clock.now += 0.5
    assert short.get("192.0.2.9") == (False, None)


def test_an_expired_identity_is_not_served_from_the_cache() -> None:
    cache = WhoisCache(ttl=60)
    gone = parse_identity(whois_answer("192.0.2.2", ttl=timedelta(seconds=-1)))
    cache.put("192.0.2.2", gone)
    assert cache.get("192.0.2.2") == (False, None)


def test_the_cache_is_bounded_and_drops_the_least_recently_used() -> None:
    cache = WhoisCache(max_entries=2)
    ids = {a: parse_identity(whois_answer(a)) for a in ("192.0.2.1", "192.0.2.2", "192.0.2.3")}
    cache.put("192.0.2.1", ids["192.0.2.1"])
    cache.put("192.0.2.2", ids["192.0.2.2"])
    assert cache.get("192.0.2.1")[0]  # now the most recently used
    cache.put("192.0.2.3", ids["192.0.2.3"])
    assert len(cache) == 2
    assert cache.get("192.0.2.2") == (False, None)
    assert cache.get("192.0.2.1")[0] and cache.get("192.0.2.3")[0]


def test_the_view_of_one_service() -> None:
    both = parse_identity(
        whois_answer("192.0.2.2", services=(("fastapi", "web-users"), ("ssh", "ops-ssh")))
    )
    assert both.service is None and both.rule is None
    assert both.for_service(None) is both
    ssh = both.for_service("ssh")
    assert ssh is not None and (ssh.service, ssh.rule) == ("ssh", "ops-ssh")
    assert both.for_service("db") is None
    one = parse_identity(whois_answer("192.0.2.2"))
    only = one.for_service(None)
    assert only is not None and (only.service, only.rule) == ("fastapi", "web-users")
