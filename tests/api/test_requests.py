"""``/v1/connections/{id}/requests``: the stored requests of a connection."""

from __future__ import annotations

import pytest

from tests.api.helpers import (
    assert_problem,
    error_locs,
    make_connection,
    make_request,
    make_template,
    request_body,
)


@pytest.fixture
def connection(api):
    """Tenant a's connection ``sfdc-prod`` to https://api.example.com, allowing GET, POST and PATCH."""
    template = make_template(api, verbs=["GET", "POST", "PATCH"])
    return make_connection(api, template, name="sfdc-prod", base_url="https://api.example.com/v1")


def post_request(api, connection, tenant="a", **overrides):
    """Post a request body (see ``request_body``) to the connection; the raw response."""
    return api.client.post(
        f"/v1/connections/{connection['id']}/requests",
        json=request_body(**overrides),
        headers=api.headers(tenant),
    )


def test_creating_a_request_echoes_it(api, connection):
    # Given: a manual request, its method in lower case
    body = request_body(
        name="get-account",
        method="get",
        url="/services/data/v58.0/sobjects/Account/001",
        headers={"Accept": "application/json"},
        query={"fields": "Id,Name"},
    )
    # When: it is stored on the connection
    response = api.client.post(f"/v1/connections/{connection['id']}/requests", json=body, headers=api.headers())
    # Then: 201 with the request as given, the method upper-cased, and its connection's id
    assert response.status_code == 201, response.text
    created = response.json()
    assert created["id"]
    assert created["connection_id"] == connection["id"]
    assert {k: created[k] for k in body} == {**body, "method": "GET"}


def test_a_request_can_be_stored_through_the_connection_name(api, connection):
    # When: the request is posted under the connection's name rather than its id
    response = api.client.post("/v1/connections/sfdc-prod/requests", json=request_body(), headers=api.headers())
    # Then: it is stored on that connection
    assert response.status_code == 201, response.text
    assert response.json()["connection_id"] == connection["id"]


@pytest.mark.parametrize("method", ["DELETE", "put", "HEAD"])
def test_a_method_outside_the_template_verbs_is_verb_not_allowed(api, connection, method):
    # When: a request uses a verb its connection's template does not allow
    response = post_request(api, connection, method=method)
    # Then: 422 verb_not_allowed located at the method, and nothing is stored
    problem = assert_problem(response, 422, "verb_not_allowed")
    assert ["body", "method"] in error_locs(problem)
    assert api.client.get("/v1/connections/sfdc-prod/requests", headers=api.headers()).json()["items"] == []


@pytest.mark.parametrize(
    ("media_type", "body"),
    [
        ("application/json", {"name": "Acme", "tags": ["a", "b"], "size": 3}),
        ("application/json", [1, 2, 3]),
        ("application/json-patch+json", [{"op": "replace", "path": "/name", "value": "Acme"}]),
        ("application/x-www-form-urlencoded", {"name": "Acme", "city": "Berlin"}),
        ("text/html", "<p>hello</p>"),
        ("text/plain", "hello"),
        ("text/xml", "<account><name>Acme</name></account>"),
    ],
)
def test_each_of_the_six_media_types_is_accepted_with_its_body(api, connection, media_type, body):
    # When: a POST request is stored with a body of the shape its media type allows
    response = post_request(api, connection, method="POST", media_type=media_type, body=body)
    # Then: it is stored with that media type and that body
    assert response.status_code == 201, response.text
    assert response.json()["media_type"] == media_type
    assert response.json()["body"] == body


@pytest.mark.parametrize("media_type", ["application/xml", "multipart/form-data", "image/png", "json"])
def test_another_media_type_is_unsupported_media_type(api, connection, media_type):
    # When: a request names a media type outside the six
    response = post_request(api, connection, method="POST", media_type=media_type, body="x")
    # Then: 422 unsupported_media_type located at the media type
    problem = assert_problem(response, 422, "unsupported_media_type")
    assert ["body", "media_type"] in error_locs(problem)


