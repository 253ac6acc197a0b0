"""The identity idgate verified for a request's peer, for FastAPI apps.

    from fastapi import Depends, FastAPI
    from idgate_fastapi import Identity, identity, require_groups

    app = FastAPI()

    @app.get("/me")
    async def me(who: Identity = Depends(identity)) -> Identity:
        return who

    @app.get("/ops", dependencies=[Depends(require_groups("ops"))])
    async def ops() -> dict[str, str]:
        return {"status": "ok"}

The agent is asked over its read-only whois socket (``$IDGATE_WHOIS_SOCKET``, default
``/run/idgate/whois.sock``); :class:`Idgate` takes explicit settings instead.
"""

from .dependencies import Idgate, default_idgate, identity, require_groups
from .whois import (
    DEFAULT_SOCKET,
    SOCKET_ENV,
    AgentUnavailable,
    BadAddress,
    Identity,
    IdgateError,
    ServiceGrant,
    WhoisCache,
    WhoisClient,
)

__all__ = [
    "DEFAULT_SOCKET",
    "SOCKET_ENV",
    "AgentUnavailable",
    "BadAddress",
    "Identity",
    "Idgate",
    "IdgateError",
    "ServiceGrant",
    "WhoisCache",
    "WhoisClient",
    "default_idgate",
    "identity",
    "require_groups",
]
