"""``/v1/connections``: a tenant's connections, each made from a template whose rules it copies."""

from __future__ import annotations

import pytest

from tests.api.helpers import (
    assert_problem,
    connection_body,
    error_locs,
    make_connection,
    make_request,
    make_template,
)

SALESFORCE_HEADERS = [
    {"name": "X-Client-Key", "required": True, "default": None},
    {"name": "X-Api-Version", "required": False, "default": "58.0"},
]

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


def test_creating_a_connection_copies_the_template_rules(api):
    # Given: a template with auth headers and three verbs
    template = make_template(
        api, service_name="Salesforce", auth_headers=SALESFORCE_HEADERS, verbs=["GET", "POST", "PATCH"]
    )
    body = connection_body(
        template["id"], name="sfdc-prod", description="Production org", auth_header_values={"X-Client-Key": "k"}
    )
    # When: a connection is made from it
    response = api.client.post("/v1/connections", json=body, headers=api.headers())
    # Then: 201, echoing the connection with its own copy of the template's rules
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["id"]
    assert created["name"] == "sfdc-prod"
    assert created["template_id"] == template["id"]
    assert created["description"] == "Production org"
    assert created["base_url"] == "https://api.example.com/v1"
    assert created["template"] == {
        "service_name": "Salesforce",
        "integration_method": "rest",
        "auth_type": "none",
        "auth_headers": SALESFORCE_HEADERS,
        "verbs": ["GET", "POST", "PATCH"],
    }


def test_allowed_hosts_default_to_the_base_url_host(api):
    # When: a no-auth connection is made without allowed_hosts
    created = make_connection(api, base_url="https://API.Example.com:8443/v1")
    # Then: its requests may go to the base URL's host only
    assert created["allowed_hosts"] == ["api.example.com"]


def test_allowed_hosts_default_to_base_url_and_token_url_hosts_for_oauth2(api):
    # Given: an OAuth 2.0 template
    template = make_template(api, auth_type="oauth2")
    # When: a connection is made from it without allowed_hosts
    created = make_connection(api, template, base_url="https://example.my.salesforce.com", oauth2=OAUTH2)
    # Then: both the service host and the token endpoint host are allowed, and the oauth2 block is kept
    assert sorted(created["allowed_hosts"]) == ["example.my.salesforce.com", "login.example.com"]
    assert created["oauth2"]["token_url"] == OAUTH2["token_url"]
    assert created["oauth2"]["client_secret"] == "{{secrets.client_secret}}"


def test_given_allowed_hosts_replace_the_default(api):
    # When: a connection names its allowed hosts
    created = make_connection(api, allowed_hosts=["api.example.com", "files.example.com"])
    # Then: those are its allowed hosts
    assert sorted(created["allowed_hosts"]) == ["api.example.com", "files.example.com"]


def test_a_required_auth_header_without_a_value_is_missing_auth_header(api):
    # Given: a template that requires X-Client-Key
    template = make_template(api, auth_headers=SALESFORCE_HEADERS)
    # When: a connection is made without a value for it
    body = connection_body(template["id"], auth_header_values={"X-Api-Version": "59.0"})
    response = api.client.post("/v1/connections", json=body, headers=api.headers())
    # Then: 422 missing_auth_header pointing at the header, and no connection exists
    problem = assert_problem(response, 422, "missing_auth_header")
    assert ["body", "auth_header_values", "X-Client-Key"] in error_locs(problem)
    assert api.client.get("/v1/connections", headers=api.headers()).json()["items"] == []


def test_defaults_fill_unrequired_auth_headers(api):
    # Given: a template with a required header and a defaulted one
    template = make_template(api, auth_headers=SALESFORCE_HEADERS)
    # When: a connection gives only the required one
    created = make_connection(api, template, auth_header_values={"X-Client-Key": "{{secrets.client_key}}"})
    # Then: the other header is sent with its default
    assert created["auth_header_values"] == {"X-Client-Key": "{{secrets.client_key}}", "X-Api-Version": "58.0"}


def test_a_given_value_overrides_the_default(api):
    # Given: a template whose X-Api-Version defaults to 58.0
    template = make_template(api, auth_headers=SALESFORCE_HEADERS)
    # When: a connection gives its own version
    created = make_connection(api, template, auth_header_values={"X-Client-Key": "k", "X-Api-Version": "60.0"})
    # Then: its value wins
    assert created["auth_header_values"]["X-Api-Version"] == "60.0"


def test_auth_header_names_match_whatever_their_case(api):
    # Given: a template that requires X-Client-Key
    template = make_template(api, auth_headers=SALESFORCE_HEADERS)
    # When: the connection spells the header in lower case, as HTTP allows
    created = make_connection(api, template, auth_header_values={"x-client-key": "k"})
    # Then: the requirement is met and the value is kept
    values = {name.lower(): value for name, value in created["auth_header_values"].items()}
    assert values["x-client-key"] == "k"


