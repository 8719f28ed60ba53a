"""OAuth 2.0 end to end: the real API, two worker processes, real Redis, and the demo
upstream's OAuth 2.0 server on loopback (it counts token requests, checks client
authentication, rotates refresh tokens and can be told to fail)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.e2e.conftest import Stack
from tests.e2e.leaks import database_dump, found_in, redis_dump
from tests.e2e.walkthrough import run_walkthrough

pytestmark = pytest.mark.e2e

GRANTS = ("client_credentials", "password", "refresh_token")
METHODS = ("client_secret_basic", "client_secret_post", "private_key_jwt")


@pytest.fixture
def hub(stack: Stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.api, headers=stack.headers(), timeout=30) as client:
        yield client


@pytest.fixture
def idp(stack: Stack) -> Iterator[httpx.Client]:
    """The OAuth server's admin API, reset to its defaults."""
    with httpx.Client(base_url=f"{stack.upstream}/oauth/admin", timeout=10) as client:
        assert client.post("/reset").status_code == 200
        yield client


def _pem(key: Any, public: bool) -> str:
    if public:
        return key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _oauth_connection(hub: httpx.Client, stack: Stack, idp: httpx.Client, name: str, *,
                      grant: str = "client_credentials", method: str = "client_secret_basic") -> None:
    """A connection to the demo OAuth server with the grant and client authentication asked for."""
    template = hub.post("/v1/templates", json={"name": name, "service_name": "Demo OAuth", "auth_type": "oauth2",
                                               "verbs": ["GET", "POST"],
                                               "auth_headers": [{"name": "X-Tenant-Tag", "required": True}]})
    assert template.status_code == 201, template.text
    client_id = f"{name}-client"
    oauth2: dict[str, Any] = {"grant_type": grant, "token_url": f"{stack.upstream}/oauth/token",
                              "client_id": client_id, "client_auth_method": method, "scope": "api",
                              "audience": "demo-api", "extra_params": {"resource": "items"}}
    secrets: dict[str, str] = {}
    if method == "private_key_jwt":
        key = ec.generate_private_key(ec.SECP256R1()) if grant == "password" else rsa.generate_private_key(65537, 2048)
        assert idp.post("/clients", json={"client_id": client_id, "public_key_pem": _pem(key, True)}).status_code == 200
        oauth2["private_key"] = "{{secrets.private_key}}"
        secrets["private_key"] = _pem(key, False)
    else:
        assert idp.post("/clients", json={"client_id": client_id, "client_secret": f"{name} s3cret+/="}).status_code == 200
        oauth2["client_secret"] = "{{secrets.client_secret}}"
        secrets["client_secret"] = f"{name} s3cret+/="
    if grant == "password":
        oauth2.update(username="demo-user", password="{{secrets.password}}")
        secrets["password"] = "demo-password"
    if grant == "refresh_token":
        seeded = idp.post("/refresh-tokens", json={"client_id": client_id}).json()["refresh_token"]
        oauth2["refresh_token"] = "{{secrets.refresh_token}}"
        secrets["refresh_token"] = seeded
    created = hub.post("/v1/connections", json={"name": name, "template_id": template.json()["id"],
                                                "base_url": stack.upstream, "oauth2": oauth2,
                                                "auth_header_values": {"X-Tenant-Tag": "e2e-{{secrets.tag}}"}})
    assert created.status_code == 201, created.text
    for secret, value in {**secrets, "tag": "t1"}.items():
        assert hub.put(f"/v1/connections/{name}/secrets/{secret}", json={"value": value}).status_code == 204


def _finished(hub: httpx.Client, job_id: str) -> dict[str, Any]:
    for _ in range(10):
        job = hub.get(f"/v1/executions/{job_id}?wait=10").json()
        if job["status"] in ("succeeded", "failed"):
            return job
    raise AssertionError(job)


def _auth(hub: httpx.Client, name: str) -> dict[str, Any]:
    submitted = hub.post("/v1/executions", json={"connection": name, "action": "auth"})
    assert submitted.status_code == 202, submitted.text
    return _finished(hub, submitted.json()["id"])


