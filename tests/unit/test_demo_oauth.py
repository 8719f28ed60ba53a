"""The demo OAuth 2.0 token server, through the demo upstream on loopback with httpx.

Client assertions are signed here with keys generated for the test, so the server verifies
signatures it did not make.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote_plus

import httpx
import pytest
from authlib.deprecate import AuthlibDeprecationWarning
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from api_shim.demo_oauth import JWT_BEARER, token_id
from api_shim.demo_upstream import make_server

with warnings.catch_warnings():
    # authlib 1.9 announces on import that authlib.jose moves to joserfc in 2.0.
    warnings.simplefilter("ignore", AuthlibDeprecationWarning)
    from authlib.jose import JsonWebToken

SIGNER = JsonWebToken(["RS256", "ES256"])
SECRET = "s3cr:t +/%é"  # every character Basic's form-urlencoding must carry
PASSWORD = "pa ss+word"
GRANTS = ["client_credentials", "password", "refresh_token"]
METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt"]


@dataclass(frozen=True)
class KeyPair:
    """A private key PEM to sign with and the public PEM the server registers."""

    private_pem: bytes
    public_pem: str
    alg: str


def _pair(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, alg: str) -> KeyPair:
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return KeyPair(private, public, alg)


@pytest.fixture(scope="module")
def rsa_key() -> KeyPair:
    return _pair(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


@pytest.fixture(scope="module")
def ec_key() -> KeyPair:
    return _pair(ec.generate_private_key(ec.SECP256R1()), "ES256")


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    """A client of a demo upstream serving in a thread on 127.0.0.1."""
    server = make_server("127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{server.server_port}", timeout=5, trust_env=False) as client:
            yield client
    finally:
        server.oauth.reset()  # type: ignore[attr-defined]  # wakes a request asleep in a hang
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def token_url(http: httpx.Client) -> str:
    """The token endpoint's URL as the server sees it (the ``aud`` of a client assertion)."""
    return str(http.base_url.join("/oauth/token"))


def admin(http: httpx.Client, name: str, document: dict[str, Any] | None = None) -> dict[str, Any]:
    response = http.post(f"/oauth/admin/{name}", json=document or {})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def stats(http: httpx.Client) -> dict[str, Any]:
    response = http.get("/oauth/admin/stats")
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def sign(
    key: KeyPair, claims_over: dict[str, Any] | None = None, *, client_id: str = "app", aud: Any = None
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": client_id, "sub": client_id, "aud": aud, "iat": now, "exp": now + 60, "jti": uuid.uuid4().hex,
    }
    claims.update(claims_over or {})
    return SIGNER.encode({"alg": key.alg}, {k: v for k, v in claims.items() if v is not None}, key.private_pem).decode()


def basic(client_id: str, secret: str) -> str:
    """HTTP Basic per RFC 6749 2.3.1: each part form-urlencoded first."""
    return "Basic " + base64.b64encode(f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()).decode()


def authenticated(
    http: httpx.Client, method: str, key: KeyPair, fields: dict[str, str], headers: dict[str, str] | None = None,
    client_id: str = "app",
) -> httpx.Response:
    """POST /oauth/token as ``client_id`` with ``method``."""
    form, sent = dict(fields), dict(headers or {})
    if method == "client_secret_basic":
        sent["Authorization"] = basic(client_id, SECRET)
    elif method == "client_secret_post":
        form.update(client_id=client_id, client_secret=SECRET)
    else:
        form.update(client_assertion_type=JWT_BEARER, client_assertion=sign(key, client_id=client_id, aud=token_url(http)))
    return http.post("/oauth/token", data=form, headers=sent)


@pytest.fixture
def app(http: httpx.Client, rsa_key: KeyPair) -> httpx.Client:
    """Registered: client ``app`` (secret and RSA key) and user ``alice``."""
    admin(http, "clients", {"client_id": "app", "client_secret": SECRET, "public_key_pem": rsa_key.public_pem})
    admin(http, "users", {"username": "alice", "password": PASSWORD})
    return http


def grant_fields(http: httpx.Client, grant: str) -> dict[str, str]:
    if grant == "password":
        return {"grant_type": "password", "username": "alice", "password": PASSWORD, "scope": "read"}
    if grant == "refresh_token":
        seeded = admin(http, "refresh-tokens", {"client_id": "app", "scope": "read write"})
        return {"grant_type": "refresh_token", "refresh_token": seeded["refresh_token"], "scope": "read"}
    return {"grant_type": "client_credentials", "scope": "read"}


