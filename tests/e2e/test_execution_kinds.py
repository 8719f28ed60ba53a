"""Every kind of execution through the real stack: stored studio requests, ad-hoc requests,
and each of the six media types as the service receives them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Stack

pytestmark = pytest.mark.e2e

MEDIA = [
    ("application/json", {"a": "{{vars.a}}", "n": "{{vars.n}}"}, '{"a":"x \\"y\\"","n":2}', "application/json"),
    ("application/json-patch+json", [{"op": "add", "path": "/a", "value": "{{vars.a}}"}],
     '[{"op":"add","path":"/a","value":"x \\"y\\""}]', "application/json-patch+json"),
    ("application/x-www-form-urlencoded", {"a": "{{vars.a}}", "b": "c d"}, "a=x+%22y%22&b=c+d",
     "application/x-www-form-urlencoded"),
    ("text/html", "<p>{{vars.a}}</p>", '<p>x "y"</p>', "text/html; charset=utf-8"),
    ("text/plain", "say {{vars.a}}", 'say x "y"', "text/plain; charset=utf-8"),
    ("text/xml", "<a>{{vars.a}}</a>", '<a>x "y"</a>', "text/xml; charset=utf-8"),
]


@pytest.fixture(scope="module")
def hub(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api, headers=stack.headers(), timeout=30) as client:
        template = client.post("/v1/templates", json={"name": "kinds", "service_name": "Demo",
                                                      "verbs": ["GET", "POST", "PUT", "PATCH"]})
        assert template.status_code == 201, template.text
        created = client.post("/v1/connections", json={"name": "kinds", "template_id": template.json()["id"],
                                                       "base_url": stack.upstream})
        assert created.status_code == 201, created.text
        yield client


def _run(hub: httpx.Client, **submission: Any) -> dict[str, Any]:
    submitted = hub.post("/v1/executions", json={"connection": "kinds", **submission})
    assert submitted.status_code == 202, submitted.text
    for _ in range(6):
        job = hub.get(f"/v1/executions/{submitted.json()['id']}?wait=10").json()
        if job["status"] in ("succeeded", "failed"):
            return job
    raise AssertionError(job)


@pytest.mark.parametrize(("media_type", "body", "received", "content_type"), MEDIA, ids=[m[0] for m in MEDIA])
def test_each_media_type_arrives_encoded_as_it_says(hub, media_type, body, received, content_type) -> None:
    # When an ad-hoc request with this media type and a variable runs
    job = _run(hub, adhoc={"method": "POST", "url": "/echo/media", "body": body, "media_type": media_type},
               variables={"a": 'x "y"', "n": 2})
    # Then the service received the body encoded as the media type says, with its Content-Type
    assert job["status"] == "succeeded", job
    echo = json.loads(job["result"]["body"])
    assert echo["headers"]["content-type"] == content_type
    assert echo["body"] == received


def test_a_studio_request_fills_path_parameters_and_variables(hub) -> None:
    # Given a stored studio request with a path parameter, a query variable and a header variable
    created = hub.post("/v1/connections/kinds/requests", json={
        "name": "studio", "kind": "studio", "method": "GET", "url": "/echo/items/{item}",
        "query": {"since": "{{vars.since}}"}, "headers": {"X-Trace": "t-{{vars.trace}}"}})
    assert created.status_code == 201, created.text
    # When the caller fills them, one value holding characters that mean something in a URL
    job = _run(hub, request="studio", path_params={"item": "a/b c?"}, variables={"since": "2026-01-01", "trace": 7})
    # Then each arrived as data: the path parameter percent-encoded, the rest in place
    echo = json.loads(job["result"]["body"])
    assert echo["path"] == "/echo/items/a%2Fb%20c%3F"
    assert echo["query"] == {"since": "2026-01-01"}
    assert echo["headers"]["x-trace"] == "t-7"


def test_a_variable_cannot_inject_a_header(hub, stack) -> None:
    # When a caller's variable tries to end a header line and start another
    job = _run(hub, adhoc={"method": "GET", "url": "/echo/inject", "headers": {"X-Note": "{{vars.note}}"}},
               variables={"note": "ok\r\nX-Evil: 1"})
    # Then the job fails before anything is sent
    assert (job["status"], job["error"]["code"]) == ("failed", "invalid_header")
    assert "/echo/inject" not in httpx.get(f"{stack.upstream}/stats", timeout=5).json()


def test_a_missing_variable_is_refused_before_anything_is_queued(hub) -> None:
    response = hub.post("/v1/executions", json={"connection": "kinds",
                                                "adhoc": {"method": "GET", "url": "/echo/{{vars.where}}"}})
    assert response.status_code == 422 and response.json()["code"] == "missing_variable"