def _stats(idp: httpx.Client) -> dict[str, Any]:
    return idp.get("/stats").json()


@pytest.mark.parametrize("grant", GRANTS)
@pytest.mark.parametrize("method", METHODS)
def test_each_grant_and_client_authentication_gets_a_token(hub, stack, idp, grant: str, method: str) -> None:
    name = f"{grant[:4]}-{method[-4:]}".replace("_", "-")
    # Given a connection with this grant and client authentication
    _oauth_connection(hub, stack, idp, name, grant=grant, method=method)
    # When the auth action runs
    job = _auth(hub, name)
    # Then it got a token, and says so without showing it
    assert job["status"] == "succeeded", job
    assert job["result"]["token_type"] == "Bearer" and job["result"]["cached"] is False
    assert job["result"]["scope"] == "api" and job["result"]["expires_at"].endswith("Z")
    assert "access_token" not in str(job)
    # and the server saw exactly that grant and method, with scope, audience, extras and auth header
    seen = _stats(idp)["requests"]
    assert [(r["grant_type"], r["auth_method"], r["status"]) for r in seen] == [(grant, method, 200)]
    assert seen[0]["scope"] == "api" and seen[0]["audience"] == "demo-api"
    assert seen[0]["fields"]["resource"] == "items"
    assert seen[0]["headers"]["x-tenant-tag"] == "e2e-t1"


def test_a_rotated_refresh_token_replaces_the_stored_one(hub, stack, idp) -> None:
    # Given a refresh-token connection whose token was fetched once (the server rotated it)
    _oauth_connection(hub, stack, idp, "rotating", grant="refresh_token", method="client_secret_post")
    assert _auth(hub, "rotating")["result"]["cached"] is False
    # When the connection changes (its cached token is dropped) and a token is needed again
    assert hub.patch("/v1/connections/rotating", json={"description": "changed"}).status_code == 200
    again = _auth(hub, "rotating")
    # Then the second request presented the new refresh token, not the old one, and succeeded
    assert again["status"] == "succeeded", again
    assert again["result"]["cached"] is False
    first, second = _stats(idp)["requests"]
    assert first["refresh_token_id"] != second["refresh_token_id"]
    assert second["status"] == 200


def test_two_hundred_jobs_on_a_cold_cache_make_one_token_request(hub, stack, idp) -> None:
    # Given a connection with a cold cache and a slow token endpoint (a wide window for a race)
    _oauth_connection(hub, stack, idp, "flight")
    assert idp.post("/settings", json={"delay_s": 0.5}).status_code == 200
    assert hub.post("/v1/connections/flight/requests",
                    json={"name": "items", "method": "GET", "url": "/oauth/protected/items"}).status_code == 201
    # When 200 jobs run on two worker processes at once
    ids = [hub.post("/v1/executions", json={"connection": "flight", "request": "items"}).json()["id"]
           for _ in range(200)]
    jobs = [_finished(hub, job_id) for job_id in ids]
    # Then every one reached the service with a token, and the token endpoint was asked once
    assert sorted({job["status"] for job in jobs}) == ["succeeded"]
    assert {job["result"]["status_code"] for job in jobs} == {200}
    stats = _stats(idp)
    assert stats["token_requests"] == 1
    assert stats["protected_calls"] == 200


def test_a_token_is_cached_for_its_lifetime_less_the_leeway(hub, stack, idp) -> None:
    # Given tokens that live 4 s (the leeway, 60 s by default, is cut to half of that: 2 s)
    _oauth_connection(hub, stack, idp, "expiry")
    assert idp.post("/settings", json={"expires_in": 4}).status_code == 200
    first = _auth(hub, "expiry")["result"]
    # When asked again at once, then the cached token is used
    assert _auth(hub, "expiry")["result"]["cached"] is True
    # When 2 s have passed, then the token is gone from the cache and a new one is requested
    time.sleep(2.5)
    later = _auth(hub, "expiry")["result"]
    assert first["cached"] is False and later["cached"] is False
    assert _stats(idp)["token_requests"] == 2