def test_an_auth_header_the_template_does_not_name_is_refused(api):
    # Given: a template with two auth headers
    template = make_template(api, auth_headers=SALESFORCE_HEADERS)
    # When: a connection also sets a header the template does not name
    body = connection_body(template["id"], auth_header_values={"X-Client-Key": "k", "X-Sneaky": "v"})
    response = api.client.post("/v1/connections", json=body, headers=api.headers())
    # Then: 422 validation_error pointing at that header
    problem = assert_problem(response, 422, "validation_error")
    assert ["body", "auth_header_values", "X-Sneaky"] in error_locs(problem)


def test_an_oauth2_template_needs_an_oauth2_block(api):
    # Given: an OAuth 2.0 template
    template = make_template(api, auth_type="oauth2")
    # When: a connection is made from it without oauth2 settings
    response = api.client.post("/v1/connections", json=connection_body(template["id"]), headers=api.headers())
    # Then: 422 invalid_oauth2
    problem = assert_problem(response, 422, "invalid_oauth2")
    assert ["body", "oauth2"] in error_locs(problem)


def test_a_no_auth_template_refuses_an_oauth2_block(api):
    # Given: a template without authentication
    template = make_template(api, auth_type="none")
    # When: a connection is made from it with oauth2 settings
    body = connection_body(template["id"], oauth2=OAUTH2)
    response = api.client.post("/v1/connections", json=body, headers=api.headers())
    # Then: 422 invalid_oauth2
    assert_problem(response, 422, "invalid_oauth2")


def test_an_unknown_grant_type_is_a_validation_problem(api):
    # Given: an OAuth 2.0 template
    template = make_template(api, auth_type="oauth2")
    # When: the connection asks for a grant type the hub does not know
    body = connection_body(template["id"], oauth2={**OAUTH2, "grant_type": "implicit"})
    response = api.client.post("/v1/connections", json=body, headers=api.headers())
    # Then: 422 validation_error located at oauth2.grant_type
    problem = assert_problem(response, 422, "validation_error")
    assert ["body", "oauth2", "grant_type"] in error_locs(problem)


def test_http_base_url_is_accepted_when_the_hub_allows_http(api):
    # Given: the test hub allows http and loopback destinations
    # When: a connection points at a local http service
    created = make_connection(api, base_url="http://127.0.0.1:8080/api")
    # Then: it is stored, and its allowed host is the loopback address
    assert created["base_url"] == "http://127.0.0.1:8080/api"
    assert created["allowed_hosts"] == ["127.0.0.1"]


def test_a_base_url_with_another_scheme_is_refused(api):
    # When: a connection's base URL is not http(s)
    template = make_template(api)
    body = connection_body(template["id"], base_url="ftp://files.example.com")
    response = api.client.post("/v1/connections", json=body, headers=api.headers())
    # Then: 422 scheme_not_allowed located at base_url
    problem = assert_problem(response, 422, "scheme_not_allowed")
    assert ["body", "base_url"] in error_locs(problem)


@pytest.mark.parametrize(
    ("extra", "loc"),
    [
        ({"colour": "blue"}, ["body", "colour"]),
        ({"oauth2": {**OAUTH2, "secret": "x"}}, ["body", "oauth2", "secret"]),
    ],
    ids=["top-level", "in-oauth2"],
)
def test_unknown_fields_are_refused(api, extra, loc):
    # Given: an OAuth 2.0 template
    template = make_template(api, auth_type="oauth2")
    # When: a connection body carries a field the contract does not name
    body = {**connection_body(template["id"], oauth2=OAUTH2), **extra}
    response = api.client.post("/v1/connections", json=body, headers=api.headers())
    # Then: 422 validation_error pointing at it, and no connection exists
    problem = assert_problem(response, 422, "validation_error")
    assert loc in error_locs(problem)
    assert api.client.get("/v1/connections", headers=api.headers()).json()["items"] == []


def test_a_template_of_another_tenant_cannot_be_used(api):
    # Given: a template of tenant a
    template = make_template(api, "a")
    # When: tenant b makes a connection from it
    body = connection_body(template["id"])
    response = api.client.post("/v1/connections", json=body, headers=api.headers("b"))
    # Then: 404, as if the template did not exist
    assert_problem(response, 404, "not_found")


def test_the_51st_connection_is_refused(api):
    # Given: tenant a has 50 connections
    template = make_template(api)
    for i in range(50):
        make_connection(api, template, name=f"conn-{i:02d}")
    # When: it makes one more
    response = api.client.post(
        "/v1/connections", json=connection_body(template["id"], name="conn-50"), headers=api.headers()
    )
    # Then: 409 connection_limit_reached, and it still has exactly 50
    assert_problem(response, 409, "connection_limit_reached")
    listed = api.client.get("/v1/connections", params={"limit": 200}, headers=api.headers()).json()
    assert len(listed["items"]) == 50
    # And: the limit is per tenant: tenant b can still make one
    make_connection(api, tenant="b", name="conn-50")
    # And: once a deletes one, it can make another
    assert api.client.delete("/v1/connections/conn-00", headers=api.headers()).status_code == 204
    make_connection(api, template, name="conn-50")


