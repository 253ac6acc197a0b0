"""The sample app tests/tests/fastapi.rs serves with uvicorn behind idgate.

Configured by the environment: ``IDGATE_ADMIN_SOCKET`` and ``IDGATE_SERVICE``.
"""

from fastapi import Depends, FastAPI

from idgate_fastapi import Identity, identity, require_groups

app = FastAPI(title="idgate sample")


@app.get("/healthz")
async def healthz() -> dict[str, bool]:
    """Needs no identity: the harness polls it from the server's own namespace."""
    return {"ok": True}


@app.get("/me")
async def me(who: Identity = Depends(identity)) -> Identity:
    """The caller's identity, as idgate verified it."""
    return who


@app.get("/staff")
async def staff(who: Identity = Depends(require_groups("staff"))) -> dict[str, str]:
    """Only for group ``staff``."""
    return {"welcome": who.user}


@app.get("/ops", dependencies=[Depends(require_groups("ops"))])
async def ops() -> dict[str, str]:
    """Only for group ``ops``."""
    return {"status": "all systems go"}


@app.get("/staff-and-ops", dependencies=[Depends(require_groups("staff", "ops"))])
async def staff_and_ops() -> dict[str, str]:
    """Only for members of both groups."""
    return {"status": "both"}