def test_a_refused_cached_token_is_replaced_once(hub, stack, idp) -> None:
    # Given a cached token that the service has since revoked
    _oauth_connection(hub, stack, idp, "revoked")
    assert hub.post("/v1/connections/revoked/requests",
                    json={"name": "items", "method": "GET", "url": "/oauth/protected/items"}).status_code == 201
    assert _auth(hub, "revoked")["result"]["cached"] is False
    assert idp.post("/revoke", json={}).status_code == 200
    # When a request runs, then the 401 drops the token, a new one is fetched and the call retried
    job = _finished(hub, hub.post("/v1/executions", json={"connection": "revoked", "request": "items"}).json()["id"])
    assert job["status"] == "succeeded" and job["result"]["status_code"] == 200, job
    stats = _stats(idp)
    assert stats["token_requests"] == 2
    assert (stats["protected_calls"], stats["protected_unauthorized"]) == (2, 1)


def test_changing_a_secret_drops_the_cached_token(hub, stack, idp) -> None:
    # Given a connection whose token is cached
    _oauth_connection(hub, stack, idp, "change")
    _auth(hub, "change")
    assert _auth(hub, "change")["result"]["cached"] is True
    # When one of its secrets is written again, then the next job requests a new token
    assert hub.put("/v1/connections/change/secrets/tag", json={"value": "t2"}).status_code == 204
    assert _auth(hub, "change")["result"]["cached"] is False
    assert [r["headers"]["x-tenant-tag"] for r in _stats(idp)["requests"]] == ["e2e-t1", "e2e-t2"]


def test_token_endpoint_errors_fail_the_job_with_the_servers_words(hub, stack, idp) -> None:
    _oauth_connection(hub, stack, idp, "refused")
    # Given a token endpoint that refuses the client
    assert idp.post("/fail", json={"status": 401, "error": "invalid_client",
                                   "error_description": "client disabled", "count": 1}).status_code == 200
    job = _auth(hub, "refused")
    assert job["status"] == "failed"
    assert job["error"]["code"] == "token_request_failed"
    assert "invalid_client" in job["error"]["message"] and "client disabled" in job["error"]["message"]
    # Given one that fails twice with 503, then the third try (with backoff) succeeds
    assert idp.post("/fail", json={"status": 503, "error": "temporarily_unavailable", "count": 2}).status_code == 200
    assert _auth(hub, "refused")["status"] == "succeeded"
    assert [r["status"] for r in _stats(idp)["requests"]] == [401, 503, 503, 200]


def test_no_token_or_client_secret_is_left_anywhere(hub, stack, idp) -> None:
    # Given OAuth jobs of every kind have run (this module's tests, and one more here)
    _oauth_connection(hub, stack, idp, "leaks", grant="password", method="client_secret_post")
    _auth(hub, "leaks")
    # Then no access or refresh token (the server's begin demo-at- / demo-rt-) and no client
    # secret is in a job, a log line, Redis (token cache and broker messages) or the database
    listed = hub.get("/v1/executions?limit=200").text
    logs = stack.worker_logs() + (stack.logs / "api.log").read_text(errors="replace")
    in_redis = redis_dump(stack.env["HUB_REDIS_URL"])
    rows = database_dump(stack.env["HUB_DATABASE_URL"])
    for needle in ("demo-at-", "demo-rt-", "s3cret+/=", "demo-password"):
        assert needle not in listed, needle
        assert needle not in logs, needle
        assert needle.encode() not in in_redis, needle
        assert found_in(needle, rows) == [], needle


def test_the_readme_oauth_section_runs_as_written(stack, idp) -> None:
    # Given the stack, when the README's OAuth 2.0 section runs (after the first walk-through's
    # helper functions), then every command succeeds and the last job reached the protected API
    done = run_walkthrough(stack.api, stack.key, stack.upstream, stack.env, name="walkthrough-oauth")
    assert done.returncode == 0, done.stderr + done.stdout
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["status"] == "succeeded" and last["result"]["status_code"] == 200, last
    assert last["secrets_used"] == [] or last["secrets_used"] == ["client_secret"]