def test_a_duplicate_name_is_name_taken(api):
    # Given: tenant a has a connection named sfdc-prod
    template = make_template(api)
    first = make_connection(api, template, name="sfdc-prod")
    # When: it makes another with the same name
    body = connection_body(template["id"], name="sfdc-prod", base_url="https://other.example.com")
    response = api.client.post("/v1/connections", json=body, headers=api.headers())
    # Then: 409 name_taken, and the first connection is untouched
    assert_problem(response, 409, "name_taken")
    assert api.client.get("/v1/connections/sfdc-prod", headers=api.headers()).json() == first


def test_names_are_unique_per_tenant_only(api):
    # Given: tenant a has a connection named sfdc-prod
    make_connection(api, tenant="a", name="sfdc-prod")
    # When: tenant b makes its own sfdc-prod
    theirs = make_connection(api, tenant="b", name="sfdc-prod", base_url="https://b.example.com")
    # Then: each tenant addresses its own connection by that name
    assert api.client.get("/v1/connections/sfdc-prod", headers=api.headers("b")).json() == theirs
    mine = api.client.get("/v1/connections/sfdc-prod", headers=api.headers("a")).json()
    assert mine["base_url"] == "https://api.example.com/v1"


def test_a_connection_is_addressed_by_id_or_by_name(api):
    # Given: a connection
    created = make_connection(api, name="sfdc-prod")
    # When: it is fetched by id and by name
    by_id = api.client.get(f"/v1/connections/{created['id']}", headers=api.headers())
    by_name = api.client.get("/v1/connections/sfdc-prod", headers=api.headers())
    # Then: both answers are the connection as created
    assert by_id.status_code == 200 and by_name.status_code == 200
    assert by_id.json() == created
    assert by_name.json() == created


def test_list_shows_the_tenants_connections_oldest_first(api):
    # Given: tenant a has two connections, tenant b one
    template = make_template(api)
    first = make_connection(api, template, name="first")
    second = make_connection(api, template, name="second")
    make_connection(api, tenant="b", name="theirs")
    # When: tenant a lists its connections
    response = api.client.get("/v1/connections", headers=api.headers())
    # Then: it sees its two, oldest first, and nothing of b
    assert response.status_code == 200
    assert response.json() == {"items": [first, second], "next_cursor": None}


def test_another_tenants_connection_does_not_exist_for_you(api):
    # Given: a connection of tenant a
    created = make_connection(api, tenant="a", name="sfdc-prod")
    # When: tenant b fetches it by id and by name, and tries to delete it
    by_id = api.client.get(f"/v1/connections/{created['id']}", headers=api.headers("b"))
    by_name = api.client.get("/v1/connections/sfdc-prod", headers=api.headers("b"))
    deleted = api.client.delete(f"/v1/connections/{created['id']}", headers=api.headers("b"))
    # Then: all three are 404, and a still has its connection
    assert_problem(by_id, 404, "not_found")
    assert_problem(by_name, 404, "not_found")
    assert_problem(deleted, 404, "not_found")
    assert api.client.get(f"/v1/connections/{created['id']}", headers=api.headers("a")).json() == created


def test_deleting_the_template_changes_no_connection(api):
    # Given: a connection made from a template
    template = make_template(api, auth_headers=SALESFORCE_HEADERS, verbs=["GET", "DELETE"])
    created = make_connection(api, template, name="sfdc-prod", auth_header_values={"X-Client-Key": "k"})
    # When: the template is deleted
    assert api.client.delete(f"/v1/templates/{template['id']}", headers=api.headers()).status_code == 204
    # Then: the connection is still there with the same copy of the rules
    fetched = api.client.get("/v1/connections/sfdc-prod", headers=api.headers())
    assert fetched.status_code == 200
    assert fetched.json() == created
    assert fetched.json()["template"]["verbs"] == ["GET", "DELETE"]
    # And: it still accepts requests that its copied verbs allow
    make_request(api, created, name="remove", method="DELETE")


def test_deleting_a_connection_removes_it_and_its_requests(api):
    # Given: a connection with a stored request
    template = make_template(api)
    created = make_connection(api, template, name="sfdc-prod")
    make_request(api, created, name="list-accounts")
    # When: it is deleted
    response = api.client.delete(f"/v1/connections/{created['id']}", headers=api.headers())
    # Then: 204; it is gone by id and by name, and not listed
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(api.client.get(f"/v1/connections/{created['id']}", headers=api.headers()), 404, "not_found")
    assert_problem(api.client.get("/v1/connections/sfdc-prod", headers=api.headers()), 404, "not_found")
    assert api.client.get("/v1/connections", headers=api.headers()).json()["items"] == []
    # And: its name is free again, and the new connection starts without requests
    again = make_connection(api, template, name="sfdc-prod")
    requests = api.client.get(f"/v1/connections/{again['id']}/requests", headers=api.headers())
    assert requests.json() == {"items": [], "next_cursor": None}