# --- grants and client authentication -----------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("grant", GRANTS)
def test_each_grant_with_each_client_authentication(app: httpx.Client, rsa_key: KeyPair, grant: str, method: str) -> None:
    # Given a client registered with a secret and a public key
    # When it asks for a token with this grant, authenticating this way
    response = authenticated(app, method, rsa_key, grant_fields(app, grant))
    # Then it gets a bearer token for the scope it asked, a refresh token where the grant gives one
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    document = response.json()
    assert document["token_type"] == "Bearer"
    assert document["expires_in"] == 3600
    assert document["scope"] == "read"
    assert ("refresh_token" in document) is (grant != "client_credentials")
    # And the token opens the protected resource as that client
    protected = app.get("/oauth/protected/items", headers={"Authorization": f"Bearer {document['access_token']}"})
    assert protected.status_code == 200
    assert protected.json()["client_id"] == "app"
    # And the server recorded how the client authenticated
    record = stats(app)["requests"][-1]
    assert (record["grant_type"], record["auth_method"], record["client_id"]) == (grant, method, "app")
    assert record["access_token_id"] == protected.json()["token_id"]


def test_es256_assertion_and_audience_as_a_list(http: httpx.Client, ec_key: KeyPair) -> None:
    # Given a client registered with only a P-256 public key
    admin(http, "clients", {"client_id": "ec-app", "public_key_pem": ec_key.public_pem})
    # When it authenticates with an ES256 assertion whose aud is a list holding the token URL
    assertion = sign(ec_key, client_id="ec-app", aud=["https://elsewhere.example", token_url(http)])
    response = http.post("/oauth/token", data={
        "grant_type": "client_credentials", "client_id": "ec-app",
        "client_assertion_type": JWT_BEARER, "client_assertion": assertion,
    })
    # Then it gets a token with the default scope
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "default"


def test_default_client_and_user_work_out_of_the_box(http: httpx.Client) -> None:
    # Given a fresh server; When the README's client and user ask for a token
    response = http.post(
        "/oauth/token", auth=("demo-client", "demo-secret"),
        data={"grant_type": "password", "username": "demo-user", "password": "demo-password"},
    )
    # Then they get one
    assert response.status_code == 200
    assert response.json()["scope"] == "default"


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
def test_wrong_secret_is_invalid_client(app: httpx.Client, method: str) -> None:
    # Given a registered client; When it sends a wrong secret
    if method == "client_secret_basic":
        response = app.post("/oauth/token", data={"grant_type": "client_credentials"},
                            headers={"Authorization": basic("app", "wrong")})
    else:
        response = app.post("/oauth/token", data={
            "grant_type": "client_credentials", "client_id": "app", "client_secret": "wrong"})
    # Then 401 invalid_client, with a Basic challenge where Basic was tried
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"
    assert response.headers.get("www-authenticate", "").startswith("Basic") is (method == "client_secret_basic")


def test_basic_credentials_must_be_form_urlencoded(app: httpx.Client) -> None:
    # Given a secret with '+' and ' '; When it goes into Basic raw, not form-urlencoded
    raw = "Basic " + base64.b64encode(f"app:{SECRET}".encode()).decode()
    response = app.post("/oauth/token", data={"grant_type": "client_credentials"}, headers={"Authorization": raw})
    # Then it does not match: '+' decodes to a space (RFC 6749 2.3.1)
    assert response.status_code == 401


def test_missing_or_double_client_authentication(app: httpx.Client) -> None:
    # Given no client authentication at all; Then 401 invalid_client
    none = app.post("/oauth/token", data={"grant_type": "client_credentials", "client_id": "app"})
    assert (none.status_code, none.json()["error"]) == (401, "invalid_client")
    # Given two methods at once; Then 400 invalid_request
    both = app.post("/oauth/token", headers={"Authorization": basic("app", SECRET)},
                    data={"grant_type": "client_credentials", "client_id": "app", "client_secret": SECRET})
    assert (both.status_code, both.json()["error"]) == (400, "invalid_request")


