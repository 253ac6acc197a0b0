"""Asking the local idgate agent who is behind an address.

The agent answers ``GET /v1/whois/{addr}`` on its whois socket (HTTP/1.1 over a unix socket):
200 with the identity and its per-service grants, or 404 when nobody is logged in from there.
:class:`WhoisClient` asks it, blocking or async, and :class:`WhoisCache` keeps answers for a
short time so that a busy route does not ask once per request.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Callable
from urllib.parse import quote

import anyio

#: Where the agent's whois socket is unless configured otherwise (read-only: whois and nothing
#: else, open to every local user; the admin socket also works, for root and its group).
DEFAULT_SOCKET = "/run/idgate/whois.sock"
#: Environment variable naming the socket.
SOCKET_ENV = "IDGATE_WHOIS_SOCKET"

#: The largest answer accepted from the agent (a whois answer is well under a kilobyte).
MAX_ANSWER = 1 << 20


class IdgateError(Exception):
    """Base of this package's errors."""


class AgentUnavailable(IdgateError):
    """The agent could not be asked, or gave an answer that makes no sense.

    ``reason`` is short and names no path (fit for an HTTP answer); ``str()`` has everything.
    """

    def __init__(self, socket_path: str, reason: str, hint: str = "") -> None:
        self.socket_path = socket_path
        self.reason = reason
        self.hint = hint
        text = f"idgate agent at {socket_path}: {reason}"
        super().__init__(f"{text} ({hint})" if hint else text)


class BadAddress(IdgateError, ValueError):
    """The peer address is not an IP address (e.g. the app listens on a unix socket)."""


@dataclass(frozen=True)
class ServiceGrant:
    """One protected service the peer may reach: which rule allowed it and until when."""

    service: str
    service_id: int
    rule: str
    rule_id: int
    expires_at: datetime


@dataclass(frozen=True)
class Identity:
    """The identity idgate verified for a peer address.

    ``service``, ``rule`` and ``expires_at`` describe the grant of the service this app is
    (see ``Idgate(service=...)``); without one configured they come from the peer's only grant,
    and when it has several, ``service`` and ``rule`` are ``None`` and ``expires_at`` is the
    latest expiry. ``services`` always lists every grant.
    """

    address: str
    user: str
    subject: str
    issuer: str
    groups: tuple[str, ...]
    expires_at: datetime
    service: str | None
    rule: str | None
    token_expires_at: datetime
    since: datetime
    services: tuple[ServiceGrant, ...] = field(default=())

    def in_groups(self, *groups: str) -> bool:
        """Whether the identity is in every one of ``groups``."""
        return set(groups) <= set(self.groups)

    def grant(self, service: str) -> ServiceGrant | None:
        """The peer's grant for ``service``, if it has one."""
        return next((g for g in self.services if g.service == service), None)

    def for_service(self, service: str | None) -> Identity | None:
        """This identity seen from ``service``: ``None`` if the peer has no grant for it.

        With ``service=None``, the peer's only grant is taken if it has exactly one.
        """
        if service is None:
            if len(self.services) != 1:
                return self
            grant = self.services[0]
        else:
            found = self.grant(service)
            if found is None:
                return None
            grant = found
        return replace(self, service=grant.service, rule=grant.rule, expires_at=grant.expires_at)

    def expired(self, now: datetime | None = None) -> bool:
        """Whether every grant has expired (the agent will have dropped the session)."""
        return self.expires_at <= (now or datetime.now(timezone.utc))


def canonical_address(host: str) -> str:
    """The address as the agent keys sessions: IPv4-mapped IPv6 becomes IPv4.

    Raises :class:`BadAddress` if ``host`` is not an IP address.
    """
    try:
        addr = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        raise BadAddress(f"{host!r} is not an IP address") from None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _time(value: Any, what: str) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    # Python 3.10's fromisoformat does not take the "Z" suffix the agent writes.
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        raise ValueError(f"{what} has no time zone")
    return parsed


def parse_identity(answer: Any) -> Identity:
    """An :class:`Identity` from the JSON of a 200 whois answer; ``ValueError`` if malformed."""
    if not isinstance(answer, dict):
        raise ValueError("the answer is not a JSON object")
    try:
        groups = answer["groups"]
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError("groups is not a list of strings")
        services = tuple(
            ServiceGrant(
                service=str(s["service"]),
                service_id=int(s["service_id"]),
                rule=str(s["rule"]["name"]),
                rule_id=int(s["rule"]["id"]),
                expires_at=_time(s["expires_at"], "a service's expires_at"),
            )
            for s in answer["services"]
        )
        return Identity(
            address=str(answer["source"]),
            user=str(answer["user"]),
            subject=str(answer["subject"]),
            issuer=str(answer["issuer"]),
            groups=tuple(groups),
            expires_at=_time(answer["expires_at"], "expires_at"),
            service=None,
            rule=None,
            token_expires_at=_time(answer["token_expires_at"], "token_expires_at"),
            since=_time(answer["since"], "since"),
            services=services,
        )
    except (KeyError, TypeError) as e:
        raise ValueError(f"missing or mistyped field: {e}") from None


def _parse_http(raw: bytes) -> tuple[int, bytes]:
    """Status and body of a whole HTTP/1.1 response read to the end of the connection."""
    head, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError("the answer has no end of headers")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP status line: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if len(body) < length:
            raise ValueError("the answer ended early")
        body = body[:length]
    return int(parts[1]), body


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, sep, data = data.partition(b"\r\n")
        if not sep:
            raise ValueError("truncated chunked body")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        if len(data) < size + 2:
            raise ValueError("truncated chunked body")
        out += data[:size]
        data = data[size + 2 :]


