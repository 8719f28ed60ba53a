"""API fuzzing with schemathesis: every operation of the hub's own ``/openapi.json``, as two tenants.

The app runs in this process on the test database (SQLite, then PostgreSQL when configured) with
a recording queue in place of the broker: no worker runs, so no job ever calls out, and requests
reach the app through schemathesis' ASGI client, without a socket. For every operation that the
served document lists, schemathesis generates valid (positive) and invalid (negative) requests.
Each is sent as tenant ``a``, as tenant ``b``, or with the credentials schemathesis made up (none,
or a key that does not exist). Path parameters and the reference fields of bodies and queries
(``template_id``, ``connection``, ``request``) are, drawn at random, left as generated, aimed at
the caller's own scratch objects, or aimed at the other tenant's canary objects.

Every answer must:

- not be a ``5xx``;
- conform to the document: a documented status and content type, a body valid against its schema,
  documented headers, and invalid input refused (schemathesis' ``status_code_conformance``,
  ``content_type_conformance``, ``response_headers_conformance``, ``response_schema_conformance``,
  ``negative_data_rejection``);
- when it is an error, be a problem document (``application/problem+json`` with ``type``,
  ``title``, ``status`` and ``detail``) whose ``code`` is one of the API's error codes;
- never carry another tenant's ids, canary names or callback key unless the caller sent that
  value itself, and never a secret's value; and a reference to another tenant's object never
  succeeds.

Each tenant owns canary objects that only the other tenant and anonymous callers aim at: a
template, an OAuth 2.0 connection with a secret, a stored request and a queued job. Their owner
reads them through the API before and after the run: they must be unchanged.

``HUB_FUZZ_EXAMPLES`` sets the number of examples per operation: 20 by default, for CI, and 500
with ``HUB_RELIABILITY=full`` (the full run of ``pytest -m reliability``, docs/RELIABILITY.md).
The run is derandomized, so the same code sends the same requests. A longer run, by hand::

    HUB_FUZZ_EXAMPLES=500 pytest tests/fuzz -q

``?wait=`` of ``GET /v1/executions/{job_id}`` is capped at 0.05 s, since no worker ever finishes
a job. Cases that repeat a query parameter are not sent: the hub, like Starlette, reads the last
value, where schemathesis expects a refusal.
"""

from __future__ import annotations

import json
import os
import secrets
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode, checks
from schemathesis.python import asgi
from sqlalchemy.engine import Engine

from api_shim.app import create_app, openapi_document
from models import errors
from tests.conftest import RecordingQueue, new_tenant, test_settings

pytestmark = pytest.mark.reliability

EXAMPLES = int(os.environ.get("HUB_FUZZ_EXAMPLES", "500" if os.environ.get("HUB_RELIABILITY") == "full" else "20"))
BASE_URL = f"http://{asgi.HOST}"

CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_headers_conformance,
    checks.response_schema_conformance,
    checks.negative_data_rejection,
]
"""Schemathesis' checks of one answer that send nothing more (no check here calls the API again)."""

API_MD_CODES = {
    "template_immutable", "unsupported_integration_method", "missing_auth_header", "invalid_verb",
    "connection_limit_reached", "host_not_allowed", "request_limit_reached",
    "manual_request_has_placeholders", "verb_not_allowed", "unsupported_media_type",
    "idempotency_key_reused", "missing_variable", "tenant_quota_exceeded",
}
"""The error codes that API.md names."""


def _error_codes() -> set[str]:
    """The codes of the hub's errors that an API call answers: those with a 4xx status."""
    found, classes = set(), [errors.HubError]
    while classes:
        cls = classes.pop()
        classes.extend(cls.__subclasses__())
        if 400 <= cls.status < 500:
            found.add(cls.code)
    return found


ERROR_CODES = _error_codes()

PATH_SLOTS = {"template_id": "template", "connection": "connection", "request": "request", "job_id": "job",
              "name": "secret"}
"""The path parameters that name an object, and its kind."""
QUERY_SLOTS = {("GET", "/v1/executions"): {"connection": "connection"}}
BODY_SLOTS = {
    ("POST", "/v1/connections"): {"template_id": "template"},
    ("POST", "/v1/executions"): {"connection": "connection", "request": "request"},
}
"""The fields of queries and bodies that refer to an object, per operation."""
REFERENCES = {"template", "connection", "request", "job"}
"""Kinds whose slot looks an object up; a secret's name in a path names the caller's own secret."""
CALLERS = ("a", "b", "a", "b", "generated")
"""Who sends a case: tenant ``a`` or ``b`` (two in five each), or whatever credentials schemathesis
generated (one in five)."""


