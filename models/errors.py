"""The hub's exceptions: one root, a small tree, a stable ``code`` and HTTP status on each.

::

    HubError                      500 internal_error
    ├── Unauthorized              401 unauthorized
    ├── NotFound                  404 not_found
    ├── MethodNotAllowed          405 method_not_allowed
    │   └── TemplateImmutable     405 template_immutable
    ├── PayloadTooLarge           413 payload_too_large
    ├── Conflict                  409 conflict
    │   ├── NameTaken             409 name_taken
    │   ├── ConnectionLimitReached 409 connection_limit_reached
    │   └── RequestLimitReached   409 request_limit_reached
    ├── InvalidInput              422 validation_error
    │   ├── UnsupportedIntegrationMethod, InvalidVerb, VerbNotAllowed,
    │   ├── UnsupportedMediaType, InvalidBody, MissingAuthHeader, InvalidOAuth2,
    │   ├── HostNotAllowed, SchemeNotAllowed, InvalidUrl,
    │   ├── ManualRequestHasPlaceholders, MissingVariable, NotImplementedYet
    ├── MasterKeyMissing, InvalidMasterKey (configuration: the process refuses to start)
    ├── TenantQuotaExceeded       429 tenant_quota_exceeded (with Retry-After)
    ├── Unavailable               503 service_unavailable
    │   ├── BrokerUnavailable     503 broker_unavailable
    │   └── DatabaseUnavailable   503 database_unavailable
    └── JobError                  (no HTTP status: how a job fails in the worker)
        ├── Blocked               blocked_destination
        ├── SecretMissing, SecretUnreadable, ReferenceGone
        ├── UpstreamError         request_failed, and one subclass per transport failure
        ├── RetriesExhausted, RateLimited
        └── WorkerLost, JobLost   (the sweeper's verdicts)

The first line of each docstring is the default message. Messages never contain a secret.
"""

from __future__ import annotations

from typing import Any, ClassVar


class HubError(Exception):
    """Something went wrong inside the hub."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500

    def __init__(self, message: str | None = None, **extra: Any) -> None:
        default = (type(self).__doc__ or "").strip().splitlines()[0]
        self.message = message or default
        self.extra = extra
        super().__init__(self.message)

    @property
    def title(self) -> str:
        """A short, fixed summary of the problem type."""
        return (type(self).__doc__ or "").strip().splitlines()[0]


class Unauthorized(HubError):
    """A valid API key is required."""

    code = "unauthorized"
    status = 401


class NotFound(HubError):
    """No such resource."""

    code = "not_found"
    status = 404


class MethodNotAllowed(HubError):
    """This method is not allowed on this resource."""

    code = "method_not_allowed"
    status = 405


class TemplateImmutable(MethodNotAllowed):
    """Templates are immutable: create a new one instead."""

    code = "template_immutable"


class PayloadTooLarge(HubError):
    """The request body is too large."""

    code = "payload_too_large"
    status = 413


class Conflict(HubError):
    """The request conflicts with the current state."""

    code = "conflict"
    status = 409


class JobNotCancellable(Conflict):
    """Only a job that has not started can be cancelled."""

    code = "job_not_cancellable"


class NameTaken(Conflict):
    """The name is already in use."""

    code = "name_taken"


class ConnectionLimitReached(Conflict):
    """A tenant may have at most 50 connections."""

    code = "connection_limit_reached"


class RequestLimitReached(Conflict):
    """A connection may have at most 50 requests."""

    code = "request_limit_reached"


class InvalidInput(HubError):
    """The request is not valid."""

    code = "validation_error"
    status = 422


class UnsupportedIntegrationMethod(InvalidInput):
    """Only the "rest" integration method is supported."""

    code = "unsupported_integration_method"


class InvalidVerb(InvalidInput):
    """Verbs must be among GET PUT POST DELETE TRACE PATCH HEAD OPTIONS."""

    code = "invalid_verb"


class VerbNotAllowed(InvalidInput):
    """The connection's template does not allow this verb."""

    code = "verb_not_allowed"


class UnsupportedMediaType(InvalidInput):
    """Unsupported media type."""

    code = "unsupported_media_type"


class InvalidBody(InvalidInput):
    """The body does not fit the media type."""

    code = "invalid_body"


class MissingAuthHeader(InvalidInput):
    """A required authentication header has no value."""

    code = "missing_auth_header"


class InvalidOAuth2(InvalidInput):
    """The OAuth 2.0 settings do not fit the template."""

    code = "invalid_oauth2"


