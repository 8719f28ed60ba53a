"""Changing and removing things: ``PATCH``/``DELETE`` of connections and stored requests, and
what deleting a template does (nothing to the connections made from it).

A change is checked again as a whole; a refused change leaves the stored object as it was.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from tests.api.helpers import (
    assert_problem,
    error_locs,
    make_connection,
    make_request,
    make_template,
    template_body,
)
from tests.conftest import in_process_runtime, test_settings
from worker.executor import run_job

PUBLIC_ADDRESS = "93.184.215.14"
REQUIRED_KEY = [{"name": "X-Client-Key", "required": True, "default": None}]
OAUTH2 = {
    "grant_type": "client_credentials",
    "token_url": "https://login.example.com/services/oauth2/token",
    "client_id": "{{secrets.client_id}}",
    "client_secret": "{{secrets.client_secret}}",
    "client_auth_method": "client_secret_basic",
    "scope": "api",
    "audience": None,
    "extra_params": {},
}


def parsed(timestamp: str) -> datetime:
    """An RFC 3339 timestamp of the API as an aware datetime."""
    value = datetime.fromisoformat(timestamp)
    assert value.tzinfo is not None, timestamp
    return value


def count_rows(engine: Engine, table_name: str, connection_id: str) -> int:
    """How many rows of ``table_name`` belong to the connection, read with SQLAlchemy Core."""
    table = sa.Table(table_name, sa.MetaData(), autoload_with=engine)
    statement = sa.select(sa.func.count()).select_from(table).where(table.c.connection_id == connection_id)
    with engine.connect() as connection:
        return int(connection.execute(statement).scalar_one())


def get_connection(api, ref: str, tenant: str = "a") -> httpx.Response:
    """``GET /v1/connections/{ref}``."""
    return api.client.get(f"/v1/connections/{ref}", headers=api.headers(tenant))


def patch_connection(api, ref: str, body: dict[str, Any], tenant: str = "a") -> httpx.Response:
    """``PATCH /v1/connections/{ref}`` with ``body``."""
    return api.client.patch(f"/v1/connections/{ref}", json=body, headers=api.headers(tenant))


# --- PATCH /v1/connections/{id} -------------------------------------------------------------


def test_patching_description_base_url_and_name_is_kept(api):
    # Given: a connection
    created = make_connection(api, name="sfdc-prod")
    time.sleep(0.05)  # timestamps have millisecond precision
    # When: its description, base URL and name are changed
    body = {"description": "Staging org", "base_url": "https://staging.example.com/v2", "name": "sfdc-staging"}
    response = patch_connection(api, created["id"], body)
    # Then: 200 echoing the changes
    assert response.status_code == 200, response.text
    changed = response.json()
    assert changed["id"] == created["id"]
    assert changed["description"] == "Staging org"
    assert changed["base_url"] == "https://staging.example.com/v2"
    assert changed["name"] == "sfdc-staging"
    assert parsed(changed["created_at"]) == parsed(created["created_at"])
    assert parsed(changed["updated_at"]) > parsed(created["updated_at"])
    # And: reading it back, by id and by its new name, shows the same; the old name is free
    assert get_connection(api, created["id"]).json() == changed
    assert get_connection(api, "sfdc-staging").json() == changed
    assert_problem(get_connection(api, "sfdc-prod"), 404, "not_found")


def test_default_allowed_hosts_follow_a_new_base_url(api):
    # Given: a connection whose allowed hosts are the default (its base URL's host)
    created = make_connection(api, base_url="https://api.example.com/v1")
    assert created["allowed_hosts"] == ["api.example.com"]
    # When: its base URL moves to another host
    response = patch_connection(api, created["id"], {"base_url": "https://eu.example.org/v1"})
    # Then: the allowed hosts follow it
    assert response.status_code == 200, response.text
    assert response.json()["allowed_hosts"] == ["eu.example.org"]
    assert get_connection(api, created["id"]).json()["allowed_hosts"] == ["eu.example.org"]


def test_explicit_allowed_hosts_stay_when_the_base_url_changes(api):
    # Given: a connection with allowed hosts of its own
    created = make_connection(api, allowed_hosts=["api.example.com", "files.example.com"])
    # When: its base URL changes
    response = patch_connection(api, created["id"], {"base_url": "https://files.example.com/v2"})
    # Then: its allowed hosts are still the ones it named
    assert response.status_code == 200, response.text
    assert sorted(response.json()["allowed_hosts"]) == ["api.example.com", "files.example.com"]
    assert sorted(get_connection(api, created["id"]).json()["allowed_hosts"]) == [
        "api.example.com",
        "files.example.com",
    ]


def test_removing_a_required_auth_header_value_is_missing_auth_header(api):
    # Given: a connection of a template that requires X-Client-Key
    template = make_template(api, auth_headers=REQUIRED_KEY)
    created = make_connection(api, template, auth_header_values={"X-Client-Key": "{{secrets.client_key}}"})
    # When: the PATCH empties its auth header values
    response = patch_connection(api, created["id"], {"auth_header_values": {}})
    # Then: 422 missing_auth_header, and the connection is unchanged
    problem = assert_problem(response, 422, "missing_auth_header")
    assert ["body", "auth_header_values", "X-Client-Key"] in error_locs(problem)
    assert get_connection(api, created["id"]).json() == created


def test_removing_oauth2_from_an_oauth2_connection_is_invalid_oauth2(api):
    # Given: a connection of an OAuth 2.0 template
    template = make_template(api, auth_type="oauth2")
    created = make_connection(api, template, oauth2=OAUTH2)
    # When: the PATCH sets oauth2 to null
    response = patch_connection(api, created["id"], {"oauth2": None})
    # Then: 422 invalid_oauth2, and the connection keeps its OAuth settings
    assert_problem(response, 422, "invalid_oauth2")
    assert get_connection(api, created["id"]).json() == created


def test_a_null_name_is_a_validation_problem(api):
    # Given: a connection
    created = make_connection(api, name="sfdc-prod")
    # When: the PATCH sets its name to null
    response = patch_connection(api, created["id"], {"name": None})
    # Then: 422 validation_error, and the connection keeps its name
    assert_problem(response, 422, "validation_error")
    assert get_connection(api, "sfdc-prod").json() == created


def test_renaming_to_a_taken_name_is_name_taken(api):
    # Given: two connections
    template = make_template(api)
    first = make_connection(api, template, name="first")
    second = make_connection(api, template, name="second")
    # When: the second is renamed to the first's name
    response = patch_connection(api, second["id"], {"name": "first"})
    # Then: 409 name_taken, and both are as they were
    assert_problem(response, 409, "name_taken")
    assert get_connection(api, "first").json() == first
    assert get_connection(api, "second").json() == second


def test_an_unknown_field_in_a_patch_is_refused(api):
    # Given: a connection
    created = make_connection(api)
    # When: the PATCH carries a field the contract does not name
    response = patch_connection(api, created["id"], {"description": "x", "colour": "blue"})
    # Then: 422 validation_error pointing at it, and nothing changed
    problem = assert_problem(response, 422, "validation_error")
    assert ["body", "colour"] in error_locs(problem)
    assert get_connection(api, created["id"]).json() == created


def test_another_tenant_cannot_patch_your_connection(api):
    # Given: tenant a's connection
    created = make_connection(api, tenant="a", name="sfdc-prod")
    # When: tenant b patches it, by id and by name
    by_id = patch_connection(api, created["id"], {"description": "hijacked"}, tenant="b")
    by_name = patch_connection(api, "sfdc-prod", {"description": "hijacked"}, tenant="b")
    # Then: both are 404, and the connection is unchanged
    assert_problem(by_id, 404, "not_found")
    assert_problem(by_name, 404, "not_found")
    assert get_connection(api, created["id"]).json() == created


# --- DELETE /v1/connections/{id} --------------------------------------------------------------


def test_deleting_a_connection_removes_its_requests_and_secrets(api):
    # Given: a connection with two requests and a secret, and another connection with its own
    template = make_template(api)
    doomed = make_connection(api, template, name="doomed")
    kept = make_connection(api, template, name="kept")
    for connection in (doomed, kept):
        make_request(api, connection, name="one")
        put = api.client.put(
            f"/v1/connections/{connection['id']}/secrets/api_token", json={"value": "v"}, headers=api.headers()
        )
        assert put.status_code == 204, put.text
    make_request(api, doomed, name="two")
    assert count_rows(api.engine, "request", doomed["id"]) == 2
    assert count_rows(api.engine, "secret", doomed["id"]) == 1
    # When: the connection is deleted
    response = api.client.delete(f"/v1/connections/{doomed['id']}", headers=api.headers())
    # Then: 204, and its requests' and secrets' rows are gone
    assert response.status_code == 204, response.text
    assert count_rows(api.engine, "request", doomed["id"]) == 0
    assert count_rows(api.engine, "secret", doomed["id"]) == 0
    # And: the other connection keeps its own
    assert count_rows(api.engine, "request", kept["id"]) == 1
    assert count_rows(api.engine, "secret", kept["id"]) == 1


# --- PATCH / DELETE /v1/connections/{c}/requests/{r} ------------------------------------------


@pytest.fixture
def connection(api):
    """Tenant a's ``sfdc-prod`` (GET and POST) with a manual ``create-account`` POST with a JSON
    body and a studio ``get-account`` whose URL has ``{id}``."""
    template = make_template(api, verbs=["GET", "POST"])
    connection = make_connection(api, template, name="sfdc-prod", base_url="https://api.example.com/v1")
    make_request(api, connection, name="create-account", method="POST", url="/accounts", body={"name": "Acme"})
    make_request(api, connection, name="get-account", kind="studio", url="/accounts/{id}", query={})
    return connection


def request_path(name: str) -> str:
    """The path of ``sfdc-prod``'s stored request ``name``."""
    return f"/v1/connections/sfdc-prod/requests/{name}"


