"""``/v1/connections/{id}/secrets``: write-only secrets, sealed at rest, opened only by a job.

No answer may ever carry a secret's value, so every test that sends one also checks that the
response text does not contain it. A job is run in-process with ``httpx.MockTransport`` and a
fake resolver: no socket is opened to any web service.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import datetime
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlmodel import Session

from models import secrets
from models.vault import Sealed, Vault
from tests.api.helpers import assert_problem, error_locs, list_all, make_connection, make_request, make_template
from tests.conftest import TEST_MASTER_KEY, in_process_runtime, test_settings
from worker.executor import run_job

SECRET = "s3cr3t-Value-7f9c2e-do-not-show"
OTHER_SECRET = "an0ther-Value-41b8aa-do-not-show"
PUBLIC_ADDRESS = "93.184.215.14"


@pytest.fixture
def connection(api):
    """Tenant a's connection ``sfdc-prod`` to https://api.example.com/v1."""
    template = make_template(api, verbs=["GET", "POST"])
    return make_connection(api, template, name="sfdc-prod", base_url="https://api.example.com/v1")


def put_secret(api, connection_ref: str, name: str, value: Any = SECRET, tenant: str = "a") -> httpx.Response:
    """``PUT /v1/connections/{connection_ref}/secrets/{name}`` with ``{"value": value}``."""
    return api.client.put(
        f"/v1/connections/{connection_ref}/secrets/{name}", json={"value": value}, headers=api.headers(tenant)
    )


def list_secrets(api, connection_ref: str, tenant: str = "a") -> httpx.Response:
    """``GET /v1/connections/{connection_ref}/secrets``."""
    return api.client.get(f"/v1/connections/{connection_ref}/secrets", headers=api.headers(tenant))


def secret_rows(engine: Engine) -> list[dict[str, Any]]:
    """Every row of the ``secret`` table as the database holds it, read with SQLAlchemy Core."""
    table = sa.Table("secret", sa.MetaData(), autoload_with=engine)
    with engine.connect() as connection:
        return [dict(row._mapping) for row in connection.execute(sa.select(table))]


def count_secrets(engine: Engine, connection_id: str) -> int:
    """How many rows of the ``secret`` table belong to the connection."""
    table = sa.Table("secret", sa.MetaData(), autoload_with=engine)
    statement = sa.select(sa.func.count()).select_from(table).where(table.c.connection_id == connection_id)
    with engine.connect() as connection:
        return int(connection.execute(statement).scalar_one())


