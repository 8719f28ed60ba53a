"""A cap on the size of a request body, before anything parses it.

A body whose ``Content-Length`` is over the cap is answered ``413 payload_too_large`` without
being read; a body sent without a length (chunked) is counted as it arrives and refused the
same way once it passes the cap. Either way the API never holds more than the cap of one body.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api_shim import problems
from models.errors import PayloadTooLarge


class BodyLimit:
    """ASGI middleware: request bodies of at most ``max_bytes`` bytes."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"A request body may hold at most {self.max_bytes} bytes.")
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response = problems.problem(too_large.status, too_large.code, too_large.title, too_large.message)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI lets an HTTPException from reading the body through to the handlers
                    # (any other exception there becomes a 400): problems maps 413 to the same code.
                    raise HTTPException(too_large.status, too_large.message)
            return message

        await self.app(scope, counted, send)
