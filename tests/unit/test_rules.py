"""The rules of the data, called as plain functions."""

from __future__ import annotations

from typing import Any

import pytest

from models import errors, rules

AUTH_HEADERS = [
    {"name": "X-Client-Key", "required": True, "default": None},
    {"name": "X-Api-Version", "required": False, "default": "58.0"},
]


# --- verbs -------------------------------------------------------------------------------


def test_verbs_are_upper_cased_and_deduplicated_in_order() -> None:
    # Given verbs in mixed case, with repeats
    # When they are normalized
    verbs = rules.normalize_verbs(["post", "GET", "Post", "patch", "get"], loc=["verbs"])
    # Then each appears once, upper-cased, where it first appeared
    assert verbs == ["POST", "GET", "PATCH"]


def test_all_eight_verbs_are_accepted() -> None:
    # Given every verb API.md names
    given = ["GET", "PUT", "POST", "DELETE", "TRACE", "PATCH", "HEAD", "OPTIONS"]
    # When they are normalized
    verbs = rules.normalize_verbs([v.lower() for v in given], loc=["verbs"])
    # Then all are kept
    assert verbs == given


@pytest.mark.parametrize("bad", ["FETCH", "CONNECT", "", "G ET"])
def test_unknown_verb_is_refused(bad: str) -> None:
    # Given a list with a verb that is not among the eight
    # When it is normalized
    with pytest.raises(errors.InvalidVerb) as caught:
        rules.normalize_verbs(["GET", bad], loc=["verbs"])
    # Then it is refused with invalid_verb, pointing at the bad item
    assert caught.value.code == "invalid_verb"
    assert caught.value.status == 422
    assert caught.value.extra["errors"][0]["loc"] == ["body", "verbs", 1]


def test_empty_verbs_are_refused() -> None:
    # Given no verbs at all
    # When they are normalized
    with pytest.raises(errors.InvalidVerb) as caught:
        rules.normalize_verbs([], loc=["verbs"])
    # Then it is refused with invalid_verb
    assert caught.value.code == "invalid_verb"


# --- auth headers ------------------------------------------------------------------------


def test_required_auth_header_without_value_is_refused() -> None:
    # Given a template with a required auth header, and a connection that gives no value
    # When the connection's auth header values are computed
    with pytest.raises(errors.MissingAuthHeader) as caught:
        rules.resolve_auth_headers(AUTH_HEADERS, {"X-Api-Version": "59.0"})
    # Then it is refused with missing_auth_header, naming the header
    assert caught.value.code == "missing_auth_header"
    assert "X-Client-Key" in str(caught.value)


def test_default_fills_an_optional_auth_header() -> None:
    # Given a value for the required header only
    # When the values are computed
    values = rules.resolve_auth_headers(AUTH_HEADERS, {"X-Client-Key": "{{secrets.client_key}}"})
    # Then the optional header takes its default
    assert values == {"X-Client-Key": "{{secrets.client_key}}", "X-Api-Version": "58.0"}


def test_given_value_overrides_the_default() -> None:
    # Given a value for the optional header too
    # When the values are computed
    values = rules.resolve_auth_headers(AUTH_HEADERS, {"X-Client-Key": "k", "X-Api-Version": "60.0"})
    # Then the given value wins
    assert values["X-Api-Version"] == "60.0"


def test_auth_header_names_match_case_insensitively() -> None:
    # Given values whose names differ from the template's only in case
    # When the values are computed
    values = rules.resolve_auth_headers(AUTH_HEADERS, {"x-client-key": "k", "X-API-VERSION": "61.0"})
    # Then they count, under the template's spelling
    assert values == {"X-Client-Key": "k", "X-Api-Version": "61.0"}


def test_optional_header_without_default_is_not_sent() -> None:
    # Given an optional header without a default and no value for it
    headers = [{"name": "X-Tenant", "required": False, "default": None}]
    # When the values are computed
    values = rules.resolve_auth_headers(headers, {})
    # Then it is left out
    assert values == {}


def test_header_unknown_to_the_template_is_refused() -> None:
    # Given a value for a header the template does not name
    # When the values are computed
    with pytest.raises(errors.InvalidInput) as caught:
        rules.resolve_auth_headers(AUTH_HEADERS, {"X-Client-Key": "k", "X-Other": "v"})
    # Then it is refused
    assert caught.value.status == 422
    assert "X-Other" in str(caught.value)