def test_bad_grants(app: httpx.Client) -> None:
    auth = {"Authorization": basic("app", SECRET)}
    # Given a wrong password; Then invalid_grant with a description
    wrong = app.post("/oauth/token", headers=auth,
                     data={"grant_type": "password", "username": "alice", "password": "nope"})
    assert wrong.status_code == 400
    assert wrong.json()["error"] == "invalid_grant" and wrong.json()["error_description"]
    # Given a refresh token the server never issued; Then invalid_grant
    unknown = app.post("/oauth/token", headers=auth, data={"grant_type": "refresh_token", "refresh_token": "x"})
    assert (unknown.status_code, unknown.json()["error"]) == (400, "invalid_grant")
    # Given a grant the server does not know; Then unsupported_grant_type
    other = app.post("/oauth/token", headers=auth, data={"grant_type": "authorization_code", "code": "c"})
    assert (other.status_code, other.json()["error"]) == (400, "unsupported_grant_type")
    # Given a refresh token issued to another client; Then invalid_grant
    seeded = admin(app, "refresh-tokens", {"client_id": "demo-client"})["refresh_token"]
    stolen = app.post("/oauth/token", headers=auth, data={"grant_type": "refresh_token", "refresh_token": seeded})
    assert (stolen.status_code, stolen.json()["error"]) == (400, "invalid_grant")


# --- private_key_jwt ----------------------------------------------------------------------


def test_replayed_assertion_is_refused(app: httpx.Client, rsa_key: KeyPair) -> None:
    # Given an assertion that has been used once
    form = {"grant_type": "client_credentials", "client_assertion_type": JWT_BEARER,
            "client_assertion": sign(rsa_key, aud=token_url(app))}
    assert app.post("/oauth/token", data=form).status_code == 200
    # When it is sent again; Then its jti is refused
    again = app.post("/oauth/token", data=form)
    assert again.status_code == 401
    assert again.json()["error"] == "invalid_client"
    assert "jti" in again.json()["error_description"]


BAD_ASSERTIONS = {
    "wrong audience": {"aud": "http://elsewhere.example/oauth/token"},
    "expired": {"exp": int(time.time()) - 10},
    "no jti": {"jti": None},
    "iss is not the client": {"iss": "someone-else"},
    "unknown client": {"iss": "ghost", "sub": "ghost"},
}


@pytest.mark.parametrize("override", list(BAD_ASSERTIONS.values()), ids=list(BAD_ASSERTIONS))
def test_bad_assertion_is_invalid_client(app: httpx.Client, rsa_key: KeyPair, override: dict[str, Any]) -> None:
    # Given an assertion signed with the registered key but with one claim wrong
    claims = {"aud": token_url(app), **override}
    assertion = sign(rsa_key, claims)
    # When it is used; Then 401 invalid_client
    response = app.post("/oauth/token", data={
        "grant_type": "client_credentials", "client_assertion_type": JWT_BEARER, "client_assertion": assertion})
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")