@pytest.mark.parametrize(
    ("media_type", "body"),
    [
        ("application/x-www-form-urlencoded", {"name": "Acme", "size": 3}),
        ("application/x-www-form-urlencoded", {"nested": {"a": "b"}}),
        ("application/x-www-form-urlencoded", ["name", "Acme"]),
        ("application/x-www-form-urlencoded", "name=Acme"),
        ("text/plain", {"text": "hello"}),
        ("text/html", ["<p>", "</p>"]),
        ("text/xml", 42),
    ],
    ids=["form-number", "form-nested", "form-list", "form-string", "plain-object", "html-list", "xml-number"],
)
def test_a_body_that_does_not_fit_its_media_type_is_invalid_body(api, connection, media_type, body):
    # When: a request's body has a shape its media type does not allow
    response = post_request(api, connection, method="POST", media_type=media_type, body=body)
    # Then: 422 invalid_body located at the body
    problem = assert_problem(response, 422, "invalid_body")
    assert ["body", "body"] in error_locs(problem)


@pytest.mark.parametrize(
    "placeholders",
    [
        {"url": "/accounts/{account_id}"},
        {"url": "/accounts?since={{vars.since}}"},
        {"query": {"since": "{{vars.since}}"}},
        {"headers": {"X-Trace": "{{ vars.trace }}"}},
        {"method": "POST", "body": {"account": {"tags": ["{{vars.tag}}"]}}},
    ],
    ids=["path-param", "var-in-url", "var-in-query", "var-in-header", "var-in-body"],
)
def test_a_manual_request_with_caller_placeholders_is_refused(api, connection, placeholders):
    # When: a manual request uses a placeholder only a caller could fill
    response = post_request(api, connection, kind="manual", **placeholders)
    # Then: 422 manual_request_has_placeholders
    assert_problem(response, 422, "manual_request_has_placeholders")


def test_a_studio_request_may_have_caller_placeholders(api, connection):
    # When: a studio request uses path parameters and variables
    created = make_request(
        api,
        connection,
        name="get-account",
        kind="studio",
        method="POST",
        url="/accounts/{account_id}/notes",
        query={"since": "{{vars.since}}"},
        headers={"X-Trace": "{{vars.trace}}"},
        body={"text": "{{vars.text}}"},
    )
    # Then: it is stored as given
    assert created["kind"] == "studio"
    assert created["url"] == "/accounts/{account_id}/notes"
    assert created["body"] == {"text": "{{vars.text}}"}


def test_a_manual_request_may_use_secrets_and_the_token(api, connection):
    # When: a manual request refers to a secret and to the connection's token
    created = make_request(
        api,
        connection,
        kind="manual",
        headers={"Authorization": "Bearer {{token}}", "X-Key": "{{secrets.api_key}}"},
        query={"key": "{{secrets.api_key}}"},
    )
    # Then: it is stored, these not being caller placeholders
    assert created["headers"]["Authorization"] == "Bearer {{token}}"


def test_an_unknown_kind_is_a_validation_problem(api, connection):
    # When: a request is neither manual nor studio
    response = post_request(api, connection, kind="automatic")
    # Then: 422 validation_error located at kind
    problem = assert_problem(response, 422, "validation_error")
    assert ["body", "kind"] in error_locs(problem)


def test_an_absolute_url_to_an_allowed_host_is_accepted(api, connection):
    # When: a request gives an absolute URL on the connection's own host
    created = make_request(api, connection, url="https://api.example.com/other/path")
    # Then: it is stored as given
    assert created["url"] == "https://api.example.com/other/path"


@pytest.mark.parametrize(
    "url",
    [
        "https://evil.example.net/steal",
        "https://api.example.com@evil.example.net/steal",
        "https://example.com/x",
    ],
    ids=["other-host", "userinfo-trick", "parent-domain"],
)
def test_an_absolute_url_to_another_host_is_host_not_allowed(api, connection, url):
    # When: a request aims its URL at a host outside the connection's allowed hosts
    response = post_request(api, connection, url=url)
    # Then: 422 host_not_allowed located at the url, and nothing is stored
    problem = assert_problem(response, 422, "host_not_allowed")
    assert ["body", "url"] in error_locs(problem)
    assert api.client.get("/v1/connections/sfdc-prod/requests", headers=api.headers()).json()["items"] == []


def test_a_relative_url_needs_a_base_url(api):
    # Given: a connection without a base URL
    connection = make_connection(api, base_url=None, allowed_hosts=["api.example.com"])
    # When: a request gives a relative URL
    response = post_request(api, connection, url="/accounts")
    # Then: 422 invalid_url
    assert_problem(response, 422, "invalid_url")


