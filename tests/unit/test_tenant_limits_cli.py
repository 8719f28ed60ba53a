"""``integration-hub tenants set NAME [--rate R] [--burst B] [--max-inflight N]``: an operator
changes a tenant's limits; ``0`` (``-1`` for the burst) goes back to the default.

The command runs in-process (``api_shim.cli.main``) on the test database, named by
``HUB_DATABASE_URL`` as an operator's environment would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import fakeredis
import httpx
import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from api_shim.cli import main
from models import db
from models.settings import Settings, get_settings
from models.tables import Tenant
from models.tenants import create_tenant
from tests.api.helpers import assert_problem, make_connection, make_request
from tests.conftest import Api, in_process_runtime, test_settings

Limits = tuple[float | None, int | None, int | None]


@dataclass
class Cli:
    """Runs the command; what it printed, and the tenant's limits as stored."""

    engine: Engine
    capsys: pytest.CaptureFixture[str]

    def __call__(self, *args: str) -> tuple[int, str, str]:
        """``integration-hub ARGS``: the exit code, stdout and stderr."""
        code = main(list(args))
        out, err = self.capsys.readouterr()
        return code, out, err

    def limits(self, name: str) -> Limits:
        """The tenant's ``(rate_per_s, burst, max_inflight)``; None is the default."""
        with Session(self.engine) as session:
            tenant = session.exec(select(Tenant).where(Tenant.name == name)).one()
            return tenant.rate_per_s, tenant.burst, tenant.max_inflight

    def tenant(self, name: str, **limits: float | int | None) -> None:
        with Session(self.engine) as session:
            create_tenant(session, name=name, **limits)  # type: ignore[arg-type]
            session.commit()


