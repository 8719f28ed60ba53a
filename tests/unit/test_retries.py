"""The retry policy as pure functions: what is retried, after how long, and how a service's
``Retry-After`` is read. No database, no network."""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.retries import backoff, delay, repeatable, retried, retry_after

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)

# --- what is retried ------------------------------------------------------------------------

STATUS_POLICY = [
    (429, True),
    (502, True),
    (503, True),
    (504, True),
    (200, False),
    (201, False),
    (204, False),
    (301, False),
    (304, False),
    (400, False),
    (401, False),
    (403, False),
    (404, False),
    (408, False),
    (409, False),
    (422, False),
    (500, False),
    (501, False),
    (505, False),
]


@pytest.mark.parametrize(("status", "expected"), STATUS_POLICY)
def test_which_statuses_are_retried(status: int, expected: bool) -> None:
    """Only 429, 502, 503 and 504: any other answer is the service's final word."""
    # When an attempt got the status / Then it is retried only if the policy names it
    assert retried(status_code=status) is expected


ERROR_POLICY = [
    ("connection_refused", True),
    ("connect_timeout", True),
    # the request may have reached the service: never sent twice
    ("read_timeout", False),
    ("write_timeout", False),
    ("protocol_error", False),
    ("request_failed", False),
    # the hub refused, or the job cannot work: trying again changes nothing
    ("pool_timeout", False),
    ("tls_error", False),
    ("blocked_destination", False),
    ("too_many_redirects", False),
    ("secret_missing", False),
    ("reference_gone", False),
    ("verb_not_allowed", False),
    ("internal_error", False),
    (None, False),
]


@pytest.mark.parametrize(("code", "expected"), ERROR_POLICY)
def test_which_transport_errors_are_retried(code: str | None, expected: bool) -> None:
    """Only the errors that prove the request never left: refused, or timed out connecting."""
    # When an attempt failed with the error code / Then it is retried only if the policy names it
    assert retried(error_code=code) is expected


def test_a_status_decides_even_when_an_error_code_is_given() -> None:
    """The service answered: its status is what counts."""
    assert retried(status_code=404, error_code="connection_refused") is False
    assert retried(status_code=503, error_code="read_timeout") is True


METHOD_POLICY = [
    # (method, with Idempotency-Key, may be sent again)
    ("GET", False, True),
    ("HEAD", False, True),
    ("OPTIONS", False, True),
    ("PUT", False, True),
    ("DELETE", False, True),
    ("TRACE", False, True),
    ("get", False, True),
    ("POST", False, False),
    ("PATCH", False, False),
    ("post", False, False),
    ("POST", True, True),
    ("PATCH", True, True),
    ("GET", True, True),
    (None, False, True),  # the auth action: a token request
    (None, True, True),
]


@pytest.mark.parametrize(("method", "key", "expected"), METHOD_POLICY)
def test_which_requests_may_be_sent_again(method: str | None, key: bool, expected: bool) -> None:
    """Idempotent verbs always; POST and PATCH only with an Idempotency-Key."""
    # When the policy is asked about the method / Then it answers as the table says
    assert repeatable(method, idempotency_key=key) is expected


# --- backoff --------------------------------------------------------------------------------

attempts = st.integers(min_value=1, max_value=10_000)
bases = st.floats(min_value=0.001, max_value=1_000.0, allow_nan=False, allow_infinity=False)
caps = st.floats(min_value=0.001, max_value=100_000.0, allow_nan=False, allow_infinity=False)
draws = st.floats(min_value=0.0, max_value=1.0, exclude_max=True)


def ceiling(attempt: int, base_s: float, cap_s: float) -> float:
    """``min(cap, base · 2^(attempt-1))``, without overflowing for huge attempts."""
    exponent = attempt - 1
    return cap_s if exponent > 200 else min(cap_s, base_s * 2.0**exponent)