# --- media types -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "body"),
    [
        ("application/json", {"a": [1, 2]}),
        ("application/json", [1, "x"]),
        ("application/json", "just a string"),
        ("application/json", 3),
        ("application/json-patch+json", [{"op": "add", "path": "/a", "value": 1}]),
        ("application/x-www-form-urlencoded", {"a": "1", "b": "two"}),
        ("text/plain", "hello"),
        ("text/html", "<p>hi</p>"),
        ("text/xml", "<a/>"),
        ("text/plain", None),
        ("application/x-www-form-urlencoded", None),
    ],
)
def test_body_that_fits_its_media_type_is_accepted(media_type: str, body: Any) -> None:
    # Given a body of the shape its media type allows
    # When it is checked
    # Then nothing is raised
    rules.check_media_type(media_type, body)


@pytest.mark.parametrize(
    ("media_type", "body"),
    [
        ("application/x-www-form-urlencoded", {"a": 1}),
        ("application/x-www-form-urlencoded", "a=1"),
        ("application/x-www-form-urlencoded", ["a"]),
        ("text/plain", {"a": "b"}),
        ("text/html", 5),
        ("text/xml", ["<a/>"]),
    ],
)
def test_body_that_does_not_fit_its_media_type_is_refused(media_type: str, body: Any) -> None:
    # Given a body of the wrong shape for its media type
    # When it is checked
    with pytest.raises(errors.InvalidBody) as caught:
        rules.check_media_type(media_type, body)
    # Then it is refused with invalid_body
    assert caught.value.code == "invalid_body"


@pytest.mark.parametrize(
    "media_type", ["application/xml", "multipart/form-data", "APPLICATION/JSON", "text/csv", ""]
)
def test_unknown_media_type_is_refused(media_type: str) -> None:
    # Given a media type outside the six
    # When it is checked
    with pytest.raises(errors.UnsupportedMediaType) as caught:
        rules.check_media_type(media_type, None)
    # Then it is refused with unsupported_media_type
    assert caught.value.code == "unsupported_media_type"


# --- placeholders ------------------------------------------------------------------------


def test_caller_placeholders_are_found_everywhere() -> None:
    # Given a request with path parameters and variables in every part
    # When its caller placeholders are listed
    found = rules.caller_placeholders(
        "/accounts/{account_id}/{{vars.section}}",
        {"X-Since": "{{vars.since}}"},
        {"limit": "{{ vars.limit }}"},
        {"filter": {"owner": ["{{vars.owner}}"]}},
    )
    # Then each one is named with its kind
    assert found == {"path:account_id", "vars:section", "vars:since", "vars:limit", "vars:owner"}


def test_secrets_and_token_are_not_caller_placeholders() -> None:
    # Given a request that uses only secrets and the token
    # When its caller placeholders are listed
    found = rules.caller_placeholders(
        "/x", {"Authorization": "Bearer {{token}}", "X-Key": "{{secrets.key}}"}, {}, None
    )
    # Then there are none: the hub fills those in itself
    assert found == set()


def test_missing_values_names_what_the_caller_did_not_give() -> None:
    # Given placeholders, and values for some of them
    placeholders = {"path:id", "path:sub", "vars:a", "vars:b"}
    # When the missing ones are listed
    missing = rules.missing_values(placeholders, {"id": "7"}, {"b": 0})
    # Then exactly the others are named, in a stable order
    assert missing == ["path:sub", "vars:a"]


def test_path_param_value_does_not_satisfy_a_variable() -> None:
    # Given a variable placeholder, and a path parameter of the same name
    # When the missing ones are listed
    missing = rules.missing_values({"vars:id"}, {"id": "7"}, {})
    # Then the variable is still missing: the two kinds do not mix
    assert missing == ["vars:id"]


# --- hosts and URLs ----------------------------------------------------------------------


def test_default_allowed_hosts_are_base_and_token_hosts() -> None:
    # Given a base URL and an OAuth token URL on different hosts
    # When the default allowed hosts are computed
    hosts = rules.default_allowed_hosts(
        "https://Example.My.Salesforce.com/services",
        {"token_url": "https://login.example.com:8443/services/oauth2/token"},
    )
    # Then both hosts are allowed, lower-cased, without port
    assert hosts == ["example.my.salesforce.com", "login.example.com"]


def test_default_allowed_hosts_deduplicates_and_handles_absent_urls() -> None:
    # Given the same host twice, then no URLs at all
    # When the default allowed hosts are computed
    same = rules.default_allowed_hosts(
        "https://api.example.com", {"token_url": "https://API.example.com/token"}
    )
    none = rules.default_allowed_hosts(None, None)
    # Then the host is listed once, and no URL gives no host
    assert same == ["api.example.com"]
    assert none == []