@pytest.fixture
def cli(engine: Engine, database_url: str, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    """The command on the test database; the settings and engine it caches are dropped after."""
    monkeypatch.setenv("HUB_DATABASE_URL", database_url)
    get_settings.cache_clear()
    yield Cli(engine, capsys)
    get_settings.cache_clear()
    for key in [key for key in db._engines if key[1] == database_url]:
        db._engines.pop(key).dispose()


def test_set_changes_rate_burst_and_max_inflight(cli: Cli) -> None:
    # Given: a tenant on the defaults
    cli.tenant("acme")
    # When: the operator sets all three limits
    code, out, err = cli("tenants", "set", "acme", "--rate", "5", "--burst", "10", "--max-inflight", "20")
    # Then: it succeeds, says what the tenant's limits now are, and stores them
    assert (code, err) == (0, "")
    assert "Tenant acme: rate 5.0, burst 10, max-inflight 20" in out
    assert cli.limits("acme") == (5.0, 10, 20)


def test_set_changes_only_what_it_is_given(cli: Cli) -> None:
    # Given: a tenant with its own limits
    cli.tenant("acme", rate_per_s=5.0, burst=10, max_inflight=20)
    # When: the operator changes the rate alone, then the in-flight quota alone
    assert cli("tenants", "set", "acme", "--rate", "2.5")[0] == 0
    assert cli.limits("acme") == (2.5, 10, 20)
    assert cli("tenants", "set", "acme", "--max-inflight", "3")[0] == 0
    # Then: the other limits are kept
    assert cli.limits("acme") == (2.5, 10, 3)


def test_zero_and_minus_one_go_back_to_the_defaults(cli: Cli) -> None:
    # Given: a tenant with its own limits
    cli.tenant("acme", rate_per_s=5.0, burst=10, max_inflight=20)
    # When: the operator sets rate 0, burst -1 and max-inflight 0
    code, out, _err = cli("tenants", "set", "acme", "--rate", "0", "--burst", "-1", "--max-inflight", "0")
    # Then: the tenant is back on every default, and the command says so
    assert code == 0
    assert "Tenant acme: rate default, burst default, max-inflight default" in out
    assert cli.limits("acme") == (None, None, None)


def test_a_burst_of_zero_is_a_value_not_the_default(cli: Cli) -> None:
    # Given: a tenant on the defaults
    cli.tenant("acme")
    # When: the operator sets the burst to 0 (no requests above the rate)
    code, out, _err = cli("tenants", "set", "acme", "--burst", "0")
    # Then: 0 is stored (-1, not 0, is the default for the burst)
    assert code == 0 and "burst 0" in out
    assert cli.limits("acme") == (None, 0, None)


def test_an_unknown_tenant_is_exit_1_with_a_message(cli: Cli) -> None:
    # Given: no tenant named nobody
    cli.tenant("acme")
    # When: the operator sets its limits
    code, out, err = cli("tenants", "set", "nobody", "--rate", "5")
    # Then: exit 1, a message naming it on stderr, no traceback, nothing created or changed
    assert code == 1
    assert "no tenant named 'nobody'" in err and err.startswith("error: ")
    assert "Traceback" not in err and out == ""
    with Session(cli.engine) as session:
        assert [t.name for t in session.exec(select(Tenant)).all()] == ["acme"]
    assert cli.limits("acme") == (None, None, None)


@pytest.mark.parametrize(("args", "words"), [
    (["--rate", "-1"], "rate"),
    (["--rate", "nan"], "rate"),
    (["--rate", "inf"], "rate"),
    (["--burst", "-2"], "burst"),
    (["--max-inflight", "-1"], "in-flight"),
], ids=["negative-rate", "nan-rate", "infinite-rate", "burst-below-minus-one", "negative-max-inflight"])
def test_invalid_values_are_refused(cli: Cli, args: list[str], words: str) -> None:
    # Given: a tenant with its own limits
    cli.tenant("acme", rate_per_s=5.0, burst=10, max_inflight=20)
    # When: the operator sets a value no limit can have, with a valid one besides
    valid = ["--rate", "7"] if args[0] == "--max-inflight" else ["--max-inflight", "7"]
    code, out, err = cli("tenants", "set", "acme", *valid, *args)
    # Then: exit 1 with a message saying which, and nothing changed, not even the valid value
    assert code == 1, out
    assert err.startswith("error: ") and words in err and "Traceback" not in err
    assert cli.limits("acme") == (5.0, 10, 20)


@pytest.mark.parametrize("args", [
    ["--rate", "fast"], ["--burst", "1.5"], ["--max-inflight", "ten"], ["--max-inflight", "2.5"],
], ids=["rate-not-a-number", "burst-not-an-integer", "max-inflight-not-a-number", "max-inflight-not-an-integer"])
def test_values_that_are_not_numbers_are_refused_by_the_parser(cli: Cli, args: list[str]) -> None:
    # Given: a tenant with its own limits
    cli.tenant("acme", rate_per_s=5.0, burst=10, max_inflight=20)
    # When: the operator gives a value that is not a number of the right kind
    with pytest.raises(SystemExit) as exit_:
        cli("tenants", "set", "acme", *args)
    # Then: the usage error (exit 2) names the option, and nothing changed
    assert exit_.value.code == 2
    assert args[0] in cli.capsys.readouterr().err
    assert cli.limits("acme") == (5.0, 10, 20)


def test_the_api_applies_the_quota_the_cli_sets(api: Api, cli: Cli) -> None:
    """What the operator sets is the quota the tenant's submissions meet."""
    # Given: tenant a with a connection, and a quota of 1 set with the command
    make_request(api, make_connection(api, name="svc"), name="list")
    assert cli("tenants", "set", "tenant-a", "--max-inflight", "1")[0] == 0

    def submit() -> httpx.Response:
        return api.client.post("/v1/executions", json={"connection": "svc", "request": "list"},
                               headers=api.headers())

    # When: it submits two jobs
    first, second = submit(), submit()
    # Then: the first is accepted and the second is over the quota
    assert first.status_code == 202, first.text
    assert_problem(second, 429, "tenant_quota_exceeded")
    # When: the operator puts the tenant back on the default quota (100)
    assert cli("tenants", "set", "tenant-a", "--max-inflight", "0")[0] == 0
    # Then: its submissions are accepted again
    assert submit().status_code == 202


def test_workers_apply_the_rate_and_burst_the_cli_sets(cli: Cli, engine: Engine, database_url: str) -> None:
    """A worker reads the tenant's rate and burst, or the defaults once reset."""
    # Given: a tenant with rate 4 and burst 2 set with the command
    cli.tenant("acme")
    assert cli("tenants", "set", "acme", "--rate", "4", "--burst", "2")[0] == 0
    settings = test_settings(database_url, default_rate_per_s=10.0, default_burst=20)
    tenant_id = _tenant_id(engine, "acme")
    # When: a worker (a new process: nothing cached) looks up the tenant's rate
    # Then: it is the tenant's
    assert _rate(settings, engine, tenant_id) == (4.0, 2)
    # And: after a reset, the defaults
    assert cli("tenants", "set", "acme", "--rate", "0", "--burst", "-1")[0] == 0
    assert _rate(settings, engine, tenant_id) == (10.0, 20)


def _tenant_id(engine: Engine, name: str) -> str:
    with Session(engine) as session:
        return session.exec(select(Tenant).where(Tenant.name == name)).one().id


def _rate(settings: Settings, engine: Engine, tenant_id: str) -> tuple[float, int]:
    """The rate a freshly started worker applies to the tenant."""
    runtime = in_process_runtime(settings, engine, httpx.MockTransport(lambda request: httpx.Response(200)),
                                 lambda host, port: [], fakeredis.FakeRedis())
    with runtime.client, Session(engine) as session:
        found = runtime.rate(session, tenant_id)
    return found.per_s, found.burst
