"""Small builders and checks shared by the API tests.

Builders go through the HTTP API, as a client would, and fail loudly if the hub refuses
what they build: a test then starts from objects the API itself accepted.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from tests.conftest import Api

PROBLEM_FIELDS = {"type", "title", "status", "detail", "code"}


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """``response`` is an RFC 9457 problem document with ``status`` and ``code``; its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert PROBLEM_FIELDS <= problem.keys(), problem
    assert problem["status"] == status
    assert problem["code"] == code, problem
    assert problem["title"] and problem["detail"]
    return problem


def error_locs(problem: dict[str, Any]) -> list[list[Any]]:
    """The ``loc`` of each entry in a validation problem's ``errors``."""
    assert isinstance(problem.get("errors"), list) and problem["errors"], problem
    for error in problem["errors"]:
        assert error.keys() >= {"loc", "msg"} and error["msg"], error
    return [error["loc"] for error in problem["errors"]]


def template_body(**overrides: Any) -> dict[str, Any]:
    """A valid ``POST /v1/templates`` body: no auth, GET and POST."""
    body: dict[str, Any] = {
        "name": "Example REST",
        "service_name": "Example",
        "integration_method": "rest",
        "auth_type": "none",
        "auth_headers": [],
        "verbs": ["GET", "POST"],
    }
    body.update(overrides)
    return body


def make_template(api: Api, tenant: str = "a", **overrides: Any) -> dict[str, Any]:
    """A template created through the API (see :func:`template_body`)."""
    response = api.client.post("/v1/templates", json=template_body(**overrides), headers=api.headers(tenant))
    assert response.status_code == 201, response.text
    return response.json()


def connection_body(template_id: str, **overrides: Any) -> dict[str, Any]:
    """A valid ``POST /v1/connections`` body for a no-auth template without auth headers."""
    body: dict[str, Any] = {
        "name": "example",
        "template_id": template_id,
        "description": "the example service",
        "base_url": "https://api.example.com/v1",
    }
    body.update(overrides)
    return body


def make_connection(
    api: Api, template: dict[str, Any] | None = None, tenant: str = "a", **overrides: Any
) -> dict[str, Any]:
    """A connection created through the API, from ``template`` or from a new no-auth one."""
    template = template or make_template(api, tenant)
    response = api.client.post(
        "/v1/connections", json=connection_body(template["id"], **overrides), headers=api.headers(tenant)
    )
    assert response.status_code == 201, response.text
    return response.json()


def request_body(**overrides: Any) -> dict[str, Any]:
    """A valid manual ``GET`` request body, relative to the connection's base URL."""
    body: dict[str, Any] = {
        "name": "list-accounts",
        "kind": "manual",
        "method": "GET",
        "url": "/accounts",
        "headers": {"Accept": "application/json"},
        "query": {"fields": "id,name"},
        "body": None,
        "media_type": "application/json",
    }
    body.update(overrides)
    return body


def make_request(api: Api, connection: dict[str, Any], tenant: str = "a", **overrides: Any) -> dict[str, Any]:
    """A stored request of ``connection`` created through the API (see :func:`request_body`)."""
    response = api.client.post(
        f"/v1/connections/{connection['id']}/requests",
        json=request_body(**overrides),
        headers=api.headers(tenant),
    )
    assert response.status_code == 201, response.text
    return response.json()


def list_all(api: Api, path: str, tenant: str = "a", **params: Any) -> list[dict[str, Any]]:
    """Every item of a paginated list, following ``next_cursor`` to the end."""
    items: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        query = {**params, **({"cursor": cursor} if cursor else {})}
        response = api.client.get(path, params=query, headers=api.headers(tenant))
        assert response.status_code == 200, response.text
        page = response.json()
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items
    raise AssertionError(f"{path} did not end after 100 pages")