def test_assertion_signed_by_another_key_is_refused(app: httpx.Client) -> None:
    # Given an assertion for 'app' signed by a key that is not the registered one
    other = _pair(rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")
    assertion = sign(other, aud=token_url(app))
    # Then the signature does not verify
    response = app.post("/oauth/token", data={
        "grant_type": "client_credentials", "client_assertion_type": JWT_BEARER, "client_assertion": assertion})
    assert (response.status_code, response.json()["error"]) == (401, "invalid_client")


# --- refresh tokens -----------------------------------------------------------------------


def test_refresh_tokens_rotate_and_the_old_one_is_refused(app: httpx.Client, rsa_key: KeyPair) -> None:
    # Given a refresh token from the password grant
    first = authenticated(app, "client_secret_post", rsa_key, grant_fields(app, "password")).json()["refresh_token"]
    # When it is used; Then a new refresh token comes back
    refreshed = authenticated(app, "client_secret_post", rsa_key,
                              {"grant_type": "refresh_token", "refresh_token": first})
    assert refreshed.status_code == 200
    second = refreshed.json()["refresh_token"]
    assert second != first
    assert refreshed.json()["scope"] == "read"  # the scope granted with the first
    # And the old one is refused, the new one accepted
    reused = authenticated(app, "client_secret_post", rsa_key, {"grant_type": "refresh_token", "refresh_token": first})
    assert (reused.status_code, reused.json()["error"]) == (400, "invalid_grant")
    assert authenticated(app, "client_secret_post", rsa_key,
                         {"grant_type": "refresh_token", "refresh_token": second}).status_code == 200


def test_without_rotation_the_refresh_token_stays_valid(app: httpx.Client, rsa_key: KeyPair) -> None:
    # Given rotation turned off
    assert admin(app, "settings", {"rotate_refresh_tokens": False})["rotate_refresh_tokens"] is False
    fields = grant_fields(app, "refresh_token")
    # When the same refresh token is used twice; Then both work and neither answer carries a new one
    for _ in range(2):
        response = authenticated(app, "client_secret_basic", rsa_key, fields)
        assert response.status_code == 200
        assert "refresh_token" not in response.json()


def test_scope_beyond_the_granted_one_is_refused_on_refresh(app: httpx.Client, rsa_key: KeyPair) -> None:
    fields = {**grant_fields(app, "refresh_token"), "scope": "read admin"}
    response = authenticated(app, "client_secret_basic", rsa_key, fields)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_scope")


def test_delay_widens_a_refresh_race_so_only_one_wins(app: httpx.Client, rsa_key: KeyPair) -> None:
    # Given a delay before every token answer, and one refresh token
    admin(app, "settings", {"delay_s": 0.3})
    fields = grant_fields(app, "refresh_token")
    statuses: list[int] = []

    def refresh() -> None:
        statuses.append(authenticated(app, "client_secret_basic", rsa_key, fields).status_code)

    # When two refreshes with it are in flight at once
    threads = [threading.Thread(target=refresh) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=5)
    # Then one rotates it and the other is refused
    assert sorted(statuses) == [200, 400]


def test_client_credentials_refresh_token_when_set(app: httpx.Client, rsa_key: KeyPair) -> None:
    admin(app, "settings", {"refresh_token_for_client_credentials": True})
    response = authenticated(app, "client_secret_post", rsa_key, {"grant_type": "client_credentials"})
    assert "refresh_token" in response.json()


def test_expires_in_null_omits_the_field(app: httpx.Client, rsa_key: KeyPair) -> None:
    # Given expires_in set to null
    assert admin(app, "settings", {"expires_in": None})["expires_in"] is None
    # When a token is issued; Then the answer has no expires_in and the token does not expire
    document = authenticated(app, "client_secret_post", rsa_key, {"grant_type": "client_credentials"}).json()
    assert "expires_in" not in document
    bearer = {"Authorization": f"Bearer {document['access_token']}"}
    assert app.get("/oauth/protected/x", headers=bearer).status_code == 200


# --- failure injection --------------------------------------------------------------------


def test_injected_failures_answer_count_times(app: httpx.Client, rsa_key: KeyPair) -> None:
    # Given two injected failures
    admin(app, "fail", {"status": 503, "error": "temporarily_unavailable", "error_description": "down",
                        "count": 2, "retry_after": 7})
    # When three token requests arrive
    responses = [authenticated(app, "client_secret_post", rsa_key, {"grant_type": "client_credentials"})
                 for _ in range(3)]
    # Then the first two get the failure, the third a token
    assert [r.status_code for r in responses] == [503, 503, 200]
    assert responses[0].json() == {"error": "temporarily_unavailable", "error_description": "down"}
    assert responses[0].headers["retry-after"] == "7"
    counts = stats(app)
    assert (counts["token_requests"], counts["successes"], counts["failures"]) == (3, 1, 2)
    assert counts["by_grant"] == {"client_credentials": 3}
    assert [r["injected"] for r in counts["requests"]] == [True, True, False]


def test_count_zero_clears_injected_failures(app: httpx.Client, rsa_key: KeyPair) -> None:
    admin(app, "fail", {"count": 5})
    admin(app, "fail", {"count": 0})
    response = authenticated(app, "client_secret_post", rsa_key, {"grant_type": "client_credentials"})
    assert response.status_code == 200
    assert stats(app)["pending_failures"] == 0


def test_injected_hang_makes_the_client_time_out(app: httpx.Client, rsa_key: KeyPair) -> None:
    # Given a hang longer than the client waits
    admin(app, "fail", {"hang_s": 2, "count": 1})
    # When a token request is sent with a short timeout; Then it times out
    with pytest.raises(httpx.ReadTimeout):
        app.post("/oauth/token", auth=("demo-client", "demo-secret"),
                 data={"grant_type": "client_credentials"}, timeout=0.2)


# --- protected resource -------------------------------------------------------------------


def test_protected_resource_needs_a_live_issued_token(app: httpx.Client, rsa_key: KeyPair) -> None:
    token = authenticated(app, "client_secret_basic", rsa_key, {"grant_type": "client_credentials"}).json()
    bearer = {"Authorization": f"Bearer {token['access_token']}"}
    # Given no token, or one the server never issued; Then 401 invalid_token with a Bearer challenge
    for headers in ({}, {"Authorization": "Bearer made-up"}):
        refused = app.get("/oauth/protected/items", headers=headers)
        assert refused.status_code == 401
        assert refused.json() == {"error": "invalid_token"}
        assert refused.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    # Given an issued token; Then 200 describing the call, without echoing the token
    ok = app.post("/oauth/protected/items/7", headers=bearer)
    assert ok.status_code == 200
    assert ok.json() == {"ok": True, "path": "/oauth/protected/items/7", "method": "POST",
                         "token_id": token_id(token["access_token"]), "client_id": "app", "scope": "default",
                         "username": None}
    assert token["access_token"] not in ok.text
    # When every access token is revoked; Then the same token is refused
    assert admin(app, "revoke")["revoked_access_tokens"] >= 1
    assert app.get("/oauth/protected/items", headers=bearer).status_code == 401
    counts = stats(app)
    assert (counts["protected_calls"], counts["protected_unauthorized"]) == (4, 3)


def test_expired_token_is_refused(app: httpx.Client, rsa_key: KeyPair) -> None:
    admin(app, "settings", {"expires_in": 0})
    token = authenticated(app, "client_secret_post", rsa_key, {"grant_type": "client_credentials"}).json()
    assert token["expires_in"] == 0
    refused = app.get("/oauth/protected/x", headers={"Authorization": f"Bearer {token['access_token']}"})
    assert refused.status_code == 401


# --- what is recorded ---------------------------------------------------------------------


def test_stats_record_headers_scope_audience_and_no_secret(app: httpx.Client, rsa_key: KeyPair) -> None:
    # Given a password grant with custom headers, scope, audience and an extra field
    fields = {**grant_fields(app, "password"), "scope": "read write", "audience": "https://api.example",
              "resource": "r1"}
    password_doc = authenticated(app, "client_secret_post", rsa_key, fields,
                                 headers={"X-Tenant-Key": "tk-1", "X-Trace": "t"}).json()
    # And a refresh with it, then a private_key_jwt request
    refresh = password_doc["refresh_token"]
    authenticated(app, "client_secret_basic", rsa_key, {"grant_type": "refresh_token", "refresh_token": refresh})
    authenticated(app, "private_key_jwt", rsa_key, {"grant_type": "client_credentials"})
    # When the stats are read
    document = stats(app)
    first, second, third = document["requests"]
    # Then they hold the custom headers (names lower-cased), scope, audience and other fields
    assert first["headers"] == {"x-tenant-key": "tk-1", "x-trace": "t"}
    assert (first["scope"], first["audience"]) == ("read write", "https://api.example")
    assert first["fields"] == {"grant_type": "password", "username": "alice", "scope": "read write",
                               "audience": "https://api.example", "resource": "r1", "client_id": "app"}
    # And which refresh token was presented, by its hash only
    assert second["refresh_token_id"] == token_id(refresh)
    assert document["by_auth_method"] == {"client_secret_post": 1, "client_secret_basic": 1, "private_key_jwt": 1}
    # And never a secret value
    text = json.dumps(document)
    for secret in (SECRET, PASSWORD, refresh, password_doc["access_token"], "eyJ"):  # eyJ: how a JWT starts
        assert secret not in text
    assert third["fields"] == {"grant_type": "client_credentials", "client_assertion_type": JWT_BEARER}


def test_reset_restores_the_defaults(app: httpx.Client, rsa_key: KeyPair) -> None:
    # Given a changed server
    admin(app, "settings", {"expires_in": 5})
    authenticated(app, "client_secret_post", rsa_key, {"grant_type": "client_credentials"})
    # When it is reset
    admin(app, "reset")
    # Then the registered client is gone, counters are zero and the defaults hold
    gone = authenticated(app, "client_secret_post", rsa_key, {"grant_type": "client_credentials"})
    assert gone.status_code == 401
    default = app.post("/oauth/token", auth=("demo-client", "demo-secret"), data={"grant_type": "client_credentials"})
    assert default.json()["expires_in"] == 3600
    assert stats(app)["token_requests"] == 2


def test_admin_refuses_bad_input(http: httpx.Client) -> None:
    bad = [
        ("clients", {"client_id": "x"}),
        ("clients", {"client_id": "x", "public_key_pem": "not a key"}),
        ("settings", {"expires_in": "soon"}),
        ("settings", {"color": "blue"}),
        ("fail", {"status": 99}),
        ("refresh-tokens", {"client_id": "ghost"}),
    ]
    for name, document in bad:
        response = http.post(f"/oauth/admin/{name}", json=document)
        assert (response.status_code, response.json()["error"]) == (400, "invalid_request"), (name, document)
    assert http.get("/oauth/admin/reset").status_code == 405
    assert http.get("/oauth/nowhere").status_code == 404
