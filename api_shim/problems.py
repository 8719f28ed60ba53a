"""Errors as RFC 9457 problem documents, in one place.

Any :class:`~models.errors.HubError` becomes a problem with its stable ``code``; FastAPI's
validation errors and Starlette's routing errors get codes too; anything else is a 500
without a stack trace or a message from inside.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

from models.errors import DatabaseUnavailable, HubError, PayloadTooLarge
from models.views import Problem

log = logging.getLogger("hub.api")

PROBLEM_TYPE = "urn:integration-hub:problem:"
STARLETTE_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed"}

RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "No valid API key (`unauthorized`)."},
    404: {"model": Problem, "description": "No such resource in the caller's tenant (`not_found`)."},
    409: {"model": Problem, "description": "A limit or a unique name (`connection_limit_reached`, `request_limit_reached`, `name_taken`)."},
    422: {"model": Problem, "description": "Invalid input: `validation_error` with `errors[].loc`, or a rule's own code."},
    503: {"model": Problem, "description": "The database is unreachable (`database_unavailable`); nothing was stored."},
}
"""The problem responses every ``/v1`` route may give, for the OpenAPI document."""

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


def problem(
    status: int, code: str, title: str, detail: str, headers: Mapping[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """A problem document response."""
    content = {"type": PROBLEM_TYPE + code, "title": title, "status": status, "detail": detail, "code": code}
    content.update(extra)
    return JSONResponse(content, status_code=status, media_type="application/problem+json", headers=headers)


async def _hub_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HubError)
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else {}
    if "retry_after" in exc.extra:
        headers["Retry-After"] = str(exc.extra["retry_after"])
    extra = {k: v for k, v in exc.extra.items() if k == "errors"}
    return problem(exc.status, exc.code, exc.title, exc.message, headers, **extra)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    found = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
    detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in found)
    return problem(422, "validation_error", "The request is not valid.", detail, errors=found)


def _unreadable(cause: BaseException) -> str:
    """Why FastAPI could not read a JSON body, in words that quote nothing of it."""
    if isinstance(cause, UnicodeDecodeError):
        return "the body is not valid UTF-8"
    if isinstance(cause, RecursionError):
        return "the JSON nests too deeply"
    return "the body is not JSON the hub can read (a number too large?)"


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
        # FastAPI's answer to a body json.loads could not read (it answers invalid syntax 422
        # itself): invalid UTF-8, nesting past the recursion limit, an integer over 4,300 digits.
        msg = _unreadable(exc.__cause__)
        return problem(422, "validation_error", "The request is not valid.", f"body: {msg}",
                       errors=[{"loc": ["body"], "msg": msg}])
    if exc.status_code == 413:  # a body cut off as it arrived (api_shim.bodylimit)
        too_large = PayloadTooLarge(str(exc.detail))
        return problem(too_large.status, too_large.code, too_large.title, too_large.message)
    code = STARLETTE_CODES.get(exc.status_code, "http_error")
    return problem(exc.status_code, code, str(exc.detail), str(exc.detail), exc.headers)


async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    # The type only: a driver's message can quote the statement and its parameters.
    log.error("database unavailable: %s", type(exc).__name__)
    down = DatabaseUnavailable()
    return problem(down.status, down.code, down.title, down.message, {"Retry-After": "5"})


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    log.error("unexpected error: %s", type(exc).__name__, exc_info=exc)
    return problem(500, "internal_error", "Something went wrong inside the hub.", "See the hub's logs.")


def _documented(app: FastAPI) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` with every problem response documented as ``application/problem+json``, the
    type it is served with (FastAPI declares a response ``model`` as ``application/json``)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            for operations in generate().get("paths", {}).values():
                for operation in operations.values():
                    for response in operation.get("responses", {}).values():
                        content = response.get("content", {})
                        if content.get("application/json", {}).get("schema") == PROBLEM_REF:
                            content["application/problem+json"] = content.pop("application/json")
        return app.openapi_schema or generate()

    return openapi


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``, and document their problems as what they are."""
    app.openapi = _documented(app)  # type: ignore[method-assign]
    app.add_exception_handler(HubError, _hub_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OperationalError, _database_error)
    app.add_exception_handler(InterfaceError, _database_error)
    app.add_exception_handler(Exception, _unexpected)
