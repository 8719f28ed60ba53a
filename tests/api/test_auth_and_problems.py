"""API keys, the public endpoints, and the shape of every error: RFC 9457 problem documents."""

from __future__ import annotations

import pytest

from tests.api.helpers import assert_problem, error_locs, make_template, template_body

# Every call that needs a tenant key, with a body that would otherwise be acceptable enough
# to reach the route.
PROTECTED = [
    ("GET", "/v1/templates"),
    ("POST", "/v1/templates"),
    ("GET", "/v1/templates/some-id"),
    ("DELETE", "/v1/templates/some-id"),
    ("GET", "/v1/connections"),
    ("POST", "/v1/connections"),
    ("GET", "/v1/connections/some-id"),
    ("DELETE", "/v1/connections/some-id"),
    ("GET", "/v1/connections/some-id/requests"),
    ("POST", "/v1/connections/some-id/requests"),
    ("GET", "/v1/connections/some-id/requests/other-id"),
    ("GET", "/v1/executions"),
    ("POST", "/v1/executions"),
    ("GET", "/v1/executions/some-id"),
]

BAD_AUTHORIZATION = {
    "missing": {},
    "unknown_key": {"Authorization": "Bearer hub_thisIsNotAKeyTheHubIssued"},
    "empty_bearer": {"Authorization": "Bearer "},
    "not_bearer": {"Authorization": "Basic dXNlcjpwYXNz"},
}


@pytest.mark.parametrize("headers", list(BAD_AUTHORIZATION.values()), ids=list(BAD_AUTHORIZATION))
@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_a_call_without_a_valid_key_is_401_unauthorized(api, method, path, headers):
    # Given: a client that has no valid API key
    # When: it calls an endpoint that needs one
    json = {} if method in ("POST", "PUT", "PATCH") else None
    response = api.client.request(method, path, json=json, headers=headers)
    # Then: it gets a 401 problem document that asks for a bearer key
    assert_problem(response, 401, "unauthorized")
    assert response.headers["www-authenticate"].lower().startswith("bearer")


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_changing_a_template_without_a_key_is_401_unauthorized(api, method):
    # Given: a client that sends no API key
    # When: it tries to change a template
    response = api.client.request(method, "/v1/templates/some-id", json={"name": "x"})
    # Then: it is told to authenticate first, as on every other call
    assert_problem(response, 401, "unauthorized")


def test_a_key_of_one_tenant_sees_nothing_of_another(api):
    # Given: tenant a has a template
    make_template(api, "a")
    # When: tenant b lists templates with its own valid key
    response = api.client.get("/v1/templates", headers=api.headers("b"))
    # Then: the key works, and b sees an empty library
    assert response.status_code == 200
    assert response.json() == {"items": [], "next_cursor": None}


def test_healthz_answers_without_a_key(api):
    # When: a load balancer probes /healthz with no credentials
    response = api.client.get("/healthz")
    # Then: the process says it is up
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_openapi_document_is_served_without_a_key(api):
    # When: a client generator fetches the machine-readable contract
    response = api.client.get("/openapi.json")
    # Then: it is a JSON OpenAPI document naming the v1 resources
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    assert {"/v1/templates", "/v1/connections", "/v1/executions", "/v1/executions/{job_id}"} <= set(
        document["paths"]
    )


def test_docs_page_is_served_without_a_key(api):
    # When: a person opens the interactive docs
    response = api.client.get("/docs")
    # Then: they get an HTML page
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")


def test_an_unknown_route_is_a_404_problem(api):
    # When: a client calls a path the API does not have
    response = api.client.get("/v1/no-such-resource", headers=api.headers())
    # Then: a 404 problem document with code not_found
    assert_problem(response, 404, "not_found")


def test_an_unsupported_method_on_a_collection_is_a_405_problem(api):
    # When: a client tries to DELETE the whole template collection
    response = api.client.delete("/v1/templates", headers=api.headers())
    # Then: a 405 problem document, and the route is not treated as missing
    assert_problem(response, 405, "method_not_allowed")


def test_a_missing_field_is_a_validation_problem_pointing_at_it(api):
    # Given: a template without verbs
    body = template_body()
    del body["verbs"]
    # When: it is posted
    response = api.client.post("/v1/templates", json=body, headers=api.headers())
    # Then: 422 validation_error, with an error located at body.verbs
    problem = assert_problem(response, 422, "validation_error")
    assert ["body", "verbs"] in error_locs(problem)


def test_a_wrongly_typed_query_parameter_is_a_validation_problem(api):
    # When: a list is asked for with a limit that is not a number
    response = api.client.get("/v1/templates", params={"limit": "ten"}, headers=api.headers())
    # Then: 422 validation_error located at the query parameter
    problem = assert_problem(response, 422, "validation_error")
    assert ["query", "limit"] in error_locs(problem)


def test_a_body_that_is_not_json_is_a_validation_problem(api):
    # When: a client sends a truncated JSON document
    response = api.client.post(
        "/v1/templates",
        content=b'{"name": "x", ',
        headers={**api.headers(), "Content-Type": "application/json"},
    )
    # Then: 422 validation_error with errors, and nothing was created
    problem = assert_problem(response, 422, "validation_error")
    error_locs(problem)
    assert api.client.get("/v1/templates", headers=api.headers()).json()["items"] == []


def test_an_id_with_a_nul_character_is_simply_not_found(api):
    # Given: ids are opaque, so a client may send any string as one
    # When: it asks for template and connection ids containing a NUL character
    template = api.client.get("/v1/templates/%00", headers=api.headers())
    connection = api.client.get("/v1/connections/a%00b", headers=api.headers())
    # Then: both are answered like any id that does not exist
    assert_problem(template, 404, "not_found")
    assert_problem(connection, 404, "not_found")


def test_a_nul_character_in_a_text_field_is_a_validation_problem(api):
    # Given: a template whose name contains a NUL character, which PostgreSQL cannot store
    body = template_body(name="bad\u0000name")
    # When: it is posted
    response = api.client.post("/v1/templates", json=body, headers=api.headers())
    # Then: the hub refuses it as invalid input on every database, rather than failing inside
    assert_problem(response, 422, "validation_error")
