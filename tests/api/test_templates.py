"""``/v1/templates``: the connection library. Templates are immutable."""

from __future__ import annotations

import base64

import pytest

from tests.api.helpers import assert_problem, error_locs, list_all, make_template, template_body


def test_creating_a_template_echoes_it(api):
    # Given: a template with one required and one defaulted auth header
    body = template_body(
        name="Salesforce REST",
        service_name="Salesforce",
        auth_type="oauth2",
        auth_headers=[
            {"name": "X-Client-Key", "required": True, "default": None},
            {"name": "X-Api-Version", "required": False, "default": "58.0"},
        ],
        verbs=["GET", "POST", "PATCH"],
    )
    # When: it is posted
    response = api.client.post("/v1/templates", json=body, headers=api.headers())
    # Then: 201 with every field as given, plus an id and a creation time
    assert response.status_code == 201, response.text
    created = response.json()
    assert {k: created[k] for k in body} == body
    assert created["id"]
    assert created["created_at"].endswith("Z")


def test_auth_header_flags_default_to_optional_without_a_default(api):
    # When: a template names an auth header and nothing else about it
    created = make_template(api, auth_headers=[{"name": "X-Tenant"}])
    # Then: the header is optional and has no default
    assert created["auth_headers"] == [{"name": "X-Tenant", "required": False, "default": None}]


def test_verbs_are_upper_cased_and_deduplicated_in_order(api):
    # When: verbs are given in mixed case, with repeats
    created = make_template(api, verbs=["get", "Post", "GET", "delete", "post"])
    # Then: they are stored upper-cased, each once, in first-seen order
    assert created["verbs"] == ["GET", "POST", "DELETE"]
    fetched = api.client.get(f"/v1/templates/{created['id']}", headers=api.headers()).json()
    assert fetched["verbs"] == ["GET", "POST", "DELETE"]


def test_every_verb_of_the_contract_is_accepted(api):
    # When: a template allows all eight verbs
    verbs = ["GET", "PUT", "POST", "DELETE", "TRACE", "PATCH", "HEAD", "OPTIONS"]
    created = make_template(api, verbs=verbs)
    # Then: all eight are kept
    assert created["verbs"] == verbs


@pytest.mark.parametrize("verbs", [["GET", "FETCH"], ["CONNECT"], ["G E T"]])
def test_an_unknown_verb_is_invalid_verb(api, verbs):
    # When: a template names a verb outside the eight
    response = api.client.post("/v1/templates", json=template_body(verbs=verbs), headers=api.headers())
    # Then: 422 invalid_verb, and nothing is stored
    problem = assert_problem(response, 422, "invalid_verb")
    assert all(loc[:2] == ["body", "verbs"] for loc in error_locs(problem))
    assert api.client.get("/v1/templates", headers=api.headers()).json()["items"] == []


def test_an_empty_verb_list_is_invalid_verb(api):
    # When: a template allows no verb at all
    response = api.client.post("/v1/templates", json=template_body(verbs=[]), headers=api.headers())
    # Then: 422 invalid_verb
    assert_problem(response, 422, "invalid_verb")


@pytest.mark.parametrize("method", ["soap", "graphql"])
def test_an_integration_method_other_than_rest_is_refused(api, method):
    # When: a template asks for an integration method the hub does not have
    body = template_body(integration_method=method)
    response = api.client.post("/v1/templates", json=body, headers=api.headers())
    # Then: 422 unsupported_integration_method located at the field
    problem = assert_problem(response, 422, "unsupported_integration_method")
    assert ["body", "integration_method"] in error_locs(problem)


def test_an_unknown_auth_type_is_a_validation_problem(api):
    # When: a template asks for an authentication type outside none and oauth2
    response = api.client.post("/v1/templates", json=template_body(auth_type="basic"), headers=api.headers())
    # Then: 422 validation_error located at auth_type
    problem = assert_problem(response, 422, "validation_error")
    assert ["body", "auth_type"] in error_locs(problem)