def _operations() -> list[tuple[str, str]]:
    return sorted(
        (method.upper(), path) for path, operations in openapi_document()["paths"].items() for method in operations
    )


OPERATIONS = _operations()


@dataclass
class Objects:
    """A tenant's template, connection (with one secret), stored request and job."""

    template_id: str
    template_name: str
    connection_id: str
    connection_name: str
    secret_name: str
    request_id: str
    request_name: str
    job_id: str

    def refs(self, kind: str) -> list[str]:
        """The values that refer to this set's object of ``kind``."""
        return {
            "template": [self.template_id, self.template_name],
            "connection": [self.connection_id, self.connection_name],
            "request": [self.request_id, self.request_name],
            "job": [self.job_id],
            "secret": [self.secret_name],
        }[kind]

    def values(self) -> set[str]:
        """Every id and name of the set."""
        return {value for kind in ("template", "connection", "request", "job", "secret") for value in self.refs(kind)}


@dataclass
class Tenant:
    """One tenant of the run: its key, its canary and scratch objects, and what it may see."""

    label: str
    id: str
    key: str
    secret_value: str
    canary: Objects | None = None
    scratch: Objects | None = None
    owned: set[str] = field(default_factory=set)
    """Strings that are this tenant's alone: ids, canary names, callback keys."""
    callback_key: str = ""
    rotated: bool = False
    """Whether a case of the tenant's own rotated its callback key."""

    @property
    def headers(self) -> dict[str, str]:
        """The tenant's ``Authorization`` header."""
        return {"Authorization": f"Bearer {self.key}"}


