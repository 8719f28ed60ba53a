"""The rules of the data, as plain functions over plain values.

Each rule raises the :mod:`models.errors` class that names the broken rule; the API turns it
into a problem document. ``loc`` in an error points at the offending field.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote, urlsplit

from models import errors

VERBS = ("GET", "PUT", "POST", "DELETE", "TRACE", "PATCH", "HEAD", "OPTIONS")
INTEGRATION_METHODS = ("rest",)
AUTH_TYPES = ("none", "oauth2")
REQUEST_KINDS = ("manual", "studio")
JSON_MEDIA_TYPES = ("application/json", "application/json-patch+json")
FORM_MEDIA_TYPE = "application/x-www-form-urlencoded"
TEXT_MEDIA_TYPES = ("text/html", "text/plain", "text/xml")
MEDIA_TYPES = (*JSON_MEDIA_TYPES, FORM_MEDIA_TYPE, *TEXT_MEDIA_TYPES)

MAX_CONNECTIONS_PER_TENANT = 50
MAX_REQUESTS_PER_CONNECTION = 50

PATH_PARAM = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_]*)\}(?!\})")
VARIABLE = re.compile(r"\{\{\s*vars\.([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
SECRET = re.compile(r"\{\{\s*secrets\.([A-Za-z_][A-Za-z0-9_.-]*)\s*\}\}")
FILLED = re.compile(
    r"\{\{\s*(?:vars\.(?P<var>[A-Za-z_][A-Za-z0-9_]*)|secrets\.(?P<secret>[A-Za-z_][A-Za-z0-9_.-]*)"
    r"|(?P<token>token))\s*\}\}"
)
"""Every placeholder the worker fills in text, matched in one pass so that no filled-in value
is ever read again (a variable cannot smuggle in a ``{{secrets.X}}``)."""


def _invalid(cls: type[errors.InvalidInput], loc: list[str | int], msg: str) -> errors.InvalidInput:
    return cls(msg, errors=[{"loc": ["body", *loc], "msg": msg}])


def normalize_verbs(verbs: list[str], *, loc: list[str | int]) -> list[str]:
    """``verbs`` upper-cased and deduplicated in their given order; each must be a known verb."""
    if not verbs:
        raise _invalid(errors.InvalidVerb, loc, "at least one verb is required")
    seen: list[str] = []
    for index, verb in enumerate(verbs):
        upper = str(verb).strip().upper()
        if upper not in VERBS:
            raise _invalid(
                errors.InvalidVerb, [*loc, index], f"{verb!r} is not one of {' '.join(VERBS)}"
            )
        if upper not in seen:
            seen.append(upper)
    return seen


def check_template(integration_method: str, auth_type: str, auth_headers: list[dict[str, Any]]) -> None:
    """A template's integration method, authentication type and auth header names are valid."""
    if integration_method not in INTEGRATION_METHODS:
        raise _invalid(
            errors.UnsupportedIntegrationMethod,
            ["integration_method"],
            f"integration_method must be 'rest', not {integration_method!r}",
        )
    if auth_type not in AUTH_TYPES:
        raise _invalid(errors.InvalidInput, ["auth_type"], "auth_type must be 'none' or 'oauth2'")
    names = [header["name"].lower() for header in auth_headers]
    if len(set(names)) != len(names):
        raise _invalid(errors.InvalidInput, ["auth_headers"], "auth header names must be unique")


def resolve_auth_headers(
    auth_headers: list[dict[str, Any]], given: dict[str, str]
) -> dict[str, str]:
    """The values a connection sends for its template's auth headers: given, else the default.

    Every ``required`` header must be given; a header the template does not name is refused.
    """
    known = {header["name"].lower(): header for header in auth_headers}
    for name in given:
        if name.lower() not in known:
            raise _invalid(
                errors.InvalidInput,
                ["auth_header_values", name],
                f"the template has no auth header {name!r}",
            )
    given_lower = {name.lower(): value for name, value in given.items()}
    values: dict[str, str] = {}
    for header in auth_headers:
        value = given_lower.get(header["name"].lower())
        if value is None and header.get("required"):
            raise _invalid(
                errors.MissingAuthHeader,
                ["auth_header_values", header["name"]],
                f"the template requires a value for {header['name']!r}",
            )
        if value is None:
            value = header.get("default")
        if value is not None:
            values[header["name"]] = value
    return values