def get_request(api, name: str, tenant: str = "a") -> httpx.Response:
    """``GET`` of ``sfdc-prod``'s stored request ``name``."""
    return api.client.get(request_path(name), headers=api.headers(tenant))


def patch_request(api, name: str, body: dict[str, Any], tenant: str = "a") -> httpx.Response:
    """``PATCH`` of ``sfdc-prod``'s stored request ``name`` with ``body``."""
    return api.client.patch(request_path(name), json=body, headers=api.headers(tenant))


def test_a_method_the_template_lacks_is_verb_not_allowed(api, connection):
    # Given: a stored request, as it is
    before = get_request(api, "create-account").json()
    # When: its method is changed to one the template does not allow
    response = patch_request(api, "create-account", {"method": "DELETE"})
    # Then: 422 verb_not_allowed, and the request is unchanged
    problem = assert_problem(response, 422, "verb_not_allowed")
    assert ["body", "method"] in error_locs(problem)
    assert get_request(api, "create-account").json() == before


def test_a_media_type_that_does_not_fit_the_stored_body_is_invalid_body(api, connection):
    # Given: a stored request with a JSON object body
    before = get_request(api, "create-account").json()
    assert before["body"] == {"name": "Acme"}
    # When: its media type is changed to text/plain, which takes a string body
    response = patch_request(api, "create-account", {"media_type": "text/plain"})
    # Then: 422 invalid_body, and the request is unchanged
    assert_problem(response, 422, "invalid_body")
    assert get_request(api, "create-account").json() == before