@pytest.mark.parametrize(
    ("base_url", "url", "expected"),
    [
        ("https://api.example.com", "/a", "https://api.example.com/a"),
        ("https://api.example.com/", "a", "https://api.example.com/a"),
        ("https://api.example.com/v1/", "/a", "https://api.example.com/v1/a"),
        ("https://api.example.com", "https://other.example.com/b", "https://other.example.com/b"),
        (None, "https://other.example.com/b", "https://other.example.com/b"),
        ("https://api.example.com", "//evil.example.net/x", "https://api.example.com/evil.example.net/x"),
    ],
)
def test_resolve_url(base_url: str | None, url: str, expected: str) -> None:
    # Given a base URL and a request URL
    # When the URL is resolved
    # Then a relative URL stays under the base URL's host, and an absolute one is kept
    assert rules.resolve_url(base_url, url) == expected


def test_relative_url_without_base_url_is_refused() -> None:
    # Given a relative URL and a connection without base URL
    # When the URL is resolved
    with pytest.raises(errors.InvalidUrl) as caught:
        rules.resolve_url(None, "/a")
    # Then it is refused with invalid_url
    assert caught.value.code == "invalid_url"


def test_https_url_is_accepted_and_its_host_returned() -> None:
    # Given an https URL
    # When its scheme is checked with http disallowed
    host = rules.check_url_scheme("https://API.Example.com:8443/x", allow_http=False, loc=["url"])
    # Then it passes and its host comes back lower-cased
    assert host == "api.example.com"


def test_http_url_is_refused_unless_http_is_allowed() -> None:
    # Given an http URL
    # When its scheme is checked with http disallowed
    with pytest.raises(errors.SchemeNotAllowed) as caught:
        rules.check_url_scheme("http://api.example.com/x", allow_http=False, loc=["url"])
    # Then it is refused with scheme_not_allowed, pointing at the field
    assert caught.value.code == "scheme_not_allowed"
    assert caught.value.extra["errors"][0]["loc"] == ["body", "url"]


def test_http_url_is_accepted_when_http_is_allowed() -> None:
    # Given an http URL and a hub that allows http
    # When its scheme is checked
    host = rules.check_url_scheme("http://api.example.com/x", allow_http=True, loc=["url"])
    # Then it passes
    assert host == "api.example.com"


@pytest.mark.parametrize("url", ["ftp://api.example.com/x", "file:///etc/passwd", "gopher://x/"])
def test_other_schemes_are_refused_even_with_http_allowed(url: str) -> None:
    # Given a URL whose scheme is neither https nor http
    # When its scheme is checked with http allowed
    with pytest.raises(errors.SchemeNotAllowed):
        rules.check_url_scheme(url, allow_http=True, loc=["url"])
    # Then it is refused (asserted by pytest.raises)


def test_url_without_host_is_refused() -> None:
    # Given an https URL without a host
    # When its scheme is checked
    with pytest.raises(errors.InvalidUrl) as caught:
        rules.check_url_scheme("https:///path", allow_http=False, loc=["url"])
    # Then it is refused with invalid_url
    assert caught.value.code == "invalid_url"


@pytest.mark.parametrize("name", ["grant_type", "client_secret", "client_assertion", "scope"])
def test_extra_params_cannot_set_what_the_hub_sets(name: str) -> None:
    # Given OAuth settings whose extra parameters name a parameter the hub sets itself
    oauth2 = {"grant_type": "client_credentials", "token_url": "https://login.example.com/token",
              "client_id": "cid", "client_secret": "{{secrets.s}}", "extra_params": {name: "x"}}
    # When they are checked, then they are refused, pointing at that parameter
    with pytest.raises(errors.InvalidOAuth2) as caught:
        rules.check_oauth2("oauth2", oauth2)
    assert caught.value.extra["errors"][0]["loc"] == ["body", "oauth2", "extra_params", name]


def test_oauth2_credentials_must_be_secret_references() -> None:
    # Given a client secret typed in as text, then it is refused: credentials live in secrets
    oauth2 = {"grant_type": "client_credentials", "token_url": "https://login.example.com/token",
              "client_id": "cid", "client_secret": "plain-text"}
    with pytest.raises(errors.SecretReferenceRequired):
        rules.check_oauth2("oauth2", oauth2)
