"""The processes under test, started the way the hub's own commands start them.

Shared by the hub and the baseline: Redis (``HUB_REDIS_URL`` if set, else a Redis server
started from the binary the hub bundles) and the demo upstream (``integration-hub upstream``).
The hub: a database (a fresh SQLite file, or a fresh database on the PostgreSQL server of
``--database-url``), ``integration-hub migrate``, ``tenants create``, ``api``, and ``worker``
processes per pool. The baseline: ``celery -A bench.baseline_app worker`` processes with the
same pool, concurrency and log level.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import redis
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from bench import procs
from bench.baseline_app import QUEUE

ROOT = Path(__file__).resolve().parent.parent
HUB = [sys.executable, "-m", "api_shim.cli"]
INSTRUMENTED_HUB = [sys.executable, "-m", "bench.instrument"]
TENANT_LIMIT = "100000"


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_ok(url: str) -> bool:
    return httpx.get(url, timeout=2, trust_env=False).status_code == 200


def _normalize(url: str) -> str:
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


@dataclass
class WorkerSet:
    """The worker processes of one kind (hub or baseline) and pool."""

    kind: str
    pool: str
    children: list[procs.Child]
    concurrency: int
    """The ``-c`` of each process."""

    @property
    def group(self) -> procs.Group:
        return procs.Group(f"{self.kind} workers", [c.pid for c in self.children])

    def command_line(self) -> str:
        return " ".join(self.children[0].command).replace(sys.executable, "python") if self.children else ""


@dataclass
class Stack:
    """Everything the benchmark started, and how to reach it."""

    work: Path
    children: procs.Children
    profile: bool = False
    redis_url: str = ""
    redis_origin: str = ""
    upstream: str = ""
    api: str = ""
    database_url: str = ""
    database_label: str = ""
    key: str = ""
    env: dict[str, str] = field(default_factory=dict)
    groups: dict[str, procs.Group] = field(default_factory=dict)
    _drop_database: tuple[str, str] | None = None

    # --- shared services ---------------------------------------------------------------------

    def start_redis(self) -> None:
        """``HUB_REDIS_URL`` when set, else a loopback Redis server from the hub's bundled binary."""
        given = os.environ.get("HUB_REDIS_URL")
        if given:
            self.redis_url, self.redis_origin = given, "HUB_REDIS_URL"
        else:
            from api_shim import embedded_redis

            binary, origin = embedded_redis.find_redis_server()
            port = free_port()
            data = self.work / "redis"
            data.mkdir(parents=True, exist_ok=True)
            child = self.children.start("redis", embedded_redis.server_command(binary, port, data), dict(os.environ))
            self.redis_url = f"redis://127.0.0.1:{port}/0"
            self.redis_origin = f"started by the benchmark ({origin}: {binary})"
            self.groups["redis"] = procs.Group("redis", [child.pid])
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        try:
            procs.wait_until(client.ping, "Redis", self.children.started[-1] if not given else None)
        finally:
            client.close()

    def base_env(self) -> dict[str, str]:
        """The hub's environment: the caller's, without any HUB_* setting, plus the benchmark's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUB_")}
        env.update(
            HUB_DATA_DIR=str(self.work),
            HUB_REDIS_URL=self.redis_url,
            HUB_ALLOW_HTTP="true",
            HUB_ALLOW_PRIVATE_DESTINATIONS="true",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        )
        return env

    def start_upstream(self) -> None:
        port = free_port()
        child = self.children.start("upstream", [*HUB, "upstream", "--port", str(port)], self.base_env(), self.work)
        self.upstream = f"http://127.0.0.1:{port}"
        procs.wait_until(lambda: http_ok(f"{self.upstream}/stats"), "the demo upstream", child)
        self.groups["upstream"] = procs.Group("upstream", [child.pid])

    # --- the hub -----------------------------------------------------------------------------

    def _hub(self, *arguments: str) -> str:
        import subprocess

        done = subprocess.run([*HUB, *arguments], env=self.env, cwd=self.work, capture_output=True, text=True,
                              timeout=120)
        if done.returncode != 0:
            raise procs.StartError(f"integration-hub {' '.join(arguments)} failed:\n{done.stderr[-2000:]}")
        return done.stdout

    def prepare_database(self, database_url: str | None) -> None:
        """A fresh SQLite file, or a fresh database on the server of ``database_url``."""
        if not database_url:
            self.database_url = f"sqlite:///{self.work / 'hub.db'}"
            self.database_label = "SQLite file (WAL), fresh"
            return
        admin_url = make_url(_normalize(database_url))
        name = f"hub_bench_{os.getpid()}_{secrets.token_hex(3)}"
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                version = connection.execute(sa.text("SHOW server_version")).scalar_one()
                connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        self._drop_database = (admin_url.render_as_string(hide_password=False), name)
        self.database_url = admin_url.set(database=name).render_as_string(hide_password=False)
        self.database_label = f"PostgreSQL {version} on {admin_url.host}:{admin_url.port or 5432}, fresh database {name}"
        self.groups["postgres"] = procs.Group("postgres", comm="postgres")

    def drop_database(self) -> None:
        if self._drop_database is None:
            return
        admin_url, name = self._drop_database
        admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()
        self._drop_database = None

    def start_hub(self, database_url: str | None) -> None:
        """Database, migrations, tenant, API: the hub minus its workers."""
        self.prepare_database(database_url)
        self.env = self.base_env()
        self.env["HUB_DATABASE_URL"] = self.database_url
        self.env["HUB_MASTER_KEYS"] = self._hub("keys", "generate").strip().splitlines()[-1]
        self._hub("migrate")
        created = self._hub("tenants", "create", "bench", "--rate", TENANT_LIMIT, "--burst", TENANT_LIMIT,
                            "--max-inflight", TENANT_LIMIT)
        self.key = created.strip().splitlines()[-1]
        port = free_port()
        env = self._counting_env("api")
        child = self.children.start("api", [*self._hub_command(), "api", "--port", str(port)], env, self.work)
        self.api = f"http://127.0.0.1:{port}"
        procs.wait_until(lambda: http_ok(f"{self.api}/readyz"), "the API", child)
        self.groups["api"] = procs.Group("api", [child.pid])

    def _hub_command(self) -> list[str]:
        return INSTRUMENTED_HUB if self.profile else HUB

    def _counting_env(self, role: str) -> dict[str, str]:
        env = dict(self.env)
        if self.profile:
            directory = self.work / "counts"
            directory.mkdir(parents=True, exist_ok=True)
            env["BENCH_COUNT_DIR"] = str(directory)
        return env

    # --- workers -----------------------------------------------------------------------------

    def start_workers(self, kind: str, pool: str, processes: int, per_process: int,
                      baseline_delivery: str = "celery") -> WorkerSet:
        """``processes`` worker processes running tasks: one prefork worker with ``-c processes``,
        or ``processes`` threads/gevent workers with ``-c per_process`` each."""
        if pool == "prefork":
            instances, concurrency = 1, processes
        else:
            instances, concurrency = processes, per_process
        children = []
        for n in range(1, instances + 1):
            name = f"{kind}-{pool}-{n}"
            options = ["--loglevel=INFO", f"--pool={pool}", f"--concurrency={concurrency}", "-n", f"{name}@%h"]
            if kind == "hub":
                command = [*self._hub_command(), "worker", "--pool", pool, "-c", str(concurrency),
                           "-n", f"{name}@%h"]
                env = self._counting_env("worker")
            else:
                command = [sys.executable, "-m", "celery", "-A", "bench.baseline_app", "worker", "-Q", QUEUE,
                           *options]
                env = {**self.base_env(), "BENCH_BROKER_URL": self.redis_url,
                       "BENCH_BASELINE_DELIVERY": baseline_delivery}
            children.append(self.children.start(name, command, env, self.work))
        for child in children:
            procs.wait_until(_ready(child), child.name, child)
        return WorkerSet(kind, pool, children, concurrency)

    def stop_workers(self, workers: WorkerSet) -> None:
        for child in reversed(workers.children):
            self.children.stop(child)

    # --- the hub's objects, through its HTTP API ---------------------------------------------

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.api, headers={"Authorization": f"Bearer {self.key}"}, timeout=30,
                            trust_env=False)

    def create_connection(self, name: str) -> None:
        """An OAuth 2.0 connection (client credentials against the demo upstream's token
        endpoint; client secret and a custom header from secrets) with two stored requests:
        ``items`` (``GET /oauth/protected/items``, which wants the token) and ``big``
        (``GET /bytes/10485760``, a 10 MB body)."""
        with self.http() as hub:
            template = _ok(hub.post("/v1/templates", json={
                "name": f"{name} template", "service_name": "Demo upstream", "auth_type": "oauth2",
                "verbs": ["GET"], "auth_headers": [{"name": "X-Bench-Key", "required": True, "default": None}],
            }), 201)
            _ok(hub.post("/v1/connections", json={
                "name": name, "template_id": template["id"], "base_url": self.upstream,
                "auth_header_values": {"X-Bench-Key": "{{secrets.bench_key}}"},
                "oauth2": {"grant_type": "client_credentials", "token_url": f"{self.upstream}/oauth/token",
                           "client_id": "demo-client", "client_secret": "{{secrets.client_secret}}",
                           "client_auth_method": "client_secret_basic", "scope": "api"},
            }), 201)
            for secret, value in (("client_secret", "demo-secret"), ("bench_key", secrets.token_hex(8))):
                _ok(hub.put(f"/v1/connections/{name}/secrets/{secret}", json={"value": value}), 204)
            for request, url in (("items", "/oauth/protected/items"), ("big", "/bytes/10485760")):
                _ok(hub.post(f"/v1/connections/{name}/requests", json={"name": request, "method": "GET", "url": url}),
                    201)

    def token_stats(self) -> dict[str, Any]:
        """The demo OAuth server's counters."""
        stats: dict[str, Any] = httpx.get(f"{self.upstream}/oauth/admin/stats", timeout=10, trust_env=False).json()
        return stats

    def redis_version(self) -> str:
        client = redis.Redis.from_url(self.redis_url)
        try:
            return str(client.info("server")["redis_version"])
        finally:
            client.close()

    def stop(self) -> None:
        self.children.stop_all()
        try:
            self.drop_database()
        except Exception as exc:  # reported, not raised: the processes are stopped already
            print(f"could not drop the benchmark database: {exc}", file=sys.stderr)


def _ok(answer: httpx.Response, status: int) -> dict[str, Any]:
    if answer.status_code != status:
        raise procs.StartError(f"{answer.request.method} {answer.request.url.path} answered "
                               f"{answer.status_code}: {answer.text[:300]}")
    return answer.json() if answer.content else {}


def _ready(child: procs.Child) -> Callable[[], bool]:
    """Whether a Celery worker has logged that it is ready."""
    return lambda: b" ready." in child.log.read_bytes()
