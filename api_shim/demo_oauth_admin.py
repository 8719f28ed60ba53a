"""The admin API of the demo OAuth 2.0 server (``/oauth/admin/...``): tests and the demo set
clients, users, settings and failures up, and read what the server saw. Mixed into
:class:`api_shim.demo_oauth.OAuthServer`, which owns the state."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from api_shim.demo_oauth_state import (
    MAX_SLEEP_S,
    Client,
    Failure,
    Refusal,
    Reply,
    State,
    invalid_request,
    is_int,
    is_seconds,
    key_type,
    optional_text_field,
    text_field,
    token_id,
)


class AdminEndpoints:
    """``/oauth/admin/...``, over the server's state and lock."""

    _clock: Callable[[], float]
    _lock: threading.Lock
    _wake: threading.Event
    _state: State

    def _new_refresh_token(self, client_id: str, scope: str | None, username: str | None) -> str:
        raise NotImplementedError  # the server's own

    def handle_admin(self, method: str, name: str, body: bytes) -> Reply:
        """``/oauth/admin/{name}``: set the server up and read what it saw.

        ``POST clients`` ``{"client_id", "client_secret"?, "public_key_pem"?}``;
        ``POST users`` ``{"username", "password"}``;
        ``POST refresh-tokens`` ``{"client_id", "scope"?, "username"?}`` → ``{"refresh_token", "refresh_token_id"}``;
        ``GET|POST settings`` (partial update) → the settings;
        ``POST fail`` ``{"status"?, "error"?, "error_description"?, "count"?, "hang_s"?, "retry_after"?}``;
        ``POST revoke`` ``{"refresh_tokens"?: bool}``; ``GET stats``; ``POST reset``.
        """
        routes: dict[tuple[str, str], Callable[[dict[str, Any]], Reply]] = {
            ("POST", "clients"): self._admin_client,
            ("POST", "users"): self._admin_user,
            ("POST", "refresh-tokens"): self._admin_refresh_token,
            ("GET", "settings"): self._admin_settings,
            ("POST", "settings"): self._admin_settings,
            ("POST", "fail"): self._admin_fail,
            ("POST", "revoke"): self._admin_revoke,
            ("GET", "stats"): self._admin_stats,
            ("POST", "reset"): self._admin_reset,
        }
        route = routes.get((method, name))
        if route is None:
            allowed = sorted(verb for verb, known in routes if known == name)
            if allowed:
                return Reply(405, {"error": "method_not_allowed", "allowed": allowed}, {"Allow": ", ".join(allowed)})
            return Reply(404, {"error": "not_found", "path": f"/oauth/admin/{name}"})
        try:
            document = json.loads(body) if body.strip() else {}
        except ValueError:
            return invalid_request("the body is not JSON").reply()
        if not isinstance(document, dict):
            return invalid_request("the body must be a JSON object").reply()
        try:
            with self._lock:
                return route(document)
        except Refusal as refusal:
            return refusal.reply()

    def _admin_client(self, document: dict[str, Any]) -> Reply:
        client_id = text_field(document, "client_id")
        secret = optional_text_field(document, "client_secret")
        pem = optional_text_field(document, "public_key_pem")
        if secret is None and pem is None:
            raise invalid_request("a client needs client_secret, public_key_pem or both")
        client = Client(client_id, secret, pem, key_type(pem) if pem is not None else None)
        self._state.clients[client_id] = client
        return Reply(200, {"client_id": client_id, "auth_methods": client.auth_methods()})

    def _admin_user(self, document: dict[str, Any]) -> Reply:
        username, password = text_field(document, "username"), text_field(document, "password")
        self._state.users[username] = password
        return Reply(200, {"username": username})

    def _admin_refresh_token(self, document: dict[str, Any]) -> Reply:
        client_id = text_field(document, "client_id")
        if client_id not in self._state.clients:
            raise invalid_request(f"unknown client {client_id!r}")
        scope = optional_text_field(document, "scope")
        token = self._new_refresh_token(client_id, scope, optional_text_field(document, "username"))
        return Reply(200, {"refresh_token": token, "refresh_token_id": token_id(token)})

    def _admin_settings(self, document: dict[str, Any]) -> Reply:
        settings = self._state.settings
        unknown = set(document) - set(asdict(settings))
        if unknown:
            raise invalid_request(f"unknown settings: {sorted(unknown)}")
        if "expires_in" in document:
            value = document["expires_in"]
            if value is not None and not is_int(value, minimum=0):
                raise invalid_request("expires_in must be a whole number of seconds ≥ 0, or null")
        if "delay_s" in document and not is_seconds(document["delay_s"]):
            raise invalid_request(f"delay_s must be a number of seconds from 0 to {MAX_SLEEP_S}")
        for name in ("rotate_refresh_tokens", "refresh_token_for_client_credentials"):
            if name in document and not isinstance(document[name], bool):
                raise invalid_request(f"{name} must be true or false")
        for name, value in document.items():
            setattr(settings, name, float(value) if name == "delay_s" else value)
        return Reply(200, asdict(settings))

    def _admin_fail(self, document: dict[str, Any]) -> Reply:
        unknown = set(document) - set(asdict(Failure()))
        if unknown:
            raise invalid_request(f"unknown fields: {sorted(unknown)}")
        failure = Failure(
            status=document.get("status", 500),
            error=document.get("error", "server_error"),
            error_description=document.get("error_description"),
            count=document.get("count", 1),
            hang_s=document.get("hang_s", 0.0),
            retry_after=document.get("retry_after"),
        )
        if not is_int(failure.status, minimum=200) or failure.status > 599:
            raise invalid_request("status must be an HTTP status from 200 to 599")
        if not isinstance(failure.error, str) or not isinstance(failure.error_description, (str, type(None))):
            raise invalid_request("error and error_description must be strings")
        if not is_int(failure.count, minimum=0):
            raise invalid_request("count must be a whole number ≥ 0")
        if not is_seconds(failure.hang_s):
            raise invalid_request(f"hang_s must be a number of seconds from 0 to {MAX_SLEEP_S}")
        if failure.retry_after is not None and not is_int(failure.retry_after, minimum=0):
            raise invalid_request("retry_after must be a whole number of seconds ≥ 0")
        failure.hang_s = float(failure.hang_s)
        self._state.failure = failure if failure.count > 0 else None
        return Reply(200, asdict(failure))

    def _admin_revoke(self, document: dict[str, Any]) -> Reply:
        refresh_too = document.get("refresh_tokens", False)
        if not isinstance(refresh_too, bool):
            raise invalid_request("refresh_tokens must be true or false")
        revoked = {"revoked_access_tokens": len(self._state.access_tokens), "revoked_refresh_tokens": 0}
        self._state.access_tokens.clear()
        if refresh_too:
            revoked["revoked_refresh_tokens"] = len(self._state.refresh_tokens)
            self._state.refresh_tokens.clear()
        return Reply(200, revoked)

    def _admin_stats(self, document: dict[str, Any]) -> Reply:
        state = self._state
        return Reply(200, {
            "token_requests": state.counts["token_requests"],
            "successes": state.counts["successes"],
            "failures": state.counts["failures"],
            "by_grant": dict(state.by_grant),
            "by_auth_method": dict(state.by_auth_method),
            "protected_calls": state.counts["protected_calls"],
            "protected_unauthorized": state.counts["protected_unauthorized"],
            "pending_failures": state.failure.count if state.failure is not None else 0,
            "access_tokens": len(state.access_tokens),
            "refresh_tokens": len(state.refresh_tokens),
            "requests": [asdict(record) for record in state.records],
        })

    def _admin_reset(self, document: dict[str, Any]) -> Reply:
        self._reset_locked()
        return Reply(200, {"reset": True})

    def reset(self) -> None:
        """Back to the default state; requests asleep in a delay or hang wake up."""
        with self._lock:
            self._reset_locked()

    def _reset_locked(self) -> None:
        """:meth:`reset`, for a caller that holds the lock."""
        self._wake.set()
        self._wake = threading.Event()
        self._state = State.default()