class _UnixConnection(http.client.HTTPConnection):
    """``http.client`` over a unix socket."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class WhoisClient:
    """Asks the agent's whois socket ``GET /v1/whois/{addr}``; no caching (see :class:`WhoisCache`).

    Both :meth:`whois` (blocking) and :meth:`awhois` (async, through anyio, so it runs under
    asyncio and trio without blocking the event loop) return the identity or ``None`` when
    nobody is logged in from the address, and raise :class:`AgentUnavailable` when the agent
    cannot answer.
    """

    def __init__(self, socket_path: str | None = None, timeout: float = 1.0) -> None:
        """``socket_path`` defaults to ``$IDGATE_WHOIS_SOCKET``, then ``/run/idgate/whois.sock``."""
        self.socket_path = socket_path or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, not {timeout}")
        self.timeout = timeout

    def _target(self, address: str) -> str:
        return "/v1/whois/" + quote(canonical_address(address), safe="")

    def whois(self, address: str) -> Identity | None:
        """Who is logged in from ``address`` (blocking)."""
        target = self._target(address)
        conn = _UnixConnection(self.socket_path, self.timeout)
        try:
            conn.request("GET", target, headers={"Accept": "application/json"})
            resp = conn.getresponse()
            status, body = resp.status, resp.read(MAX_ANSWER + 1)
        except OSError as e:
            raise self._unreachable(e) from e
        except http.client.HTTPException as e:
            raise AgentUnavailable(self.socket_path, f"not an HTTP answer ({e!r})") from e
        finally:
            conn.close()
        return self._answer(status, body)

    async def awhois(self, address: str) -> Identity | None:
        """Who is logged in from ``address`` (async)."""
        target = self._target(address)
        request = (
            f"GET {target} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        raw = bytearray()
        try:
            with anyio.fail_after(self.timeout):
                async with await anyio.connect_unix(self.socket_path) as stream:
                    await stream.send(request)
                    while len(raw) <= MAX_ANSWER:
                        try:
                            raw += await stream.receive()
                        except anyio.EndOfStream:
                            break
        except TimeoutError as e:
            raise self._unreachable(e) from e
        except (OSError, anyio.BrokenResourceError) as e:
            raise self._unreachable(e) from e
        try:
            status, body = _parse_http(bytes(raw))
        except ValueError as e:
            raise AgentUnavailable(self.socket_path, f"not an HTTP answer ({e})") from e
        return self._answer(status, body)

    def _unreachable(self, e: BaseException) -> AgentUnavailable:
        path = self.socket_path
        if isinstance(e, FileNotFoundError):
            return AgentUnavailable(
                path, "no socket", f"is idgate running? set {SOCKET_ENV} if it listens elsewhere"
            )
        if isinstance(e, ConnectionRefusedError):
            return AgentUnavailable(path, "connection refused", "is idgate running?")
        if isinstance(e, PermissionError):
            return AgentUnavailable(
                path,
                "permission denied",
                "use the whois socket (/run/idgate/whois.sock, open to every local user); the "
                "admin socket is for root and its group only",
            )
        if isinstance(e, TimeoutError):
            return AgentUnavailable(path, f"no answer within {self.timeout:g} s")
        return AgentUnavailable(path, f"connection failed ({e!r})")

    def _answer(self, status: int, body: bytes) -> Identity | None:
        if len(body) > MAX_ANSWER:
            raise AgentUnavailable(self.socket_path, "answer too large")
        try:
            answer = json.loads(body)
        except ValueError:
            raise AgentUnavailable(
                self.socket_path, f"answered {status} with a body that is not JSON"
            ) from None
        if status == 200:
            try:
                return parse_identity(answer)
            except ValueError as e:
                raise AgentUnavailable(self.socket_path, f"unexpected whois answer: {e}") from e
        reason = answer.get("reason") if isinstance(answer, dict) else None
        if status == 404 and reason == "no_session":
            return None
        description = answer.get("description") if isinstance(answer, dict) else None
        raise AgentUnavailable(
            self.socket_path, f"answered {status} ({reason}: {description})"
        )


class WhoisCache:
    """Recent whois answers by address, bounded, thread-safe.

    An identity is kept ``ttl`` seconds (never past its expiry); "nobody" is kept
    ``negative_ttl`` seconds, 0 by default, so that a peer that has just logged in is recognised
    on its next request. Past ``max_entries``, the least recently used entry goes.
    """

    def __init__(
        self,
        ttl: float = 2.0,
        negative_ttl: float = 0.0,
        max_entries: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Bad values (negative times, no room) raise ``ValueError``."""
        if ttl < 0 or negative_ttl < 0:
            raise ValueError("cache times must not be negative")
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Identity | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, address: str) -> tuple[bool, Identity | None]:
        """``(True, answer)`` for a fresh entry, ``(False, None)`` otherwise."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(address)
            if entry is None:
                return False, None
            until, identity = entry
            if now >= until or (identity is not None and identity.expired()):
                del self._entries[address]
                return False, None
            self._entries.move_to_end(address)
            return True, identity

    def put(self, address: str, identity: Identity | None) -> None:
        """Keeps an answer (``None``: nobody) for its time to live."""
        ttl = self.ttl if identity is not None else self.negative_ttl
        if ttl <= 0:
            return
        with self._lock:
            self._entries[address] = (self._clock() + ttl, identity)
            self._entries.move_to_end(address)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forgets everything."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