class Hub:
    """The app in-process, its ASGI client, and two tenants with canary and scratch objects."""

    def __init__(self, engine: Engine, database_url: str, redis_url: str) -> None:
        self.queue = RecordingQueue()
        self.app = create_app(test_settings(database_url, redis_url=redis_url), engine=engine, enqueue=self.queue)
        # Not entered: no lifespan, so no listener for ?wait=; a waiting request reads the database again.
        self.client = asgi.get_client(self.app)
        self.tenants = {
            label: Tenant(label, *new_tenant(engine, f"fuzz-{label}"), secret_value=f"canary-{secrets.token_hex(12)}")
            for label in ("a", "b")
        }
        self.told: dict[str, set[str]] = {label: set() for label in CALLERS}
        """Other tenants' strings that each caller has sent itself (it may read them back)."""
        self.stats: Counter[str] = Counter()
        for tenant in self.tenants.values():
            tenant.owned.add(tenant.id)
            tenant.canary = self.build(tenant, "canary")
            tenant.scratch = self.build(tenant, "scratch")
            tenant.owned |= tenant.canary.values() | tenant.scratch.values()
            tenant.callback_key = self.call("GET", "/v1/callback-key", tenant, expect=200)["key"]
            tenant.owned.add(tenant.callback_key)

    def call(self, method: str, path: str, tenant: Tenant, expect: int | None = None, **kwargs: Any) -> Any:
        """A call as ``tenant``; its JSON body (None when it has none), after checking its status."""
        response = self.client.request(method, BASE_URL + path, headers=tenant.headers, **kwargs)
        if expect is not None:
            assert response.status_code == expect, f"{method} {path}: {response.status_code} {response.text}"
        return response.json() if response.content else None

    def build(self, tenant: Tenant, role: str, job_id: str | None = None) -> Objects:
        """A new set of objects for ``tenant``, made through the API; ``job_id`` keeps an existing job."""
        tag = f"{tenant.label}-{role}-{secrets.token_hex(4)}"
        secret_name = f"{tenant.label}_{role}_{secrets.token_hex(4)}"
        template = self.call("POST", "/v1/templates", tenant, 201, json={
            "name": f"{tag}-template", "service_name": f"{tag}-service", "integration_method": "rest",
            "auth_type": "oauth2", "auth_headers": [{"name": "X-Client-Key", "required": True, "default": None}],
            "verbs": ["GET", "POST", "PATCH"],
        })
        connection = self.call("POST", "/v1/connections", tenant, 201, json={
            "name": f"{tag}-connection", "template_id": template["id"], "description": f"{tag} connection",
            "base_url": f"https://api.{tenant.label}.example.com/v1",
            "auth_header_values": {"X-Client-Key": f"{{{{secrets.{secret_name}}}}}"},
            "oauth2": {"grant_type": "client_credentials", "token_url": f"https://login.{tenant.label}.example.com/token",
                       "client_id": "{{secrets.client_id}}", "client_secret": f"{{{{secrets.{secret_name}}}}}",
                       "scope": "api"},
        })
        self.call("PUT", f"/v1/connections/{connection['id']}/secrets/{secret_name}", tenant, 204,
                  json={"value": tenant.secret_value})
        stored = self.call("POST", f"/v1/connections/{connection['id']}/requests", tenant, 201, json={
            "name": f"{tag}-request", "kind": "manual", "method": "GET", "url": "/accounts",
            "headers": {"Accept": "application/json"}, "query": {"fields": "id,name"},
        })
        if job_id is None:
            job_id = self.call("POST", "/v1/executions", tenant, 202,
                               json={"connection": connection["id"], "request": stored["id"]})["id"]
        return Objects(template["id"], template["name"], connection["id"], connection["name"], secret_name,
                       stored["id"], stored["name"], job_id)

    def rebuild_scratch(self, tenant: Tenant) -> None:
        """The tenant's scratch objects again, after a case changed or removed them (its job stays)."""
        assert tenant.scratch is not None and tenant.canary is not None
        old = tenant.scratch
        self.client.request("DELETE", BASE_URL + f"/v1/templates/{old.template_id}", headers=tenant.headers)
        # The scratch connection, and any a case made: the tenant stays below its 50 connections.
        for connection in self.call("GET", "/v1/connections?limit=200", tenant, 200)["items"]:
            if connection["id"] != tenant.canary.connection_id:
                self.client.request("DELETE", BASE_URL + f"/v1/connections/{connection['id']}", headers=tenant.headers)
        tenant.scratch = self.build(tenant, "scratch", job_id=old.job_id)
        tenant.owned |= tenant.scratch.values()
        self.stats["scratch rebuilds"] += 1

    def snapshot(self, tenant: Tenant) -> dict[str, Any]:
        """The tenant's canary objects, and its callback key, as the tenant reads them."""
        canary = tenant.canary
        assert canary is not None
        connection = f"/v1/connections/{canary.connection_id}"
        return {
            "template": self.call("GET", f"/v1/templates/{canary.template_id}", tenant, 200),
            "connection": self.call("GET", connection, tenant, 200),
            "request": self.call("GET", f"{connection}/requests/{canary.request_id}", tenant, 200),
            "requests": self.call("GET", f"{connection}/requests", tenant, 200),
            "secrets": self.call("GET", f"{connection}/secrets", tenant, 200),
            "job": self.call("GET", f"/v1/executions/{canary.job_id}", tenant, 200),
        }


@pytest.fixture
def hub(engine: Engine, database_url: str, redis_url: str) -> Iterator[Hub]:
    """The app on the test database and a real Redis, with tenants ``a`` and ``b`` and their objects."""
    hub = Hub(engine, database_url, redis_url)
    yield hub
    hub.client.close()


def _strategy(operation: Any) -> st.SearchStrategy[Any]:
    """Positive and negative cases of ``operation``; positive only when it has nothing to get wrong."""
    positive = operation.as_strategy(GenerationMode.POSITIVE)
    definition = operation.definition.raw
    if not definition.get("parameters") and "requestBody" not in definition and not definition.get("security"):
        return positive
    return st.one_of(positive, operation.as_strategy(GenerationMode.NEGATIVE))


def _aim(hub: Hub, data: st.DataObject, kind: str, caller: Tenant | None) -> tuple[str, str | None]:
    """Where a slot of ``kind`` points: ``generated`` (keep it), ``own`` or ``other``, and the value."""
    source = data.draw(st.sampled_from(("generated", "own", "other") if caller else ("generated", "other")))
    if source == "generated":
        return source, None
    if source == "own":
        assert caller is not None and caller.scratch is not None
        objects = caller.scratch
    else:
        others = [t for t in hub.tenants.values() if t is not caller]
        target = others[0] if len(others) == 1 else data.draw(st.sampled_from(others))
        assert target.canary is not None
        objects = target.canary
    return source, data.draw(st.sampled_from(objects.refs(kind)))