SECRET_ONLY = re.compile(r"\{\{\s*secrets\.[A-Za-z_][A-Za-z0-9_.-]*\s*\}\}")
CREDENTIALS = ("client_secret", "password", "refresh_token", "private_key")
RESERVED_TOKEN_PARAMS = frozenset({
    "grant_type", "client_id", "client_secret", "client_assertion", "client_assertion_type", "username",
    "password", "refresh_token", "scope", "audience", "code", "code_verifier", "redirect_uri", "assertion",
})


def check_oauth2(auth_type: str, oauth2: dict[str, Any] | None) -> None:
    """``oauth2`` is given exactly when the template's authentication is OAuth 2.0, has what its
    grant and client authentication need, and holds credentials only as secret references."""
    if auth_type == "oauth2" and not oauth2:
        raise _invalid(errors.InvalidOAuth2, ["oauth2"], "the template uses OAuth 2.0: oauth2 is required")
    if auth_type != "oauth2" and oauth2:
        raise _invalid(errors.InvalidOAuth2, ["oauth2"], "the template uses no authentication: oauth2 is refused")
    if not oauth2:
        return
    needed = ["client_id"]
    needed.append("private_key" if oauth2.get("client_auth_method") == "private_key_jwt" else "client_secret")
    needed += {"password": ["username", "password"], "refresh_token": ["refresh_token"]}.get(oauth2["grant_type"], [])
    for name in needed:
        if not oauth2.get(name):
            raise _invalid(errors.InvalidOAuth2, ["oauth2", name],
                           f"{name} is required for this grant and client authentication")
    reserved = sorted(set(oauth2.get("extra_params") or {}) & RESERVED_TOKEN_PARAMS)
    if reserved:
        raise _invalid(errors.InvalidOAuth2, ["oauth2", "extra_params", reserved[0]],
                       f"{reserved[0]} is set by the hub; it cannot be an extra parameter")
    for name in CREDENTIALS:
        if oauth2.get(name) and not SECRET_ONLY.fullmatch(oauth2[name]):
            raise _invalid(errors.SecretReferenceRequired, ["oauth2", name],
                           f"{name} is a credential: store it as a secret and give {{{{secrets.NAME}}}}")


def check_url_scheme(url: str, *, allow_http: bool, loc: list[str | int]) -> str:
    """The host of the absolute ``url``, after checking its scheme (https; http if allowed)."""
    parts = urlsplit(url)
    allowed = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in allowed:
        raise _invalid(
            errors.SchemeNotAllowed, loc, f"scheme must be {' or '.join(allowed)}: {url!r}"
        )
    if not parts.hostname:
        raise _invalid(errors.InvalidUrl, loc, f"{url!r} has no host")
    return parts.hostname.lower()


def default_allowed_hosts(base_url: str | None, oauth2: dict[str, Any] | None) -> list[str]:
    """The hosts of ``base_url`` and of the OAuth token URL, the default ``allowed_hosts``."""
    hosts: list[str] = []
    for url in (base_url, (oauth2 or {}).get("token_url")):
        host = urlsplit(url).hostname if url else None
        if host and host.lower() not in hosts:
            hosts.append(host.lower())
    return hosts


def connection_settings(
    template: dict[str, Any],
    *,
    base_url: str | None,
    allowed_hosts: list[str] | None,
    auth_header_values: dict[str, str],
    oauth2: dict[str, Any] | None,
    allow_http: bool,
) -> dict[str, Any]:
    """A connection's checked settings under its template's rules (copied into ``template``).

    ``allowed_hosts`` defaults to the hosts of ``base_url`` and the OAuth token URL.
    """
    check_oauth2(template["auth_type"], oauth2)
    if base_url:
        check_url_scheme(base_url, allow_http=allow_http, loc=["base_url"])
    if oauth2:
        check_url_scheme(oauth2["token_url"], allow_http=allow_http, loc=["oauth2", "token_url"])
    hosts = [host.lower() for host in allowed_hosts] if allowed_hosts else default_allowed_hosts(base_url, oauth2)
    return {
        "base_url": base_url,
        "allowed_hosts": hosts,
        "auth_header_values": resolve_auth_headers(template["auth_headers"], auth_header_values),
        "oauth2": oauth2,
    }


def resolve_url(base_url: str | None, url: str) -> str:
    """``url`` if absolute, else ``url`` appended to the connection's ``base_url``."""
    if urlsplit(url).scheme:
        return url
    if not base_url:
        raise _invalid(errors.InvalidUrl, ["url"], "a relative url needs the connection's base_url")
    return base_url.rstrip("/") + "/" + url.lstrip("/")