def test_duplicate_auth_header_names_are_refused(api):
    # When: a template names the same header twice, differing only in case
    body = template_body(auth_headers=[{"name": "X-Key"}, {"name": "x-key", "required": True}])
    response = api.client.post("/v1/templates", json=body, headers=api.headers())
    # Then: 422 validation_error
    assert_problem(response, 422, "validation_error")


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        (template_body(colour="blue"), ["body", "colour"]),
        (
            template_body(auth_headers=[{"name": "X-Key", "secret": True}]),
            ["body", "auth_headers", 0, "secret"],
        ),
    ],
    ids=["top-level", "in-auth-header"],
)
def test_unknown_fields_are_refused(api, body, loc):
    # When: a template body carries a field the contract does not name
    response = api.client.post("/v1/templates", json=body, headers=api.headers())
    # Then: 422 validation_error pointing at that field, and nothing is stored
    problem = assert_problem(response, 422, "validation_error")
    assert loc in error_locs(problem)
    assert api.client.get("/v1/templates", headers=api.headers()).json()["items"] == []


@pytest.mark.parametrize("method", ["PUT", "PATCH"])
def test_templates_cannot_be_changed(api, method):
    # Given: an existing template
    template = make_template(api, name="original")
    # When: a client tries to change it
    response = api.client.request(
        method, f"/v1/templates/{template['id']}", json=template_body(name="changed"), headers=api.headers()
    )
    # Then: 405 template_immutable, and the template is unchanged
    assert_problem(response, 405, "template_immutable")
    fetched = api.client.get(f"/v1/templates/{template['id']}", headers=api.headers()).json()
    assert fetched == template


def test_get_one_and_list(api):
    # Given: two templates
    first = make_template(api, name="first")
    second = make_template(api, name="second", verbs=["DELETE"])
    # When: the client fetches one, then the list
    one = api.client.get(f"/v1/templates/{second['id']}", headers=api.headers())
    listed = api.client.get("/v1/templates", headers=api.headers())
    # Then: each answer shows the templates as created, the list oldest first
    assert one.status_code == 200
    assert one.json() == second
    assert listed.status_code == 200
    assert listed.json() == {"items": [first, second], "next_cursor": None}


def test_deleted_template_is_gone(api):
    # Given: a template
    template = make_template(api)
    # When: it is deleted
    response = api.client.delete(f"/v1/templates/{template['id']}", headers=api.headers())
    # Then: 204 with no body; it can no longer be fetched nor is it listed
    assert response.status_code == 204
    assert response.content == b""
    assert_problem(api.client.get(f"/v1/templates/{template['id']}", headers=api.headers()), 404, "not_found")
    assert api.client.get("/v1/templates", headers=api.headers()).json()["items"] == []


def test_deleting_a_template_twice_is_404(api):
    # Given: a template that was deleted
    template = make_template(api)
    api.client.delete(f"/v1/templates/{template['id']}", headers=api.headers())
    # When: it is deleted again
    response = api.client.delete(f"/v1/templates/{template['id']}", headers=api.headers())
    # Then: 404 not_found
    assert_problem(response, 404, "not_found")


def test_another_tenants_template_does_not_exist_for_you(api):
    # Given: a template of tenant a
    template = make_template(api, "a")
    # When: tenant b fetches and deletes it by id
    fetched = api.client.get(f"/v1/templates/{template['id']}", headers=api.headers("b"))
    deleted = api.client.delete(f"/v1/templates/{template['id']}", headers=api.headers("b"))
    # Then: both are 404, exactly like an unknown id, and a still has its template
    assert_problem(fetched, 404, "not_found")
    assert_problem(deleted, 404, "not_found")
    unknown = api.client.get("/v1/templates/00000000-0000-7000-8000-000000000000", headers=api.headers("b"))
    assert_problem(unknown, 404, "not_found")
    assert api.client.get(f"/v1/templates/{template['id']}", headers=api.headers("a")).json() == template


