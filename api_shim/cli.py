"""The ``integration-hub`` command.

::

    integration-hub dev [--port 8000] [--flower-port 5555] [--upstream-port 8089]
    integration-hub migrate
    integration-hub tenants create NAME [--rate R] [--burst B] [--max-inflight N]
    integration-hub api [--host H] [--port P]
    integration-hub tenants set NAME [--rate R] [--burst B] [--max-inflight N]
    integration-hub worker [-c N] [--pool P]
    integration-hub beat
    integration-hub flower [--address A] [--port P]
    integration-hub upstream [--host H] [--port P]
    integration-hub keys generate | rotate
    integration-hub openapi

A worker on a gevent or eventlet pool must monkey-patch the standard library before anything
imports ``socket``, ``ssl`` or ``threading``, as Celery's own ``celery`` command does: so this
module imports only ``argparse``, ``os``, ``sys`` and ``typing`` itself, and the hub's modules
(whose imports reach those) inside :func:`main`, after :func:`_patch_for_pool`.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from models.settings import Settings

COOPERATIVE_POOLS = ("gevent", "eventlet")
"""Worker pools that run each job in a greenlet: they need the standard library patched first."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="integration-hub", description="Integration Hub.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = commands.add_parser("dev", help="run the whole stack on embedded defaults")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.add_argument("--flower-port", type=int, default=5555)
    dev.add_argument("--upstream-port", type=int, default=8089)

    commands.add_parser("migrate", help="apply the database migrations")

    tenants = commands.add_parser("tenants", help="manage tenants")
    tenant_commands = tenants.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")
    create = tenant_commands.add_parser("create", help="create a tenant and print its API key")
    create.add_argument("name")
    create.add_argument("--rate", type=float, help="outbound requests per second")
    create.add_argument("--burst", type=int, help="requests allowed at once above the rate")
    create.add_argument("--max-inflight", type=int, help="jobs queued or running at once")
    change = tenant_commands.add_parser("set", help="change a tenant's rate, burst or in-flight quota")
    change.add_argument("name")
    change.add_argument("--rate", type=float, help="outbound requests per second (0: the default)")
    change.add_argument("--burst", type=int, help="requests allowed at once above the rate (-1: the default)")
    change.add_argument("--max-inflight", type=int, help="jobs queued or running at once (0: the default)")

    api = commands.add_parser("api", help="serve the API")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)

    worker = commands.add_parser("worker", help="run a Celery worker (celery -A worker worker)")
    worker.add_argument("-c", "--concurrency", type=int)
    worker.add_argument("--pool", default="prefork")
    worker.add_argument("--loglevel", default="INFO")
    worker.add_argument("-n", "--hostname", help="the worker's node name (default celery@HOST)")

    commands.add_parser("beat", help="run Celery beat: the sweeper that sends lost jobs again and deletes old ones")

    flower = commands.add_parser("flower", help="run Flower against the broker")
    flower.add_argument("--address", default="127.0.0.1")
    flower.add_argument("--port", type=int, default=5555)

    keys = commands.add_parser("keys", help="manage the vault's master keys")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    key_commands.add_parser("generate", help="print a new master key (the last line, alone)")
    rotate = key_commands.add_parser("rotate", help="re-encrypt every secret under the first key")
    rotate.add_argument("--batch-size", type=int, default=200)

    commands.add_parser("openapi", help="print the OpenAPI document (docs/openapi.json)")

    upstream = commands.add_parser("upstream", help="serve the demo web service")
    upstream.add_argument("--host", default="127.0.0.1")
    upstream.add_argument("--port", type=int, default=8089)
    return parser


def _patch_for_pool(pool: str) -> bool:
    """For a gevent or eventlet pool, monkey-patch the standard library now, as ``celery``'s
    entry point does (``celery.__main__``); False, after a one-line error, when that library
    is not installed. Other pools need nothing."""
    if pool not in COOPERATIVE_POOLS:
        return True
    from celery import maybe_patch_concurrency  # imports neither socket nor threading

    try:
        maybe_patch_concurrency(["--pool", pool])
    except ImportError as exc:
        print(f"error: --pool {pool} needs {pool}, which could not be imported ({exc}): pip install {pool}",
              file=sys.stderr)
        return False
    return True


