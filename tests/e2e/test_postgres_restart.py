"""PostgreSQL restarted while jobs run, from issue 8's fault matrix.

The stack (``tests/e2e/delivery_stack.py``) runs on a PostgreSQL server of the test's own, on a
free loopback port, which the test takes down while the workers run a batch of jobs and the API
takes submissions, then starts again: once with a fast shutdown (``pg_ctl stop -m fast``), once
as a crash (SIGKILL of the server and every backend, then crash recovery).

What a user would check afterwards: every job the API accepted is final, as the API shows it
and as its row in the database says; none is left waiting or running; the upstream got at
most one call per attempt, and no more attempts than the retry policy allows; and, the outage
being shorter than a lease, no job was called twice: a worker whose answer met the outage
records it once the database is back (``worker/leases.py``), instead of leaving the job for the
sweeper to run again; during the outage the API answered with a
problem document (``503 database_unavailable``), quickly, never a 500 or a trace; and the API,
the workers and the sweeper came back by themselves, no process restarted.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from models.tables import Connection, Job
from tests import processes
from tests.e2e.delivery_stack import FINAL, DeliveryStack, connection, running_stack, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.reliability, pytest.mark.timeout(150)]

DOWN_S = 2.5
"""How long the database stays down."""
SLOW = 16
"""The batch: this many GETs that take about a second at the upstream, as many it answers at
once, and a POST of a second without an Idempotency-Key (never sent twice) for every four."""
MAX_ATTEMPTS = 3
"""``HUB_DEFAULT_MAX_ATTEMPTS`` of the stack (``TIMINGS``)."""
JOBS, CONNECTIONS = Job.__table__, Connection.__table__  # type: ignore[attr-defined]
ANSWER_S = 5.0
"""Longest the API may take to answer during the outage: it must not hang."""


# -- a PostgreSQL server of the test's own ---------------------------------------------------------


@dataclass
class PostgresServer:
    """A PostgreSQL server in a directory of its own, listening on 127.0.0.1 only (its unix
    socket in that directory), run as the ``postgres`` user when the test runs as root."""

    directory: Path
    port: int
    as_user: list[str] = field(default_factory=list)
    """The prefix that runs a command as the server's owner (``runuser -u postgres --``)."""

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of ``database`` on this server (trust authentication, loopback)."""
        return f"postgresql+psycopg://hub@127.0.0.1:{self.port}/{database}"

    def run(self, *command: str) -> None:
        """Run a PostgreSQL program as the server's owner; fail with its output."""
        done = subprocess.run([*self.as_user, *command], cwd=self.directory, capture_output=True, text=True,
                              timeout=60, env={**os.environ, "LC_ALL": "C"})
        assert done.returncode == 0, f"{command[0]} failed:\n{done.stdout}\n{done.stderr}\n{self.tail()}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def init(self) -> None:
        """``initdb``, then a configuration for a test: loopback only, no fsync (a killed server
        loses nothing the operating system holds; commits stay synchronous)."""
        self.run("initdb", "-D", str(self.data), "-U", "hub", "--auth=trust", "-E", "UTF8", "--no-locale",
                 "--no-sync")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.directory}'\nfsync = off\nmax_connections = 200\n")

    def start(self) -> None:
        """Start the server and wait until it takes connections."""
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down: ``fast`` ends every session and checkpoints; ``immediate`` is
        an abort that leaves crash recovery to the next start."""
        self.run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def pids(self) -> list[int]:
        """The postmaster's pid and its children's (the backends and helpers), if it runs."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return []
        found = [postmaster]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, ValueError, IndexError):
                    continue
                if parent == postmaster:
                    found.append(int(entry.name))
        return found

    def crash(self) -> None:
        """SIGKILL the postmaster and every backend at once, as when the machine dies."""
        pids = self.pids()
        assert pids, "the server is not running"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        processes.wait_until(lambda: not any(_alive(pid) for pid in pids), "the server's processes gone", timeout=10)
        # Where nobody reaps the dead postmaster, its zombie would pass the next start's check
        # of the lock file (kill(pid, 0)); a machine that died leaves no process behind.
        (self.data / "postmaster.pid").unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie has)."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except (OSError, IndexError):
        return False


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this module's own, with a database ``hub``; stopped and removed after."""
    missing = [name for name in ("initdb", "pg_ctl", "postgres") if shutil.which(name) is None]
    if missing:
        pytest.skip(f"the PostgreSQL programs {', '.join(missing)} are not on PATH")
    as_user: list[str] = []
    # Not under pytest's tmp_path: as root, that is a directory the server's owner cannot enter.
    directory = Path(tempfile.mkdtemp(prefix="hub-pg-"))
    if os.geteuid() == 0:  # initdb refuses to run as root: the server runs as postgres
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(directory)
            pytest.skip("running as root, and there is no postgres user to run the server as")
        os.chown(directory, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(directory, processes.free_port(), as_user)
    try:
        server.init()
        server.start()
        admin = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT", poolclass=NullPool)
        with admin.connect() as conn:
            conn.execute(sa.text("CREATE DATABASE hub"))
        admin.dispose()
        yield server
    finally:
        if server.pids():
            try:
                server.stop("immediate")
            except AssertionError:
                server.crash()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_stack(postgres: PostgresServer, redis_url: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[DeliveryStack]:
    """The delivery stack (API, two workers of two slots, beat, upstream) on the server's ``hub``."""
    logs = tmp_path_factory.mktemp("pg-restart")
    with running_stack(redis_url, postgres.url("hub"), logs) as stack:
        yield stack


# -- the scenario ---------------------------------------------------------------------------------


@dataclass
class Outage:
    """What one run of the scenario saw."""

    accepted: dict[str, str] = field(default_factory=dict)
    """Job id → the upstream path that job calls."""
    posts: set[str] = field(default_factory=set)
    during: list[tuple[int, str, float]] = field(default_factory=list)
    """Each answer the API gave during the outage: status, code (or the job's status), seconds."""
    down_s: float = 0.0
    api_back_s: float = 0.0
    """From the server's start to the API's first 202."""
    job_back_s: float = 0.0
    """From the server's start to the first job submitted after it succeeding."""
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    rows: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Job id → (status, attempts) as the jobs table holds them."""
    calls: dict[str, int] = field(default_factory=dict)
    """Job id → how many requests the upstream got on the job's path."""

    def describe(self) -> str:
        """Figures for failure messages and the report."""
        answers = Counter((status, code) for status, code, _ in self.during)
        twice = sum(1 for job_id in self.accepted if self.calls.get(job_id, 0) > 1)
        states = Counter(job["status"] for job in self.jobs.values())
        codes = Counter((job.get("error") or {}).get("code") for job in self.jobs.values())
        return (f"down {self.down_s:.1f} s; answers during the outage {dict(answers)} (slowest "
                f"{max((s for *_, s in self.during), default=0):.2f} s); API back {self.api_back_s:.1f} s, "
                f"a new job done {self.job_back_s:.1f} s after the start; accepted {len(self.accepted)}; "
                f"final {dict(states)}; attempts {dict(Counter(a for _, a in self.rows.values()))}; "
                f"called twice {twice}; errors {dict(codes)}")


def _answer(response: httpx.Response) -> str:
    """The problem's code, or the job's status."""
    document = response.json()
    return str(document.get("code") or document.get("status"))


def run_outage(stack: DeliveryStack, postgres: PostgresServer, take_down: Callable[[], None]) -> Outage:
    """Submit a batch, take the database down with ``take_down`` while the workers call the
    upstream, keep submitting and polling through the API for ``DOWN_S``, start the database
    again, submit once more until the API takes it; then wait for every accepted job."""
    seen = Outage()
    tag = time.monotonic_ns()
    name = f"pg-{tag}"
    with stack.client(timeout=30) as client:
        # Given a connection to the upstream with a slow GET, a quick GET and a POST, each
        # call on a path of its own, so that the upstream counts the calls of each job
        connection(client, stack.upstream, name, {})
        for request, method, url in (("slow", "GET", "/slow/{d}"), ("quick", "GET", f"/echo/{name}/{{n}}"),
                                     ("post", "POST", "/slow/{d}")):
            stored = client.post(f"/v1/connections/{name}/requests",
                                 json={"name": request, "kind": "studio", "method": method, "url": url})
            assert stored.status_code == 201, stored.text

        def send(kind: str, n: int) -> httpx.Response:
            slow = kind in ("slow", "post")
            path = f"/slow/1.{n:04d}" if slow else f"/echo/{name}/{n}"
            params = {"d": f"1.{n:04d}"} if slow else {"n": str(n)}
            response = client.post("/v1/executions", json={"connection": name, "request": kind, "path_params": params})
            if response.status_code == 202:
                job_id = response.json()["id"]
                seen.accepted[job_id] = path
                if kind == "post":
                    seen.posts.add(job_id)
            return response

        before = stack.upstream_stats()  # the slow paths are shared with the other test

        # When a batch of jobs runs
        kinds = [kind for i in range(SLOW) for kind in ("slow", "quick", *(("post",) if i % 4 == 1 else ()))]
        batch = list(enumerate(kinds))
        for n, kind in batch:
            assert send(kind, n).status_code == 202
        slow_paths = [path for path in seen.accepted.values() if path.startswith("/slow/")]

        def mid_call() -> bool:
            stats = stack.upstream_stats()
            return sum(stats.get(path, 0) - before.get(path, 0) for path in slow_paths) >= 2

        processes.wait_until(mid_call, "the workers calling the upstream", timeout=20)

        def answered(ask: Callable[[], httpx.Response]) -> None:
            """During the outage: an answer at once, the job accepted or a problem document."""
            asked = time.monotonic()
            response = ask()
            took = time.monotonic() - asked
            seen.during.append((response.status_code, _answer(response), took))
            assert response.status_code in (200, 202, 503), response.text
            if response.status_code == 503:
                assert response.headers["content-type"] == "application/problem+json"
                assert response.json()["code"] == "database_unavailable", response.text
                assert response.headers.get("retry-after")
            assert "Traceback" not in response.text
            assert took < ANSWER_S, f"the API took {took:.1f} s to answer during the outage"

        # and the database goes down meanwhile
        went_down = time.monotonic()
        take_down()
        probe = f"/v1/executions/{next(iter(seen.accepted))}"
        n = len(batch)
        while time.monotonic() - went_down < DOWN_S:
            # Then the API answers every submission and poll at once: accepted, or a problem
            answered(partial(send, "quick", n))
            answered(partial(client.get, probe))
            answered(partial(client.get, probe, params={"wait": 1}))
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["database"].startswith("unavailable"), ready.text
            n += 1
            time.sleep(0.1)
        postgres.start()
        came_up = time.monotonic()
        seen.down_s = came_up - went_down

        # and, once the database is back, without restarting anything, the API takes a job again
        fresh: str | None = None
        while fresh is None and time.monotonic() - came_up < 30:
            response = send("quick", n)
            if response.status_code == 202:
                fresh = response.json()["id"]
            else:
                assert response.status_code == 503, response.text
                time.sleep(0.2)
        assert fresh is not None, "the API did not take a job in the 30 s after the database came back"
        seen.api_back_s = time.monotonic() - came_up
        job = client.get(f"/v1/executions/{fresh}?wait=30").json()
        assert job["status"] == "succeeded", job
        seen.job_back_s = time.monotonic() - came_up

        # and every accepted job ends (those whose outcome was lost once their lease is past)
        seen.jobs = wait_final(client, list(seen.accepted), timeout=60)
    stats = stack.upstream_stats()
    seen.calls = {job_id: stats.get(path, 0) - before.get(path, 0) for job_id, path in seen.accepted.items()}
    engine = sa.create_engine(postgres.url("hub"), poolclass=NullPool)
    try:
        with engine.connect() as conn:
            seen.rows = {row.id: (row.status, row.attempts) for row in conn.execute(
                sa.select(JOBS.c.id, JOBS.c.status, JOBS.c.attempts)
                .join(CONNECTIONS, CONNECTIONS.c.id == JOBS.c.connection_id).where(CONNECTIONS.c.name == name))}
            left = conn.execute(sa.select(sa.func.count()).select_from(JOBS)
                                .where(JOBS.c.status.not_in(FINAL))).scalar_one()
    finally:
        engine.dispose()
    assert left == 0, f"{left} jobs in the database are not final"
    return seen


def check(stack: DeliveryStack, seen: Outage) -> None:
    """The assertions both outages share (see the module's documentation)."""
    print(seen.describe())
    # Then every accepted job is final, as the API shows and as its row says, and no row is
    # a job the API refused
    assert set(seen.rows) == set(seen.accepted), seen.describe()
    for job_id, job in seen.jobs.items():
        assert job["status"] in FINAL, job
        assert seen.rows[job_id] == (job["status"], job["attempts"]), (job, seen.rows[job_id])
        calls, attempts = seen.calls[job_id], job["attempts"]
        # and the upstream got at most one call per attempt, and at most the policy's attempts
        assert attempts <= MAX_ATTEMPTS, job
        assert calls <= attempts, (job, calls)
        # and none was called twice: an answer that met the outage was recorded after it
        assert calls <= 1, (job, calls)
        if job_id in seen.posts:
            # a POST without an Idempotency-Key is not sent again: one whose worker lost it before
            # its call (the database failed under it) fails worker_lost, uncalled
            assert job["status"] == "succeeded" or (job["error"]["code"], calls) == ("worker_lost", 0), job
        else:
            # a GET succeeds, on a second attempt if the outage stopped the first before its call
            assert job["status"] == "succeeded", job
            assert job["result"]["status_code"] == 200, job
            assert calls == 1, (job, calls)
    # and the API refused some submissions during the outage, with 503 database_unavailable
    assert any(status == 503 for status, *_ in seen.during), seen.describe()
    # and no process died: the API, the workers, beat and the upstream still run
    for process_name, process in stack.started.items():
        assert process.poll() is None, f"{process_name} exited with {process.returncode}"
    # and a job with a second attempt was one the outage stopped before its call, taken back by
    # the sweeper once its lease was past
    workers = stack.log("worker-1") + stack.log("worker-2")
    for job_id, job in seen.jobs.items():
        if job["attempts"] > 1:
            assert f"job {job_id} swept: its worker was lost, sent again" in workers, job_id
    # and every process logged the outage in one line per failed operation, with the error's
    # type only: no trace, no driver message (which can quote a statement and its values)
    assert "database unavailable: OperationalError" in stack.log("api")
    assert "the database is unavailable" in workers and "code=OperationalError" in workers
    for process_name in stack.started:
        text = stack.log(process_name)
        for leak in ("Traceback", "[SQL:", "[parameters:", "psycopg", "Connection refused"):
            assert leak not in text, f"{process_name} logged {leak!r}"


# -- the tests ------------------------------------------------------------------------------------


def test_a_fast_restart_of_postgresql_while_jobs_run_loses_no_job(pg_stack: DeliveryStack,
                                                                   postgres: PostgresServer) -> None:
    """``pg_ctl stop -m fast`` (every session ended) mid-batch, started again DOWN_S later."""
    seen = run_outage(pg_stack, postgres, lambda: postgres.stop("fast"))
    check(pg_stack, seen)


def test_a_crash_of_postgresql_while_jobs_run_loses_no_job(pg_stack: DeliveryStack,
                                                            postgres: PostgresServer) -> None:
    """SIGKILL of the server and its backends mid-batch, started again (crash recovery) DOWN_S later."""
    seen = run_outage(pg_stack, postgres, postgres.crash)
    assert "automatic recovery in progress" in postgres.log.read_text(errors="replace"), "the server did not crash"
    check(pg_stack, seen)