def test_unknown_fields_are_refused(api, connection):
    # When: a request body carries a field the contract does not name
    response = api.client.post(
        f"/v1/connections/{connection['id']}/requests",
        json={**request_body(), "timeout": 5},
        headers=api.headers(),
    )
    # Then: 422 validation_error pointing at it
    problem = assert_problem(response, 422, "validation_error")
    assert ["body", "timeout"] in error_locs(problem)


def test_the_51st_request_of_a_connection_is_refused(api, connection):
    # Given: a connection with 50 stored requests
    for i in range(50):
        make_request(api, connection, name=f"request-{i:02d}")
    # When: one more is stored
    response = post_request(api, connection, name="request-50")
    # Then: 409 request_limit_reached, and the connection still has 50
    assert_problem(response, 409, "request_limit_reached")
    listed = api.client.get(
        f"/v1/connections/{connection['id']}/requests", params={"limit": 200}, headers=api.headers()
    ).json()
    assert len(listed["items"]) == 50
    # And: the limit is per connection: another connection of the tenant can still store one
    other = make_connection(api, name="other")
    make_request(api, other, name="request-50")


def test_a_duplicate_name_in_the_same_connection_is_name_taken(api, connection):
    # Given: a request named get-account
    first = make_request(api, connection, name="get-account")
    # When: another request of the same connection takes that name
    response = post_request(api, connection, name="get-account", url="/elsewhere")
    # Then: 409 name_taken, and the first request is untouched
    assert_problem(response, 409, "name_taken")
    fetched = api.client.get("/v1/connections/sfdc-prod/requests/get-account", headers=api.headers())
    assert fetched.json() == first


def test_the_same_name_in_another_connection_is_fine(api, connection):
    # Given: a request named get-account on sfdc-prod
    make_request(api, connection, name="get-account")
    # When: another connection stores a request with the same name
    other = make_connection(api, name="other")
    created = make_request(api, other, name="get-account")
    # Then: it is stored on that connection
    assert created["connection_id"] == other["id"]


def test_list_and_get_by_id_or_name(api, connection):
    # Given: two stored requests
    first = make_request(api, connection, name="list-accounts")
    second = make_request(api, connection, name="create-account", method="POST", body={"name": "Acme"})
    # When: the client lists them and fetches one by id and by name
    listed = api.client.get(f"/v1/connections/{connection['id']}/requests", headers=api.headers())
    by_id = api.client.get(f"/v1/connections/{connection['id']}/requests/{second['id']}", headers=api.headers())
    by_name = api.client.get("/v1/connections/sfdc-prod/requests/create-account", headers=api.headers())
    # Then: the list holds both, oldest first, and both fetches return the request as created
    assert listed.status_code == 200
    assert listed.json() == {"items": [first, second], "next_cursor": None}
    assert by_id.status_code == 200 and by_id.json() == second
    assert by_name.status_code == 200 and by_name.json() == second


def test_a_request_is_only_found_under_its_own_connection(api, connection):
    # Given: a request of sfdc-prod and a second connection
    stored = make_request(api, connection, name="get-account")
    make_connection(api, name="other")
    # When: the request is looked up under the other connection
    by_id = api.client.get(f"/v1/connections/other/requests/{stored['id']}", headers=api.headers())
    by_name = api.client.get("/v1/connections/other/requests/get-account", headers=api.headers())
    # Then: it is not there
    assert_problem(by_id, 404, "not_found")
    assert_problem(by_name, 404, "not_found")


def test_another_tenants_requests_do_not_exist_for_you(api, connection):
    # Given: a request of tenant a's connection
    stored = make_request(api, connection, name="get-account")
    b = api.headers("b")
    # When: tenant b lists, fetches and adds requests on that connection
    listed = api.client.get(f"/v1/connections/{connection['id']}/requests", headers=b)
    by_id = api.client.get(f"/v1/connections/{connection['id']}/requests/{stored['id']}", headers=b)
    by_name = api.client.get("/v1/connections/sfdc-prod/requests/get-account", headers=b)
    created = post_request(api, connection, tenant="b", name="sneaky")
    # Then: every call is 404, and a's connection holds only its own request
    for response in (listed, by_id, by_name, created):
        assert_problem(response, 404, "not_found")
    mine = api.client.get(f"/v1/connections/{connection['id']}/requests", headers=api.headers()).json()
    assert mine["items"] == [stored]