def _celery(arguments: list[str]) -> int:
    """Run the ``celery`` command on the hub's app, in this process."""
    from celery.bin.celery import main as celery_main

    sys.argv = ["celery", "-A", "worker", *arguments]
    try:
        celery_main()
    except SystemExit as exit_:
        return int(exit_.code or 0)
    return 0


def _keys(args: argparse.Namespace, settings: Settings) -> int:
    from models.vault import Vault, generate_key

    if args.keys_command == "generate":
        print("A new master key. Put it first in HUB_MASTER_KEYS (keep the old ones after it),")
        print("then run `integration-hub keys rotate`:")
        print(generate_key())
        return 0
    from models.db import get_engine
    from models.secrets import rotate

    vault = Vault.from_setting(settings.master_keys_value())
    report = rotate(get_engine(), vault, batch_size=args.batch_size)
    print(f"Re-encrypted {report.resealed} secret(s) under key {vault.current_key_id}.")
    if report.unreadable:
        print(f"{report.unreadable} secret(s) were sealed with a key that HUB_MASTER_KEYS lacks; "
              "they were left as they are.", file=sys.stderr)
        return 1
    return 0


def _set_tenant(args: argparse.Namespace) -> int:
    from models.db import session_scope
    from models.tenants import set_limits

    with session_scope() as session:
        tenant = set_limits(session, name=args.name, rate_per_s=args.rate, burst=args.burst,
                            max_inflight=args.max_inflight)
        shown = {"rate": tenant.rate_per_s, "burst": tenant.burst, "max-inflight": tenant.max_inflight}
    print(f"Tenant {args.name}: " + ", ".join(f"{k} {'default' if v is None else v}" for k, v in shown.items()))
    print("Workers apply a new rate within 10 seconds.")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the command named by ``argv`` (default: the process's arguments)."""
    args = _parser().parse_args(argv)
    if args.command == "worker" and not _patch_for_pool(args.pool):
        return 2
    from models import errors
    from models.settings import get_settings
    from models.vault import Vault

    settings = get_settings()
    try:
        if args.command == "dev":
            from api_shim import devstack

            return devstack.run(
                settings, host=args.host, port=args.port,
                flower_port=args.flower_port, upstream_port=args.upstream_port,
            )
        if args.command == "migrate":
            from models.migrate import upgrade

            upgrade()
            print("Database is up to date.")
            return 0
        if args.command == "tenants" and args.tenants_command == "set":
            return _set_tenant(args)
        if args.command == "tenants":
            from models.db import session_scope
            from models.tenants import create_tenant, issue_key

            with session_scope() as session:
                tenant = create_tenant(
                    session, name=args.name, rate_per_s=args.rate,
                    burst=args.burst, max_inflight=args.max_inflight,
                )
                key = issue_key(session, tenant_id=tenant.id)
            print(f"Created tenant {tenant.name} ({tenant.id}). Its API key, shown only now:")
            print(key)
            return 0
        if args.command == "keys":
            return _keys(args, settings)
        if args.command == "api":
            import uvicorn

            Vault.from_setting(settings.master_keys_value())  # refuse to start without a key
            from models.logs import dict_config

            uvicorn.run("api_shim.app:create_app", factory=True, host=args.host, port=args.port,
                        log_level=settings.log_level.lower(),
                        log_config=dict_config(settings.log_format, settings.log_level))
            return 0
        if args.command == "worker":  # without a master key it refuses to start (worker.celery_app)
            extra = ["-c", str(args.concurrency)] if args.concurrency else []
            extra += ["-n", args.hostname] if args.hostname else []
            return _celery(["worker", f"--loglevel={args.loglevel}", f"--pool={args.pool}", *extra])
        if args.command == "beat":
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            return _celery(["beat", f"--loglevel={settings.log_level}"])
        if args.command == "flower":
            if settings.flower_basic_auth is not None:
                os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth.get_secret_value()
            return _celery(["flower", f"--address={args.address}", f"--port={args.port}"])
        if args.command == "openapi":
            import json

            from api_shim.app import openapi_document

            print(json.dumps(openapi_document(), indent=2, sort_keys=True))
            return 0
        if args.command == "upstream":
            from api_shim.demo_upstream import serve

            print(f"Demo upstream on http://{args.host}:{args.port}", flush=True)
            try:
                serve(args.host, args.port)
            except KeyboardInterrupt:
                pass
            return 0
    except errors.HubError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
