"""Tenancy, for every operation the API documents: another tenant's ids do not exist for you.

The operations are read from the OpenAPI document, so an endpoint added later is covered
without touching this test.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from api_shim.app import openapi_document
from tests.api.helpers import assert_problem, make_connection, make_request, make_template

BODIES: dict[tuple[str, str], dict[str, Any]] = {
    ("POST", "/v1/connections/{connection}/requests"): {"name": "other", "method": "GET", "url": "/x"},
    ("PATCH", "/v1/connections/{connection}/requests/{request}"): {"name": "renamed"},
    ("PATCH", "/v1/connections/{connection}"): {"description": "changed"},
    ("PUT", "/v1/connections/{connection}/secrets/{name}"): {"value": "v"},
}


def _operations() -> list[tuple[str, str]]:
    found = []
    for path, operations in openapi_document()["paths"].items():
        if "{" in path:
            found.extend((method.upper(), path) for method in operations)
    return sorted(found)


OPERATIONS = _operations()


def test_the_document_lists_the_operations_that_take_ids() -> None:
    # Given the OpenAPI document, then it names the operations this test walks through
    assert ("GET", "/v1/executions/{job_id}") in OPERATIONS
    assert ("PUT", "/v1/connections/{connection}/secrets/{name}") in OPERATIONS
    assert ("DELETE", "/v1/connections/{connection}/requests/{request}") in OPERATIONS


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_another_tenants_ids_are_not_found(api, method: str, path: str) -> None:
    # Given tenant a's template, connection, request, secret and job
    template = make_template(api, "a")
    connection = make_connection(api, template, "a")
    stored = make_request(api, connection, "a")
    assert api.client.put(f"/v1/connections/{connection['id']}/secrets/token", json={"value": "v"},
                          headers=api.headers("a")).status_code == 204
    job = api.client.post("/v1/executions", json={"connection": connection["id"], "request": stored["id"]},
                          headers=api.headers("a")).json()
    ids = {"template_id": template["id"], "connection": connection["id"], "request": stored["id"],
           "name": "token", "job_id": job["id"]}
    url = re.sub(r"\{(\w+)\}", lambda m: ids[m.group(1)], path)
    body = BODIES.get((method, path))

    # When tenant b calls the operation with a's ids
    response = api.client.request(method, url, json=body, headers=api.headers("b"))

    # Then it is answered as for ids that do not exist
    assert_problem(response, 404, "not_found")
    # and tenant a, making the same call, is served (the 404 is about tenancy, not the call)
    mine = api.client.request(method, url, json=body, headers=api.headers("a"))
    assert mine.status_code < 300, mine.text