def as_bytes(value: Any) -> bytes:
    """A column value as bytes, whatever type the driver hands back."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return str(value).encode()


def parsed(timestamp: str) -> datetime:
    """An RFC 3339 timestamp of the API as an aware datetime."""
    value = datetime.fromisoformat(timestamp)
    assert value.tzinfo is not None, timestamp
    return value


# --- create, list, replace, delete ---------------------------------------------------------


def test_a_put_secret_is_listed_by_name_and_times_only(api, connection):
    # When: a secret is put on the connection, addressed by id
    response = put_secret(api, connection["id"], "client_secret")
    # Then: 204 with an empty body
    assert response.status_code == 204, response.text
    assert response.content == b""
    # And: the list shows its name and times, and nowhere its value
    listed = list_secrets(api, connection["id"])
    assert listed.status_code == 200, listed.text
    assert SECRET not in listed.text
    page = listed.json()
    assert page["next_cursor"] is None
    assert [item["name"] for item in page["items"]] == ["client_secret"]
    item = page["items"][0]
    assert set(item) == {"name", "created_at", "updated_at"}
    assert parsed(item["created_at"]) == parsed(item["updated_at"])


def test_a_secret_can_be_managed_through_the_connection_name(api, connection):
    # When: a secret is put, listed and deleted through the connection's name
    put = put_secret(api, "sfdc-prod", "api_token")
    listed = list_secrets(api, "sfdc-prod")
    # Then: the put is 204 and the secret belongs to the connection (listed under its id too)
    assert put.status_code == 204, put.text
    assert [item["name"] for item in listed.json()["items"]] == ["api_token"]
    assert [item["name"] for item in list_secrets(api, connection["id"]).json()["items"]] == ["api_token"]
    # And: deleting it by the connection's name removes it
    deleted = api.client.delete("/v1/connections/sfdc-prod/secrets/api_token", headers=api.headers())
    assert deleted.status_code == 204, deleted.text
    assert list_secrets(api, connection["id"]).json()["items"] == []


def test_replacing_a_secret_moves_updated_at_but_not_created_at(api, connection):
    # Given: a secret, as first listed
    assert put_secret(api, connection["id"], "client_secret", SECRET).status_code == 204
    (before,) = list_secrets(api, connection["id"]).json()["items"]
    time.sleep(0.05)  # timestamps have millisecond precision
    # When: it is put again with another value
    response = put_secret(api, connection["id"], "client_secret", OTHER_SECRET)
    # Then: 204; still one secret of that name, created when it was, updated later
    assert response.status_code == 204, response.text
    listed = list_secrets(api, connection["id"])
    assert SECRET not in listed.text and OTHER_SECRET not in listed.text
    (after,) = listed.json()["items"]
    assert after["name"] == "client_secret"
    assert parsed(after["created_at"]) == parsed(before["created_at"])
    assert parsed(after["updated_at"]) > parsed(before["updated_at"])
    # And: a job of the connection would now read the new value
    with Session(api.engine) as session:
        opened = secrets.open_secrets(
            session,
            Vault.from_setting(TEST_MASTER_KEY),
            tenant_id=api.tenant_a,
            connection_id=connection["id"],
            names=["client_secret"],
        )
    assert opened == {"client_secret": OTHER_SECRET}


def test_a_deleted_secret_is_gone(api, connection):
    # Given: two secrets
    assert put_secret(api, connection["id"], "client_id").status_code == 204
    assert put_secret(api, connection["id"], "client_secret").status_code == 204
    # When: one is deleted
    response = api.client.delete(f"/v1/connections/{connection['id']}/secrets/client_id", headers=api.headers())
    # Then: 204 with an empty body; only the other remains listed
    assert response.status_code == 204, response.text
    assert response.content == b""
    assert [item["name"] for item in list_secrets(api, connection["id"]).json()["items"]] == ["client_secret"]
    # And: deleting it a second time is a 404 problem
    again = api.client.delete(f"/v1/connections/{connection['id']}/secrets/client_id", headers=api.headers())
    assert_problem(again, 404, "not_found")


def test_deleting_a_secret_that_never_existed_is_404(api, connection):
    # When: a client deletes a secret the connection does not have
    response = api.client.delete(f"/v1/connections/{connection['id']}/secrets/nope", headers=api.headers())
    # Then: a 404 problem document
    assert_problem(response, 404, "not_found")


def test_secrets_are_listed_page_by_page(api, connection):
    # Given: three secrets
    for name in ("first", "second", "third"):
        assert put_secret(api, connection["id"], name).status_code == 204
    # When: they are listed two at a time
    first_page = api.client.get(
        f"/v1/connections/{connection['id']}/secrets", params={"limit": 2}, headers=api.headers()
    ).json()
    every = list_all(api, f"/v1/connections/{connection['id']}/secrets", limit=2)
    # Then: the first page holds two and a cursor, and the pages together hold each secret once
    assert len(first_page["items"]) == 2 and first_page["next_cursor"]
    assert sorted(item["name"] for item in every) == ["first", "second", "third"]


# --- refused input ---------------------------------------------------------------------------


def test_deleting_a_secret_whose_name_holds_a_nul_is_a_client_error(api, connection):
    # Given: a connection with a secret
    assert put_secret(api, connection["id"], "ab").status_code == 204
    # When: a client deletes a secret whose name holds a NUL character (no secret can be so named)
    response = api.client.delete(f"/v1/connections/{connection['id']}/secrets/a%00b", headers=api.headers())
    # Then: a client error, as for any secret that does not exist (or a name that cannot be one), not a 500
    assert response.status_code in (404, 422), response.text
    assert_problem(response, response.status_code, "not_found" if response.status_code == 404 else "validation_error")
    # And: the connection's secret is untouched
    assert [item["name"] for item in list_secrets(api, connection["id"]).json()["items"]] == ["ab"]


@pytest.mark.parametrize("name", ["1abc", "a b"], ids=["leading-digit", "space"])
def test_an_invalid_secret_name_is_refused(api, connection, name):
    # When: a secret is put under a name that {{secrets.NAME}} could not refer to
    response = put_secret(api, connection["id"], name)
    # Then: 422 pointing at the name, without the value in the answer, and nothing is stored
    problem = assert_problem(response, 422, "validation_error")
    assert ["path", "name"] in error_locs(problem)
    assert SECRET not in response.text
    assert list_secrets(api, connection["id"]).json()["items"] == []
    assert secret_rows(api.engine) == []


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ["body", "value"]),
        ({"Value": SECRET}, ["body", "Value"]),
        ({"value": SECRET, "colour": "blue"}, ["body", "colour"]),
        ({"value": SECRET, "note": SECRET}, ["body", "note"]),
        ({"value": SECRET + "\u0000"}, ["body"]),
        ({"value": SECRET + "x" * 65_536}, ["body", "value"]),
    ],
    ids=["missing-value", "misspelt-field", "extra-field", "extra-field-holding-the-value", "nul", "too-long"],
)
def test_a_refused_body_does_not_echo_the_value(api, connection, body, loc):
    # When: a secret body is refused
    response = api.client.put(
        f"/v1/connections/{connection['id']}/secrets/client_secret", json=body, headers=api.headers()
    )
    # Then: 422 validation_error pointing at the problem, and the value is nowhere in the answer
    problem = assert_problem(response, 422, "validation_error")
    assert loc in error_locs(problem)
    assert SECRET not in response.text
    # And: nothing is stored
    assert list_secrets(api, connection["id"]).json()["items"] == []
    assert secret_rows(api.engine) == []


def test_a_body_that_is_not_json_does_not_echo_the_value(api, connection):
    # When: a client sends a truncated JSON document holding the value
    response = api.client.put(
        f"/v1/connections/{connection['id']}/secrets/client_secret",
        content=('{"value": "' + SECRET + '"').encode(),
        headers={**api.headers(), "Content-Type": "application/json"},
    )
    # Then: 422 validation_error, without the value, and nothing is stored
    assert_problem(response, 422, "validation_error")
    assert SECRET not in response.text
    assert secret_rows(api.engine) == []


# --- tenants -----------------------------------------------------------------------------------


def test_another_tenant_cannot_put_list_or_delete_your_secrets(api, connection):
    # Given: tenant a's connection holds a secret
    assert put_secret(api, connection["id"], "client_secret", SECRET).status_code == 204
    (before,) = list_secrets(api, connection["id"]).json()["items"]
    # When: tenant b puts, lists and deletes secrets on that connection, by id and by name
    put_by_id = put_secret(api, connection["id"], "client_secret", OTHER_SECRET, tenant="b")
    put_new = put_secret(api, "sfdc-prod", "planted", OTHER_SECRET, tenant="b")
    listed = list_secrets(api, connection["id"], tenant="b")
    deleted = api.client.delete(f"/v1/connections/{connection['id']}/secrets/client_secret", headers=api.headers("b"))
    # Then: every call is 404, as if the connection did not exist, and no answer has a value
    for response in (put_by_id, put_new, listed, deleted):
        assert_problem(response, 404, "not_found")
        assert SECRET not in response.text and OTHER_SECRET not in response.text
    # And: tenant a's secret is unchanged, and nothing else was stored
    assert list_secrets(api, connection["id"]).json()["items"] == [before]
    assert [row["name"] for row in secret_rows(api.engine)] == ["client_secret"]
    with Session(api.engine) as session:
        opened = secrets.open_secrets(
            session,
            Vault.from_setting(TEST_MASTER_KEY),
            tenant_id=api.tenant_a,
            connection_id=connection["id"],
            names=["client_secret"],
        )
    assert opened == {"client_secret": SECRET}


# --- at rest -----------------------------------------------------------------------------------


def test_the_stored_row_holds_no_plaintext(api, connection):
    # When: a secret is put
    assert put_secret(api, connection["id"], "client_secret", SECRET).status_code == 204
    # Then: its row exists, for this tenant, connection and name
    (row,) = secret_rows(api.engine)
    assert row["tenant_id"] == api.tenant_a
    assert row["connection_id"] == connection["id"]
    assert row["name"] == "client_secret"
    # And: no column holds the value, not even base64- or hex-encoded
    plain = SECRET.encode()
    for encoded in (plain, base64.b64encode(plain), plain.hex().encode()):
        for column, value in row.items():
            assert encoded not in as_bytes(value), f"column {column} holds the secret"
    # And: the row does hold the value, sealed: the master key opens it for that row only
    vault = Vault.from_setting(TEST_MASTER_KEY)
    sealed = Sealed(row["key_id"], as_bytes(row["nonce"]), as_bytes(row["ciphertext"]))
    assert vault.open(sealed, tenant_id=api.tenant_a, connection_id=connection["id"], name="client_secret") == SECRET


def test_deleting_a_connection_deletes_its_secrets(api, connection):
    # Given: the connection holds two secrets, and another connection one
    other = make_connection(api, name="other")
    for name in ("client_id", "client_secret"):
        assert put_secret(api, connection["id"], name).status_code == 204
    assert put_secret(api, other["id"], "client_id").status_code == 204
    assert count_secrets(api.engine, connection["id"]) == 2
    # When: the connection is deleted
    response = api.client.delete(f"/v1/connections/{connection['id']}", headers=api.headers())
    # Then: its secrets' rows are gone, and the other connection keeps its own
    assert response.status_code == 204, response.text
    assert count_secrets(api.engine, connection["id"]) == 0
    assert count_secrets(api.engine, other["id"]) == 1


# --- used by a job ---------------------------------------------------------------------------


def test_a_job_sends_the_secret_but_never_shows_it(api, connection, database_url):
    # Given: a stored request that sends a secret in a header
    assert put_secret(api, connection["id"], "api_token", SECRET).status_code == 204
    make_request(
        api, connection, name="whoami", url="/me", query={}, headers={"Authorization": "Bearer {{secrets.api_token}}"}
    )
    stored = api.client.get("/v1/connections/sfdc-prod/requests/whoami", headers=api.headers())
    assert SECRET not in stored.text
    # And: a submitted job of it
    submitted = api.client.post(
        "/v1/executions", json={"connection": "sfdc-prod", "request": "whoami"}, headers=api.headers()
    )
    assert submitted.status_code == 202, submitted.text
    job_id = submitted.json()["id"]
    assert api.queue.sent == [job_id]
    # When: a worker runs it in-process against a fake web service
    seen: list[httpx.Request] = []

    def service(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"user": "me"})

    settings = test_settings(database_url, allow_private_destinations=False, allow_http=False)
    runtime = in_process_runtime(settings, api.engine, httpx.MockTransport(service), lambda host, port: [PUBLIC_ADDRESS])
    with runtime.client:
        run_job(job_id, runtime)
    # Then: the web service got the secret's value in the header, once
    assert len(seen) == 1
    assert seen[0].url == "https://api.example.com/v1/me"
    assert seen[0].headers["authorization"] == f"Bearer {SECRET}"
    # And: the job succeeded and names the secret it read
    response = api.client.get(f"/v1/executions/{job_id}", headers=api.headers())
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "succeeded", job["error"]
    assert job["result"]["status_code"] == 200
    assert json.loads(job["result"]["body"]) == {"user": "me"}
    assert job["secrets_used"] == ["api_token"]
    # And: neither the job nor the job list shows the value
    assert SECRET not in response.text
    assert SECRET not in api.client.get("/v1/executions", headers=api.headers()).text
