"""FastAPI dependencies: the verified identity of the request's peer, and group checks.

The peer is ``request.client.host``, the address the TCP connection comes from. idgate lets a
flow through by its source address, so this is the address it knows; behind a reverse proxy it
would be the proxy's, and every request would carry the proxy's identity (or none). Serve the
app directly on the protected port. A request carrying ``Forwarded``, ``X-Forwarded-For`` or
``X-Real-IP`` is refused (403): servers rewrite ``request.client`` from them (uvicorn does by
default for requests from loopback), which would let any local process claim any peer.

Answers when the identity cannot be given:

- 401 (``WWW-Authenticate: Bearer realm="idgate"``) when nobody is logged in from the peer:
  the remedy is to authenticate, by presenting a token to idgate's session endpoint; 401 is the
  status that says "authenticate and try again", and the challenge names the realm of idgate's
  own endpoint. On a port idgate protects, such a peer cannot even connect; this answer is for
  an unprotected port, or a session revoked between two requests of a kept-alive connection.
- 403 when the peer is known but has no grant for this app's service (``service=``), or lacks
  a group a route requires, or the request carries a proxy header: authenticating again would
  not help.
- 503 when the agent cannot be asked (not running, socket elsewhere, no permission): the log
  says exactly why, the answer says which of these it is.
"""

from __future__ import annotations

import logging
import os
from typing import Awaitable, Callable

from fastapi import Depends, HTTPException, Request, status

from .whois import (
    AgentUnavailable,
    BadAddress,
    Identity,
    WhoisCache,
    WhoisClient,
    canonical_address,
)

#: Environment variable naming the idgate service this app is (the ``[[services]]`` name).
SERVICE_ENV = "IDGATE_SERVICE"
#: Headers that say the request came through a proxy; a request carrying one is refused (403).
FORWARDING_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")
#: The challenge of a 401: the same realm idgate's session endpoint uses.
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="idgate"'}

log = logging.getLogger("idgate_fastapi")


class Idgate:
    """The agent's whois, cached, as FastAPI dependencies.

    ``Depends(idgate.identity)`` gives a route the peer's :class:`Identity`;
    ``Depends(idgate.require_groups("ops"))`` does too, and answers 403 unless it is in every
    group named.
    """

    def __init__(
        self,
        socket_path: str | None = None,
        *,
        service: str | None = None,
        ttl: float = 2.0,
        negative_ttl: float = 0.0,
        max_entries: int = 4096,
        timeout: float = 1.0,
    ) -> None:
        """Settings not given come from the environment.

        ``socket_path``: the agent's whois socket (``$IDGATE_WHOIS_SOCKET``, else
        ``/run/idgate/whois.sock``). ``service``: the idgate service this app is
        (``$IDGATE_SERVICE``; ``""``: none); when set, a peer must hold a grant for it, and the identity's
        rule and expiry are that grant's. ``ttl``/``negative_ttl``: how long an identity, and an
        answer of "nobody", are cached (seconds). ``timeout``: for one question to the agent.
        """
        self.client = WhoisClient(socket_path, timeout=timeout)
        self.cache = WhoisCache(ttl=ttl, negative_ttl=negative_ttl, max_entries=max_entries)
        # "" means no service, even if the environment names one.
        self.service = (service if service is not None else os.environ.get(SERVICE_ENV)) or None

    async def lookup(self, address: str) -> Identity | None:
        """Who is logged in from ``address``, through the cache, without this app's view."""
        key = canonical_address(address)
        hit, known = self.cache.get(key)
        if hit:
            return known
        known = await self.client.awhois(key)
        self.cache.put(key, known)
        return known

    async def identity(self, request: Request) -> Identity:
        """FastAPI dependency: the identity of the request's peer (401, 403 or 503 otherwise)."""
        # Servers rewrite the peer from these headers (uvicorn does, by default, for requests
        # from loopback), so any local process could claim any peer; idgate's peers come
        # direct, and a request through a proxy has no idgate identity either way.
        forwarded = [h for h in FORWARDING_HEADERS if h in request.headers]
        if forwarded:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"the request carries {', '.join(forwarded)}: idgate identifies direct peers "
                "only, not requests through a proxy",
            )
        peer = request.client.host if request.client else None
        if not peer:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                "no peer address: idgate identifies IP peers only",
                headers=CHALLENGE,
            )
        try:
            known = await self.lookup(peer)
        except BadAddress:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                f"the peer {peer!r} is not an IP address: idgate identifies IP peers only",
                headers=CHALLENGE,
            ) from None
        except AgentUnavailable as e:
            log.warning("cannot identify %s: %s", peer, e)
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                f"idgate agent unreachable: {e.reason}",
            ) from e
        if known is None or known.expired():
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED,
                f"no idgate session from {canonical_address(peer)}: log in at idgate's session "
                "endpoint",
                headers=CHALLENGE,
            )
        seen = known.for_service(self.service)
        if seen is None or seen.expired():
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"{known.user} has no idgate grant for the service {self.service!r}",
            )
        return seen

    def require_groups(self, *groups: str) -> Callable[..., Awaitable[Identity]]:
        """Dependency factory: the identity, if it is in every one of ``groups`` (403 if not).

        Raises ``ValueError`` at once (when the route is declared) for no or empty group names.
        """
        return _group_check(self.identity, groups)


def _group_check(
    source: Callable[..., Awaitable[Identity]], groups: tuple[str, ...]
) -> Callable[..., Awaitable[Identity]]:
    """A dependency taking the identity from ``source`` and requiring every one of ``groups``."""
    if not groups:
        raise ValueError("require_groups needs at least one group name")
    for g in groups:
        if not isinstance(g, str) or not g:
            raise ValueError(f"group names must be non-empty strings, not {g!r}")

    async def in_groups(who: Identity = Depends(source)) -> Identity:
        missing = [g for g in groups if g not in who.groups]
        if missing:
            raise HTTPException(
                status.HTTP_403_FORBIDDEN,
                f"{who.user} is not in the group(s) {', '.join(missing)}",
            )
        return who

    return in_groups


_default: Idgate | None = None


def default_idgate() -> Idgate:
    """The shared :class:`Idgate` of :func:`identity` and :func:`require_groups`, made at first
    use from the environment (``IDGATE_WHOIS_SOCKET``, ``IDGATE_SERVICE``)."""
    global _default
    if _default is None:
        _default = Idgate()
    return _default


async def identity(request: Request) -> Identity:
    """FastAPI dependency: the peer's identity, from the environment-configured agent."""
    return await default_idgate().identity(request)


def require_groups(*groups: str) -> Callable[..., Awaitable[Identity]]:
    """Dependency factory: the peer's identity if it is in every one of ``groups``, else 403."""
    return _group_check(identity, groups)