class HostNotAllowed(InvalidInput):
    """The host is not among the connection's allowed hosts."""

    code = "host_not_allowed"


class SchemeNotAllowed(InvalidInput):
    """Only https URLs are allowed (http when the hub allows it)."""

    code = "scheme_not_allowed"


class InvalidUrl(InvalidInput):
    """The URL is not valid."""

    code = "invalid_url"


class ManualRequestHasPlaceholders(InvalidInput):
    """A manual request cannot have caller placeholders; make it a studio request."""

    code = "manual_request_has_placeholders"


class MissingVariable(InvalidInput):
    """A placeholder has no value."""

    code = "missing_variable"


class IdempotencyKeyReused(InvalidInput):
    """This Idempotency-Key was used within 24 hours for a different submission."""

    code = "idempotency_key_reused"


class NotImplementedYet(InvalidInput):
    """This kind of execution is not supported yet."""

    code = "not_implemented"


class MasterKeyMissing(HubError):
    """No master key is configured: set HUB_MASTER_KEYS (make one with `integration-hub keys generate`)."""

    code = "master_key_missing"


class InvalidMasterKey(HubError):
    """HUB_MASTER_KEYS must be comma-separated base64 encodings of 32-byte keys."""

    code = "invalid_master_key"


class TenantQuotaExceeded(HubError):
    """The tenant has as many jobs in flight as its quota allows. Try again after Retry-After."""

    code = "tenant_quota_exceeded"
    status = 429


class Unavailable(HubError):
    """A service the hub depends on is unavailable."""

    code = "service_unavailable"
    status = 503


class BrokerUnavailable(Unavailable):
    """The job could not be queued: the broker is unavailable. Try again."""

    code = "broker_unavailable"


class DatabaseUnavailable(Unavailable):
    """The database is unavailable; nothing was stored. Try again."""

    code = "database_unavailable"


class JobError(HubError):
    """The job failed."""

    code = "job_failed"


class Blocked(JobError):
    """The destination is not allowed."""

    code = "blocked_destination"


class SecretMissing(JobError):
    """A secret the request refers to does not exist."""

    code = "secret_missing"


class TokenRequestFailed(JobError):
    """The OAuth 2.0 token request failed."""

    code = "token_request_failed"


class SecretReferenceRequired(InvalidInput):
    """This field holds a credential: give it as a secret reference, {{secrets.NAME}}."""

    code = "secret_reference_required"


class SecretUnreadable(JobError):
    """A secret could not be decrypted with the configured master keys."""

    code = "secret_unreadable"


class ReferenceGone(JobError):
    """The connection or request of this job no longer exists."""

    code = "reference_gone"


class UpstreamError(JobError):
    """The request to the web service failed."""

    code = "request_failed"


class ConnectTimeout(UpstreamError):
    """Timed out connecting to the web service."""

    code = "connect_timeout"


class ReadTimeout(UpstreamError):
    """Timed out waiting for the web service's response."""

    code = "read_timeout"


class WriteTimeout(UpstreamError):
    """Timed out sending the request to the web service."""

    code = "write_timeout"


class PoolTimeout(UpstreamError):
    """Timed out waiting for a free connection."""

    code = "pool_timeout"


class ConnectionRefused(UpstreamError):
    """Could not connect to the web service."""

    code = "connection_refused"


class ConnectionReset(UpstreamError):
    """The web service (or something on the way) broke the connection while the request or
    its answer was under way. Not retried: the service may have acted on the request."""

    code = "connection_reset"


class TlsError(UpstreamError):
    """The TLS handshake with the web service failed."""

    code = "tls_error"


class TooManyRedirects(UpstreamError):
    """The web service redirected more than 5 times."""

    code = "too_many_redirects"


class InvalidHeader(JobError):
    """A header value would hold a line break once its placeholders are filled in."""

    code = "invalid_header"


class ProtocolError(UpstreamError):
    """The web service's answer was not valid HTTP."""

    code = "protocol_error"


class RetriesExhausted(JobError):
    """Every attempt the job had failed in a way that is retried."""

    code = "retries_exhausted"


class RateLimited(JobError):
    """The job waited longer than allowed for its tenant's rate or its connection's cooldown."""

    code = "rate_limited"


class WorkerLost(JobError):
    """The worker running the job was lost, and the request is not safe to send again."""

    code = "worker_lost"


class JobLost(JobError):
    """The job's message was lost more times than the hub sends it again."""

    code = "job_lost"