def test_pages_walk_every_template_once_in_creation_order(api):
    # Given: five templates
    created = [make_template(api, name=f"template-{i}")["id"] for i in range(5)]
    # When: the client walks the list two at a time
    pages = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        response = api.client.get("/v1/templates", params=params, headers=api.headers())
        assert response.status_code == 200, response.text
        pages.append(response.json())
        cursor = pages[-1]["next_cursor"]
        if cursor is None or len(pages) > 5:
            break
    # Then: three pages of 2, 2 and 1, holding all five once, oldest first; the last has no cursor
    assert [len(page["items"]) for page in pages] == [2, 2, 1]
    assert [item["id"] for page in pages for item in page["items"]] == created
    assert [page["next_cursor"] is None for page in pages] == [False, False, True]


def test_a_page_that_ends_exactly_at_the_last_item_has_no_cursor(api):
    # Given: four templates
    created = [make_template(api, name=f"template-{i}")["id"] for i in range(4)]
    # When: the client walks them two at a time
    walked = list_all(api, "/v1/templates", limit=2)
    # Then: it gets all four, and no empty trailing page was promised
    assert [item["id"] for item in walked] == created
    first_page = api.client.get("/v1/templates", params={"limit": 2}, headers=api.headers()).json()
    second_page = api.client.get(
        "/v1/templates", params={"limit": 2, "cursor": first_page["next_cursor"]}, headers=api.headers()
    ).json()
    assert len(second_page["items"]) == 2
    assert second_page["next_cursor"] is None


def test_the_default_page_holds_fifty(api):
    # Given: fifty-one templates
    for i in range(51):
        make_template(api, name=f"template-{i}")
    # When: the list is asked for without a limit
    page = api.client.get("/v1/templates", headers=api.headers()).json()
    # Then: the first page holds 50 and promises more
    assert len(page["items"]) == 50
    assert page["next_cursor"] is not None


@pytest.mark.parametrize("limit", [0, -1, 201])
def test_a_limit_outside_1_to_200_is_a_validation_problem(api, limit):
    # When: the list is asked for with a limit out of range
    response = api.client.get("/v1/templates", params={"limit": limit}, headers=api.headers())
    # Then: 422 validation_error located at the limit
    problem = assert_problem(response, 422, "validation_error")
    assert ["query", "limit"] in error_locs(problem)


@pytest.mark.parametrize("limit", [1, 200])
def test_limits_at_the_bounds_are_accepted(api, limit):
    # Given: one template
    template = make_template(api)
    # When: the list is asked for with the smallest and largest limits
    response = api.client.get("/v1/templates", params={"limit": limit}, headers=api.headers())
    # Then: the template is listed
    assert response.status_code == 200
    assert response.json() == {"items": [template], "next_cursor": None}


GARBAGE_CURSORS = [
    pytest.param("garbage", id="not-base64"),
    pytest.param("not a cursor", id="with-spaces"),
    pytest.param(
        "!!!!",
        id="no-base64-characters",
    ),
    pytest.param(
        base64.urlsafe_b64encode(b"hello").decode(),
        id="base64-of-a-non-id",
    ),
    pytest.param(
        base64.urlsafe_b64encode(b"\x00").decode(),
        id="base64-of-nul",
    ),
]


@pytest.mark.parametrize("cursor", GARBAGE_CURSORS)
def test_a_cursor_the_hub_did_not_issue_is_a_validation_problem(api, cursor):
    # Given: one template, so a wrongly accepted cursor would be visible
    make_template(api)
    # When: the list is asked for with a cursor the hub never handed out
    response = api.client.get("/v1/templates", params={"cursor": cursor}, headers=api.headers())
    # Then: 422 validation_error located at the cursor
    problem = assert_problem(response, 422, "validation_error")
    assert ["query", "cursor"] in error_locs(problem)