@dataclass
class Aimed:
    """What a case was aimed at."""

    own: bool = False
    other_references: list[str] = field(default_factory=list)
    other_values: list[str] = field(default_factory=list)

    def note(self, kind: str, source: str, value: str | None) -> None:
        if value is None:
            return
        if source == "own":
            self.own = True
        elif source == "other":
            self.other_values.append(value)
            if kind in REFERENCES:
                self.other_references.append(value)


def _aim_case(hub: Hub, case: Any, data: st.DataObject, caller: Tenant | None) -> Aimed:
    """Point the case's path parameters and reference fields at objects, each drawn at random."""
    aimed = Aimed()
    key = (case.operation.method.upper(), case.operation.path)
    parameters = dict(case.path_parameters or {})
    for name in sorted(parameters):
        if name in PATH_SLOTS:
            source, value = _aim(hub, data, PATH_SLOTS[name], caller)
            if value is not None:
                parameters[name] = value
            aimed.note(PATH_SLOTS[name], source, value)
    if parameters:
        case.path_parameters = parameters
    for name, kind in QUERY_SLOTS.get(key, {}).items():
        source, value = _aim(hub, data, kind, caller)
        if value is not None:
            case.query = {**(case.query or {}), name: value}
        aimed.note(kind, source, value)
    if isinstance(case.body, dict):
        body = dict(case.body)
        for name, kind in BODY_SLOTS.get(key, {}).items():
            source, value = _aim(hub, data, kind, caller)
            if value is not None:
                body[name] = value
            aimed.note(kind, source, value)
        case.body = body
    wait = (case.query or {}).get("wait")
    if isinstance(wait, int | float) and not isinstance(wait, bool) and wait > 0.05:
        case.query = {**case.query, "wait": 0.05}
    return aimed


def _check_problem(response: Any, where: str) -> None:
    """An error answer is a problem document with one of the API's codes."""
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/problem+json"), f"{where}: {content_type!r}"
    problem = response.json()
    assert isinstance(problem, dict), where
    for name in ("type", "title", "detail", "code"):
        assert isinstance(problem.get(name), str) and problem[name], f"{where}: no {name} in {problem}"
    assert problem.get("status") == response.status_code, f"{where}: {problem}"
    if response.status_code < 500:
        assert problem["code"] in ERROR_CODES, f"{where}: code {problem['code']!r} is not an API error code"


def _check_unauthorized(response: Any, where: str) -> None:
    """A call without a valid key is ``401``; only a body that is not JSON at all is refused
    first (FastAPI parses the body before it runs the dependency that checks the key)."""
    if response.status_code == 422:
        locs = [error["loc"] for error in response.json().get("errors", [])]
        assert locs and all(loc[:1] == ["body"] for loc in locs), f"{where}: {locs}"
        return
    assert response.status_code == 401, where


def _check_no_leak(hub: Hub, caller_label: str, response: Any, where: str) -> None:
    """The answer holds no secret value, and no other tenant's string the caller did not send."""
    text = response.content.decode("utf-8", "replace") + json.dumps(response.headers)
    for tenant in hub.tenants.values():
        assert tenant.secret_value not in text, f"{where}: the answer holds {tenant.label}'s secret value"
        if tenant.label == caller_label:
            continue
        leaked = sorted(value for value in tenant.owned - hub.told[caller_label] if value in text)
        assert not leaked, f"{where}: the answer to {caller_label} holds {tenant.label}'s {leaked}"
    hub.stats["leak checks"] += 1


def _harvest(tenant: Tenant, body: Any) -> None:
    """The ids in an answer to ``tenant`` are the tenant's own from now on (a generated value too
    short to be an id, such as a fuzzed ``client_certificate.key``, is not one)."""
    if isinstance(body, dict):
        for name, value in body.items():
            if name in ("id", "connection_id", "request_id", "template_id") and isinstance(value, str):
                if len(value) >= 16:
                    tenant.owned.add(value)
            else:
                _harvest(tenant, value)
    elif isinstance(body, list):
        for item in body:
            _harvest(tenant, item)