def test_making_a_request_with_placeholders_manual_is_refused(api, connection):
    # Given: a studio request whose URL has the path parameter {id}
    before = get_request(api, "get-account").json()
    # When: it is made manual
    response = patch_request(api, "get-account", {"kind": "manual"})
    # Then: 422 manual_request_has_placeholders, and it is still a studio request
    assert_problem(response, 422, "manual_request_has_placeholders")
    assert get_request(api, "get-account").json() == before


def test_a_valid_change_is_kept_and_moves_updated_at(api, connection):
    # Given: a stored request
    before = get_request(api, "create-account").json()
    time.sleep(0.05)  # timestamps have millisecond precision
    # When: its URL, headers and body are changed
    change = {"url": "/v2/accounts", "headers": {"X-Trace": "1"}, "body": {"name": "Acme Ltd"}}
    response = patch_request(api, "create-account", change)
    # Then: 200 echoing the change, the rest as it was
    assert response.status_code == 200, response.text
    changed = response.json()
    assert changed == {**before, **change, "updated_at": changed["updated_at"]}
    # And: updated_at moved past created_at, which stayed
    assert parsed(changed["created_at"]) == parsed(before["created_at"])
    assert parsed(changed["updated_at"]) > parsed(changed["created_at"])
    # And: reading it back shows the change
    assert get_request(api, "create-account").json() == changed


def test_renaming_a_request_to_a_taken_name_is_name_taken(api, connection):
    # Given: two stored requests
    before = get_request(api, "get-account").json()
    # When: one is renamed to the other's name
    response = patch_request(api, "get-account", {"name": "create-account"})
    # Then: 409 name_taken, and it keeps its name
    assert_problem(response, 409, "name_taken")
    assert get_request(api, "get-account").json() == before