def fill_url(url: str, path_params: dict[str, Any], variables: dict[str, Any]) -> str:
    """``url`` with its path parameters and variables filled in, each value percent-encoded."""
    url = PATH_PARAM.sub(lambda m: quote(str(path_params[m.group(1)]), safe=""), url)
    return VARIABLE.sub(lambda m: quote(str(variables[m.group(1)]), safe=""), url)


def check_target(
    url: str,
    *,
    base_url: str | None,
    allowed_hosts: list[str],
    path_params: dict[str, Any],
    variables: dict[str, Any],
) -> str:
    """The absolute URL a request goes to once its placeholders are filled; its host must be
    among ``allowed_hosts`` (a placeholder in the host cannot point it elsewhere)."""
    absolute = resolve_url(base_url, fill_url(url, path_params, variables))
    host = (urlsplit(absolute).hostname or "").lower()
    if host not in allowed_hosts:
        raise _invalid(errors.HostNotAllowed, ["url"], f"{host!r} is not among the allowed hosts")
    return absolute


def check_request(
    *,
    kind: str,
    method: str,
    url: str,
    headers: dict[str, str],
    query: dict[str, str],
    body: Any,
    media_type: str,
    verbs: list[str],
    base_url: str | None,
    allowed_hosts: list[str],
    allow_http: bool,
) -> str:
    """Check a stored request against its connection; return the method upper-cased."""
    if kind not in REQUEST_KINDS:
        raise _invalid(errors.InvalidInput, ["kind"], "kind must be 'manual' or 'studio'")
    upper = method.upper()
    if upper not in verbs:
        raise _invalid(
            errors.VerbNotAllowed, ["method"], f"{method} is not among the template's verbs {verbs}"
        )
    check_media_type(media_type, body)
    if kind == "manual":
        found = caller_placeholders(url, headers, query, body)
        if found:
            raise _invalid(
                errors.ManualRequestHasPlaceholders,
                ["kind"],
                f"a manual request cannot use caller placeholders {sorted(found)}",
            )
    absolute = resolve_url(base_url, url)
    host = check_url_scheme(absolute, allow_http=allow_http, loc=["url"])
    if not PATH_PARAM.search(urlsplit(absolute).netloc) and host not in allowed_hosts:
        raise _invalid(errors.HostNotAllowed, ["url"], f"{host!r} is not among the allowed hosts")
    return upper


def check_media_type(media_type: str, body: Any) -> None:
    """``media_type`` is one of the six, and ``body`` has the shape it allows."""
    if media_type not in MEDIA_TYPES:
        raise _invalid(
            errors.UnsupportedMediaType, ["media_type"], f"media_type must be one of {list(MEDIA_TYPES)}"
        )
    if body is None or media_type in JSON_MEDIA_TYPES:
        return
    if media_type == FORM_MEDIA_TYPE:
        if not isinstance(body, dict) or not all(isinstance(v, str) for v in body.values()):
            raise _invalid(errors.InvalidBody, ["body"], "a form body is an object of strings")
    elif not isinstance(body, str):
        raise _invalid(errors.InvalidBody, ["body"], f"a {media_type} body is a string")


def _strings(value: Any) -> list[str]:
    """The strings among ``value``'s values (not its keys: placeholders fill values only)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


def caller_placeholders(url: str, headers: Any, query: Any, body: Any) -> set[str]:
    """The placeholders a caller fills in: ``{name}`` path parameters in the URL, ``{{vars.X}}``.

    Returned as ``path:NAME`` and ``vars:NAME``.
    """
    found = {f"path:{name}" for name in PATH_PARAM.findall(url)}
    for text in [url, *_strings(headers), *_strings(query), *_strings(body)]:
        found.update(f"vars:{name}" for name in VARIABLE.findall(text))
    return found


def secret_names(*values: Any) -> set[str]:
    """The names of the secrets that ``{{secrets.NAME}}`` placeholders among ``values`` use."""
    return {name for value in values for text in _strings(value) for name in SECRET.findall(text)}


def missing_values(
    placeholders: set[str], path_params: dict[str, Any], variables: dict[str, Any]
) -> list[str]:
    """The placeholders that neither ``path_params`` nor ``variables`` give a value for."""
    missing = []
    for item in sorted(placeholders):
        kind, name = item.split(":", 1)
        source = path_params if kind == "path" else variables
        if name not in source:
            missing.append(item)
    return missing