@given(attempt=attempts, base_s=bases, cap_s=caps, draw=draws)
def test_backoff_is_within_zero_and_the_ceiling(attempt: int, base_s: float, cap_s: float, draw: float) -> None:
    """Full jitter: a draw in [0, min(cap, base · 2^(n-1))]."""
    # When the backoff after attempt n is drawn
    wait = backoff(attempt, base_s=base_s, cap_s=cap_s, rand=lambda: draw)
    # Then it lies between zero and the ceiling, and is that fraction of it
    assert 0.0 <= wait <= ceiling(attempt, base_s, cap_s)
    assert wait == pytest.approx(draw * ceiling(attempt, base_s, cap_s))


@given(attempt=attempts, base_s=bases, cap_s=caps)
def test_backoff_of_a_zero_draw_is_zero(attempt: int, base_s: float, cap_s: float) -> None:
    # When the random draw is 0 / Then the job may come back at once
    assert backoff(attempt, base_s=base_s, cap_s=cap_s, rand=lambda: 0.0) == 0.0


@given(attempt=attempts, base_s=bases, cap_s=caps)
def test_backoff_of_a_draw_near_one_is_the_ceiling(attempt: int, base_s: float, cap_s: float) -> None:
    # When the random draw is (nearly) 1 / Then the wait is (nearly) the ceiling
    top = ceiling(attempt, base_s, cap_s)
    assert backoff(attempt, base_s=base_s, cap_s=cap_s, rand=lambda: 1.0) == top
    assert backoff(attempt, base_s=base_s, cap_s=cap_s, rand=lambda: 1.0 - 1e-12) == pytest.approx(top)


@given(attempt=attempts, base_s=bases, cap_s=caps)
def test_backoff_ceiling_never_shrinks(attempt: int, base_s: float, cap_s: float) -> None:
    """Each next attempt may wait at least as long as the one before, never more than the cap."""
    # When the ceilings of two consecutive attempts are compared
    this = backoff(attempt, base_s=base_s, cap_s=cap_s, rand=lambda: 1.0)
    after = backoff(attempt + 1, base_s=base_s, cap_s=cap_s, rand=lambda: 1.0)
    # Then the later one is not lower, and neither passes the cap
    assert this <= after <= cap_s


@given(attempt=st.integers(min_value=64, max_value=10**18), base_s=bases, cap_s=caps)
def test_backoff_of_a_huge_attempt_number_is_the_cap(attempt: int, base_s: float, cap_s: float) -> None:
    # When the attempt number is far past any exponent a float holds
    wait = backoff(attempt, base_s=base_s, cap_s=cap_s, rand=lambda: 1.0)
    # Then there is no overflow: the wait is the cap
    assert math.isfinite(wait)
    assert wait == cap_s


def test_backoff_doubles_from_the_base_until_the_cap() -> None:
    # Given base 1 s and cap 10 s / When the ceilings of attempts 1 to 6 are read
    tops = [backoff(n, base_s=1.0, cap_s=10.0, rand=lambda: 1.0) for n in range(1, 7)]
    # Then they double from the base, then stay at the cap
    assert tops == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


@pytest.mark.parametrize("attempt", [0, -1, -(10**9)])
def test_backoff_of_an_attempt_below_one_is_the_first(attempt: int) -> None:
    # When an attempt number below 1 is given / Then it counts as the first attempt
    assert backoff(attempt, base_s=2.0, cap_s=60.0, rand=lambda: 1.0) == 2.0


def test_backoff_uses_the_random_draw_by_default() -> None:
    # When the backoff is drawn many times without a rand of our own
    waits = {backoff(3, base_s=1.0, cap_s=60.0) for _ in range(50)}
    # Then every draw is in range, and they are not all the same (jitter)
    assert all(0.0 <= wait <= 4.0 for wait in waits)
    assert len(waits) > 1


# --- Retry-After ----------------------------------------------------------------------------


def http_date(moment: datetime) -> str:
    return moment.strftime("%a, %d %b %Y %H:%M:%S GMT")


