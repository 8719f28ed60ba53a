"""``/v1/callback-key``: the key that signs the tenant's callbacks, to verify them with."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from api_shim.deps import CurrentTenant, SessionDep
from api_shim.problems import RESPONSES
from models import callbacks

router = APIRouter(prefix="/v1/callback-key", tags=["callbacks"], responses=RESPONSES)


class CallbackKey(BaseModel):
    """How the hub signs a callback: ``header: sha256=<hex HMAC-SHA256 of the raw body, keyed with key>``."""

    key: str
    header: str = callbacks.SIGNATURE_HEADER
    algorithm: str = "hmac-sha256"


@router.get("", response_model=CallbackKey)
def get_callback_key(request: Request, session: SessionDep, tenant: CurrentTenant) -> CallbackKey:
    """The tenant's callback signing key (made on first use)."""
    return CallbackKey(key=callbacks.callback_key(session, request.app.state.vault, tenant.id))


@router.post("/rotate", response_model=CallbackKey)
def rotate_callback_key(request: Request, session: SessionDep, tenant: CurrentTenant) -> CallbackKey:
    """A new signing key: callbacks sent from now on are signed with it."""
    return CallbackKey(key=callbacks.rotate_callback_key(session, request.app.state.vault, tenant.id))
