"""``integration-hub dev``: the whole stack on embedded defaults, in the foreground.

It starts, in order: a Redis server (unless ``HUB_REDIS_URL`` is set), the migrations on a
SQLite file in the data directory (unless ``HUB_DATABASE_URL`` is set), a demo tenant, the
demo upstream, the API, one Celery worker, Celery beat (the sweeper) and Flower. Each child runs in its own session (so
the terminal's Ctrl-C reaches only this process) and gets a parent-death signal (so nothing
outlives this process even if it is killed). On Ctrl-C or SIGTERM it stops them in reverse
order: SIGTERM to each child's main process, then, after a grace period, SIGKILL to what is
left of its process group.

Its children send Celery's task events (``HUB_TASK_EVENTS=true``), which are off by default:
the dev stack runs Flower, whose task list should hold every job from the first one, with
its ``task-sent`` state, instead of only those received after Flower's first "enable events"
broadcast to the workers.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import redis
from sqlmodel import Session, select

from api_shim import embedded_redis
from models import errors
from models.db import get_engine
from models.migrate import upgrade
from models.settings import Settings
from models.tables import Tenant
from models.tenants import create_tenant, issue_key, tenant_for_key
from models.vault import generate_key

DEMO_TENANT = "demo"
GRACE_S = 15.0
START_TIMEOUT_S = 60.0


def _die_with_parent() -> None:
    """In the child, before exec: receive SIGTERM when the dev command's process dies."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the dev command still stops its children on the way out