@pytest.mark.parametrize(("value", "seconds"), [("7", 7.0), ("0", 0.0), (" 120 ", 120.0), ("0010", 10.0)])
def test_retry_after_in_seconds(value: str, seconds: float) -> None:
    # When the header holds delta-seconds / Then that many seconds
    assert retry_after(value, now=NOW) == seconds


def test_retry_after_of_a_huge_number_is_finite() -> None:
    # When the header holds more digits than any sane wait / Then it is read (capped later), not an error
    seconds = retry_after("9" * 40, now=NOW)
    assert seconds is not None and math.isfinite(seconds) and seconds > 10**9


def test_retry_after_as_a_future_http_date() -> None:
    # When the header is an HTTP date 90 s ahead / Then 90 seconds
    assert retry_after(http_date(NOW + timedelta(seconds=90)), now=NOW) == 90.0


def test_retry_after_as_a_past_http_date_is_zero() -> None:
    # When the header is an HTTP date already past / Then no wait (not a negative one)
    assert retry_after(http_date(NOW - timedelta(hours=1)), now=NOW) == 0.0


def test_retry_after_date_without_a_zone_is_utc() -> None:
    # When the date lacks "GMT" / Then it is read as UTC
    value = (NOW + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S")
    assert retry_after(value, now=NOW) == 30.0


def test_retry_after_date_defaults_to_the_current_time() -> None:
    # When no "now" is given / Then the wait is counted from the clock
    seconds = retry_after(http_date(datetime.now(timezone.utc) + timedelta(hours=1)))
    assert seconds is not None and 3500 < seconds <= 3600


@pytest.mark.parametrize("value", ["soon", "", "   ", "-5", "1.5", "7s", "0x10", "Thu, 99 Foo 2026",
                                   "\u00b2", "\u0661\u0662", "Mon, 01 Jan 99999 00:00:00 GMT"])
def test_retry_after_garbage_is_none(value: str) -> None:
    """Unreadable (including digits outside ASCII that a Latin-1 header can carry): ignored."""
    # When the header cannot be read / Then it is as if there were none
    assert retry_after(value, now=NOW) is None


def test_retry_after_absent_is_none() -> None:
    assert retry_after(None, now=NOW) is None


@given(st.one_of(st.text(max_size=40), st.text(alphabet=st.characters(codec="latin-1"), max_size=4)))
def test_retry_after_never_raises(value: str) -> None:
    """Whatever a service sends (httpx reads a header that is not UTF-8 as Latin-1): no wait,
    or a wait of zero or more seconds."""
    seconds = retry_after(value, now=NOW)
    assert seconds is None or (math.isfinite(seconds) and seconds >= 0.0)


# --- delay ----------------------------------------------------------------------------------

DELAY = {"base_s": 1.0, "cap_s": 60.0, "retry_after_cap_s": 300.0}


@pytest.mark.parametrize(("asked", "expected"), [(7.0, 7.0), (0.0, 0.0), (300.0, 300.0), (10_000.0, 300.0)])
def test_delay_honours_retry_after_up_to_its_cap(asked: float, expected: float) -> None:
    # When the service asked for a wait / Then that wait, at most the cap, and not the backoff
    assert delay(5, asked_s=asked, rand=lambda: 0.5, **DELAY) == expected


def test_retry_after_may_exceed_the_backoff_cap() -> None:
    # Given a Retry-After longer than the backoff's cap but within its own
    # When the delay is computed / Then the service's wish wins
    assert delay(1, asked_s=120.0, rand=lambda: 1.0, **DELAY) == 120.0


def test_delay_without_retry_after_is_the_backoff() -> None:
    # When the service asked for nothing / Then the backoff of the attempt
    assert delay(3, asked_s=None, rand=lambda: 0.5, **DELAY) == backoff(3, base_s=1.0, cap_s=60.0, rand=lambda: 0.5)
    assert delay(3, asked_s=None, rand=lambda: 0.5, **DELAY) == 2.0