def test_a_null_url_is_a_validation_problem(api, connection):
    # Given: a stored request
    before = get_request(api, "create-account").json()
    # When: its URL is set to null
    response = patch_request(api, "create-account", {"url": None})
    # Then: 422 validation_error, and it keeps its URL
    assert_problem(response, 422, "validation_error")
    assert get_request(api, "create-account").json() == before


def test_a_deleted_request_is_gone(api, connection):
    # When: a stored request is deleted
    response = api.client.delete(request_path("create-account"), headers=api.headers())
    # Then: 204 with an empty body; it is no longer found or listed
    assert response.status_code == 204, response.text
    assert response.content == b""
    assert_problem(get_request(api, "create-account"), 404, "not_found")
    listed = api.client.get("/v1/connections/sfdc-prod/requests", headers=api.headers()).json()
    assert [item["name"] for item in listed["items"]] == ["get-account"]
    # And: deleting it again is 404
    assert_problem(api.client.delete(request_path("create-account"), headers=api.headers()), 404, "not_found")


def test_another_tenant_cannot_patch_or_delete_your_request(api, connection):
    # Given: tenant a's stored request, and its id
    before = get_request(api, "create-account").json()
    by_ids = f"/v1/connections/{connection['id']}/requests/{before['id']}"
    # When: tenant b patches and deletes it, by id
    patched = api.client.patch(by_ids, json={"url": "/stolen"}, headers=api.headers("b"))
    deleted = api.client.delete(by_ids, headers=api.headers("b"))
    # Then: both are 404, and the request is unchanged
    assert_problem(patched, 404, "not_found")
    assert_problem(deleted, 404, "not_found")
    assert get_request(api, "create-account").json() == before


# --- templates -----------------------------------------------------------------------------------


def test_a_connection_keeps_working_after_its_template_is_deleted(api, database_url):
    # Given: a template, a connection made from it and a stored request
    template = make_template(api, auth_headers=REQUIRED_KEY, verbs=["GET", "POST"])
    connection = make_connection(api, template, name="sfdc-prod", auth_header_values={"X-Client-Key": "ck-1"})
    make_request(api, connection, name="list-accounts", url="/accounts", query={})
    # When: the template is deleted
    deleted = api.client.delete(f"/v1/templates/{template['id']}", headers=api.headers())
    assert deleted.status_code == 204, deleted.text
    assert_problem(api.client.get(f"/v1/templates/{template['id']}", headers=api.headers()), 404, "not_found")
    # Then: the connection still has its copy of the template's rules
    fetched = get_connection(api, "sfdc-prod")
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["template"] == connection["template"]
    assert fetched.json()["template"]["verbs"] == ["GET", "POST"]
    # And: an execution through it is accepted
    submitted = api.client.post(
        "/v1/executions", json={"connection": "sfdc-prod", "request": "list-accounts"}, headers=api.headers()
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert api.queue.sent == [job_id]
    # And: a worker runs it against the (fake) web service
    seen: list[httpx.Request] = []

    def service(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"records": []})

    settings = test_settings(database_url, allow_private_destinations=False, allow_http=False)
    runtime = in_process_runtime(settings, api.engine, httpx.MockTransport(service), lambda host, port: [PUBLIC_ADDRESS])
    with runtime.client:
        run_job(job_id, runtime)
    # Then: the service got the request, with the auth header the template required
    assert len(seen) == 1
    assert seen[0].method == "GET"
    assert seen[0].url == "https://api.example.com/v1/accounts"
    assert seen[0].headers["x-client-key"] == "ck-1"
    # And: the job succeeded with the service's answer
    job = api.client.get(f"/v1/executions/{job_id}", headers=api.headers()).json()
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["status_code"] == 200


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_a_template_in_use_cannot_be_changed(api, method):
    # Given: a template with a connection made from it
    template = make_template(api, name="original", verbs=["GET"])
    connection = make_connection(api, template, name="sfdc-prod")
    # When: a client with a valid key tries to change the template's verbs
    response = api.client.request(
        method,
        f"/v1/templates/{template['id']}",
        json=template_body(name="changed", verbs=["GET", "DELETE"]),
        headers=api.headers(),
    )
    # Then: 405 template_immutable; the template and the connection's copy are unchanged
    assert_problem(response, 405, "template_immutable")
    assert api.client.get(f"/v1/templates/{template['id']}", headers=api.headers()).json() == template
    assert get_connection(api, "sfdc-prod").json() == connection