@dataclass
class Child:
    """A process the dev command started."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]


@dataclass
class Stack:
    """The running children, stopped in reverse order of starting."""

    data_dir: Path
    env: dict[str, str]
    children: list[Child] = field(default_factory=list)

    def start(self, name: str, command: list[str]) -> Child:
        """Start ``command`` as a child named ``name``, its output in the data directory's logs."""
        log_path = self.data_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")
        process = subprocess.Popen(
            command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        child = Child(name, process, log_path, log)
        self.children.append(child)
        return child

    def exited(self) -> Child | None:
        """A child that has exited, if any."""
        return next((c for c in self.children if c.process.poll() is not None), None)

    def stop(self) -> None:
        """Stop every child: SIGTERM, wait, then SIGKILL its whole process group."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
                try:
                    child.process.wait(GRACE_S)
                except subprocess.TimeoutExpired:
                    print(f"  {child.name} did not stop in {GRACE_S:.0f}s; killing it", flush=True)
            try:
                os.killpg(child.process.pid, signal.SIGKILL)  # pool children and stragglers
            except (ProcessLookupError, PermissionError):
                pass
            child.process.wait()
            child.log.close()
        self.children.clear()


class StartupError(errors.HubError):
    """The dev stack could not start."""

    code = "dev_start_failed"


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _starting(name: str) -> float:
    """Print the progress line of one part (finished by :func:`_ready`); when it started."""
    print(f"  {name:<9} starting…", end="", flush=True)
    return time.monotonic()


def _ready(started: float, where: str) -> None:
    print(f" ready in {time.monotonic() - started:.1f} s: {where}", flush=True)


def _wait_until(what: str, ready: object, stack: Stack, child: Child | None = None) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if child is not None and child.process.poll() is not None:
            raise StartupError(f"{child.name} exited while starting; see {child.log_path}")
        try:
            if ready():  # type: ignore[operator]
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise StartupError(f"{what} did not become ready in {START_TIMEOUT_S:.0f}s")


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as response:
        return bool(response.status == 200)


def _demo_key(settings: Settings, url: str) -> str:
    """The demo tenant's API key, kept in the data directory so it survives restarts."""
    key_file = settings.data_dir / "demo-api-key"
    engine = get_engine(url)
    with Session(engine) as session:
        if key_file.exists():
            key = key_file.read_text().strip()
            if tenant_for_key(session, key) is not None:
                return key
        tenant = session.exec(select(Tenant).where(Tenant.name == DEMO_TENANT)).first()
        if tenant is None:
            tenant = create_tenant(session, name=DEMO_TENANT)
        key = issue_key(session, tenant_id=tenant.id)
        session.commit()
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return key


def _master_keys(settings: Settings) -> str:
    """``HUB_MASTER_KEYS``, else a key kept in the data directory (made on the first run)."""
    if settings.master_keys is not None:
        return settings.master_keys.get_secret_value()
    key_file = settings.data_dir / "master.key"
    if not key_file.exists():
        key_file.touch(mode=0o600)
        key_file.write_text(generate_key() + "\n")
    return key_file.read_text().strip()


def run(settings: Settings, *, host: str, port: int, flower_port: int, upstream_port: int) -> int:
    """Run the dev stack until Ctrl-C or SIGTERM; the exit status."""
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    taken = [str(p) for p in (port, flower_port, upstream_port) if not _port_free(host, p)]
    if taken:
        print(f"Port {', '.join(taken)} on {host} is in use: stop what uses it or pass "
              "--port / --flower-port / --upstream-port.", file=sys.stderr)
        return 2

    def on_stop_signal(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # Explicitly, because a process started in the background may inherit SIGINT ignored.
    signal.signal(signal.SIGTERM, on_stop_signal)
    signal.signal(signal.SIGINT, on_stop_signal)
    database_url = settings.effective_database_url()
    env = {
        **os.environ,
        "HUB_DATA_DIR": str(data_dir),
        "HUB_DATABASE_URL": database_url,
        "HUB_MASTER_KEYS": _master_keys(settings.model_copy(update={"data_dir": data_dir})),
        "HUB_ALLOW_PRIVATE_DESTINATIONS": "true",
        "HUB_ALLOW_HTTP": "true",
        "FLOWER_UNAUTHENTICATED_API": "true",
        "HUB_TASK_EVENTS": "true",  # for Flower, from the first job on (see the module's docstring)
        "PYTHONUNBUFFERED": "1",
    }
    stack = Stack(data_dir, env)
    hub = [sys.executable, "-m", "api_shim.cli"]
    try:
        print(f"Starting the Integration Hub dev stack (data in {data_dir})", flush=True)
        redis_url = settings.redis_url
        if redis_url is None:
            binary, origin = embedded_redis.find_redis_server()
            redis_port = embedded_redis.free_port()
            child = stack.start("redis", embedded_redis.server_command(binary, redis_port, data_dir))
            redis_url = f"redis://127.0.0.1:{redis_port}/0"
            client = redis.Redis.from_url(redis_url, socket_connect_timeout=1)
            _wait_until("Redis", client.ping, stack, child)
            client.close()
            print(f"  redis     {redis_url} ({origin}: {binary})", flush=True)
        env["HUB_REDIS_URL"] = redis_url
        upgrade(database_url)
        print(f"  database  {database_url} (migrated)", flush=True)
        key = _demo_key(settings, database_url)

        started = _starting("upstream")
        child = stack.start("upstream", [*hub, "upstream", "--host", host, "--port", str(upstream_port)])
        _wait_until("the demo upstream", lambda: _http_ok(f"http://{host}:{upstream_port}/stats"), stack, child)
        _ready(started, f"http://{host}:{upstream_port}")
        started = _starting("api")
        child = stack.start("api", [*hub, "api", "--host", host, "--port", str(port)])
        _wait_until("the API", lambda: _http_ok(f"http://{host}:{port}/readyz"), stack, child)
        _ready(started, f"http://{host}:{port}")
        started = _starting("worker")
        child = stack.start("worker", [*hub, "worker", "-c", "2"])
        from worker.celery_app import create_app

        probe = create_app(settings.model_copy(update={"redis_url": redis_url}))
        _wait_until("the worker", lambda: bool(probe.control.ping(timeout=0.5)), stack, child)
        _ready(started, "2 slots")
        stack.start("beat", [*hub, "beat"])  # the sweeper: sends lost jobs again, deletes expired ones
        print("  beat      started (the sweeper)", flush=True)
        started = _starting("flower")
        child = stack.start("flower", [*hub, "flower", "--address", host, "--port", str(flower_port)])
        _wait_until("Flower", lambda: _http_ok(f"http://{host}:{flower_port}/healthcheck"), stack, child)
        _ready(started, f"http://{host}:{flower_port}")

        print(f"""
Integration Hub is running.
  API       http://{host}:{port}   (docs: http://{host}:{port}/docs)
  Flower    http://{host}:{flower_port}
  Upstream  http://{host}:{upstream_port}   (a demo web service for the walk-through)
  Logs      {data_dir / 'logs'}
Press Ctrl-C to stop.
API key: {key}""", flush=True)

        while True:
            gone = stack.exited()
            if gone is not None:
                print(f"{gone.name} exited with status {gone.process.returncode}; see {gone.log_path}. "
                      "Stopping.", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except errors.HubError as exc:
        print(flush=True)  # ends a progress line left open
        print(f"Could not start: {exc.message}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("Stopping...", flush=True)
        stack.stop()
        print("Stopped.", flush=True)