def _run_case(hub: Hub, case: Any, data: st.DataObject) -> None:
    # Starlette reads a repeated query parameter as its last value, and the hub keeps that rule:
    # such cases (schemathesis counts ?cursor=x&cursor=y as invalid) are not sent.
    assume(not any(isinstance(value, list) for value in (case.query or {}).values()))
    caller_label = data.draw(st.sampled_from(CALLERS))
    caller = hub.tenants.get(caller_label)
    secured = bool(case.operation.definition.raw.get("security"))
    if caller is not None and secured:
        case.headers = {**(case.headers or {}), **caller.headers}
    aimed = _aim_case(hub, case, data, caller)
    hub.told[caller_label].update(aimed.other_values)
    where = f"{case.operation.label} as {caller_label}: {case!r}"

    response = case.call_and_validate(base_url=BASE_URL, session=hub.client, checks=CHECKS)

    hub.stats["examples"] += 1
    hub.stats[f"status {response.status_code}"] += 1
    if response.status_code >= 400:
        _check_problem(response, where)
    if secured:
        _check_no_leak(hub, caller_label, response, where)
        if caller is None:  # no key, or one that does not exist: 401 before anything is looked up
            _check_unauthorized(response, where)
        if aimed.other_references:
            hub.stats["cross-tenant references"] += 1
            assert response.status_code >= 400, f"{where}: another tenant's object was served"
    if caller is None or not secured or response.status_code >= 300:
        return
    _harvest(caller, response.json() if response.content else None)
    if case.operation.path.startswith("/v1/callback-key"):
        caller.owned.add(response.json()["key"])
        caller.rotated = caller.rotated or case.operation.path.endswith("/rotate")
    if aimed.own and case.method.upper() != "GET":
        hub.rebuild_scratch(caller)


def test_the_api_error_codes_include_those_api_md_names() -> None:
    # Given the codes API.md names, then each is the code of one of the hub's 4xx errors
    assert API_MD_CODES <= ERROR_CODES
    assert {"unauthorized", "not_found", "validation_error"} <= ERROR_CODES


@pytest.mark.timeout(120 + EXAMPLES)  # a second more per example than CI's run needs: long runs end too
@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_fuzz_operation_as_two_tenants(hub: Hub, method: str, path: str) -> None:
    # Given the document the app serves, and the canary objects of both tenants as their owners see them
    served = hub.client.get(BASE_URL + "/openapi.json")
    assert served.status_code == 200
    schema = schemathesis.openapi.from_dict(served.json())
    operation = schema.find_operation_by_label(f"{method} {path}")
    assert operation is not None
    before = {label: hub.snapshot(tenant) for label, tenant in hub.tenants.items()}

    # When schemathesis sends the operation its examples, as either tenant or as nobody
    @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(case=_strategy(operation), data=st.data())
    def fuzz(case: Any, data: st.DataObject) -> None:
        _run_case(hub, case, data)

    fuzz()

    # Then every answer passed the checks (above), and each tenant's canaries are as they were
    after = {label: hub.snapshot(tenant) for label, tenant in hub.tenants.items()}
    assert after == before
    for tenant in hub.tenants.values():  # a callback key changes only when its own tenant rotates it
        key = hub.call("GET", "/v1/callback-key", tenant, 200)["key"]
        assert tenant.rotated or key == tenant.callback_key
    assert hub.stats["examples"] >= min(EXAMPLES, 1)
    print(f"{method} {path}: {dict(sorted(hub.stats.items()))}")


def test_not_ready_is_a_documented_answer(engine: Engine, database_url: str) -> None:
    # Given the app with its Redis on a loopback port where nothing listens
    app = create_app(test_settings(database_url, redis_url="redis://127.0.0.1:1/0"), engine=engine,
                     enqueue=RecordingQueue())
    client = asgi.get_client(app)
    schema = schemathesis.openapi.from_dict(client.get(BASE_URL + "/openapi.json").json())
    operation = schema.find_operation_by_label("GET /readyz")
    assert operation is not None

    # When schemathesis asks whether the hub is ready
    @settings(max_examples=1, derandomize=True, database=None, deadline=None)
    @given(case=operation.as_strategy(GenerationMode.POSITIVE))
    def ask(case: Any) -> None:
        excluded = [checks.not_a_server_error]  # 503 is what the contract says here
        response = case.call_and_validate(base_url=BASE_URL, session=client, checks=CHECKS,
                                          excluded_checks=excluded)
        # Then the answer is the documented 503 problem
        assert response.status_code == 503
        _check_problem(response, "GET /readyz")
        assert response.json()["code"] == "not_ready"

    ask()
    client.close()
