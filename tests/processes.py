"""Starting and stopping the hub's real processes for end-to-end tests.

Each process runs in its own session; stopping sends SIGTERM to its main process only (a
prefork Celery worker can hang when its whole group is signalled), then SIGKILL to whatever
is left of the group after a grace period. Every wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

HUB = [sys.executable, "-m", "api_shim.cli"]


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` in its own session, output to ``log``."""
    handle = open(log, "ab")
    try:
        return subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        handle.close()


def stop(process: subprocess.Popen[bytes], grace: float = 20.0) -> int | None:
    """Stop ``process``: SIGTERM, wait up to ``grace`` seconds, then SIGKILL its group."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    return process.wait(10)


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 60.0,
               process: subprocess.Popen[bytes] | None = None, log: Path | None = None) -> None:
    """Poll ``ready`` until it is true; fail after ``timeout`` or if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise AssertionError(f"{what} exited with {process.returncode}:\n{tail}")
        try:
            if ready():
                return
        except Exception:  # not up yet: refused, reset, half-started
            pass
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log else ""
    raise AssertionError(f"{what} not ready after {timeout}s\n{tail}")


def http_ok(url: str) -> bool:
    """Whether GET ``url`` answers 200."""
    return httpx.get(url, timeout=2).status_code == 200


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of live processes whose environment has ``name=value`` (Linux ``/proc``)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if state != "Z" and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found
