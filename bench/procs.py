"""Child processes of the benchmark, and what /proc says about them.

Every child runs in its own session (so a Ctrl-C at the terminal reaches only the benchmark,
which then stops them in order) and gets a parent-death signal (so none outlives the benchmark
even if it is killed with SIGKILL). Stopping sends SIGTERM to the child's main process only (a
prefork Celery worker can hang when its whole group is signalled), then, after a grace period,
SIGKILL to whatever is left of its session. Every wait is bounded.

CPU time and memory are read from /proc for a child's whole session: the main process and
everything it forked (a prefork worker's pool processes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# Runs before the real command, in the child: ask the kernel for SIGTERM when the benchmark
# (the parent) dies, give up at once if it already has, then become the real command (the
# setting survives exec). It replaces preexec_fn, which is unsafe while other threads run.
_LAUNCHER = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "except (OSError, AttributeError):\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


class StartError(RuntimeError):
    """A child did not start or did not become ready."""


@dataclass
class Child:
    """A process the benchmark started."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path
    command: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def tail(self, size: int = 3000) -> str:
        """The end of the child's log."""
        try:
            return self.log.read_text(errors="replace")[-size:]
        except OSError:
            return ""


@dataclass
class Children:
    """The running children, stopped in reverse order of starting."""

    logs: Path
    started: list[Child] = field(default_factory=list)

    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path | None = None) -> Child:
        """Start ``command`` as a child named ``name``; its output goes to ``logs/name.log``."""
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        handle = open(log, "ab")
        try:
            process = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, str(os.getpid()), *command],
                env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            handle.close()
        child = Child(name, process, log, command)
        self.started.append(child)
        return child

    def stop(self, child: Child, grace: float = 15.0) -> None:
        """Stop ``child``: SIGTERM to its main process, then SIGKILL to its session."""
        stop(child.process, grace)
        if child in self.started:
            self.started.remove(child)

    def stop_all(self) -> None:
        """Stop every child still running, the last started first."""
        for child in reversed(list(self.started)):
            self.stop(child)


def stop(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM ``process``, wait up to ``grace`` seconds, then SIGKILL everything in its session."""
    if process.poll() is None:
        try:
            process.send_signal(signal.SIGTERM)
            process.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            pass
    for pid in session_pids(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        pass


def wait_until(ready: Callable[[], object], what: str, child: Child | None = None, timeout: float = 60.0) -> None:
    """Poll ``ready`` until it is true; :class:`StartError` after ``timeout`` or if ``child`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and child.process.poll() is not None:
            raise StartError(f"{what} exited with status {child.process.returncode}; its log ends:\n{child.tail()}")
        try:
            if ready():
                return
        except Exception:  # not up yet: refused, reset, half-started
            pass
        time.sleep(0.1)
    tail = f"; its log ends:\n{child.tail()}" if child is not None else ""
    raise StartError(f"{what} was not ready after {timeout:.0f} s{tail}")


# --- /proc ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stat:
    """The fields of /proc/PID/stat the benchmark reads."""

    pid: int
    comm: str
    session: int
    cpu_s: float
    """User and system time of the process itself."""
    children_cpu_s: float
    """User and system time of its children that it has waited for."""
    rss_bytes: int


def read_stat(pid: int | str) -> Stat | None:
    """/proc/PID/stat, or None if the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1: text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state) of proc(5)
    if fields[0] == "Z":
        return None
    return Stat(
        pid=int(pid),
        comm=comm,
        session=int(fields[3]),
        cpu_s=(int(fields[11]) + int(fields[12])) / CLOCK_TICKS,
        children_cpu_s=(int(fields[13]) + int(fields[14])) / CLOCK_TICKS,
        rss_bytes=int(fields[21]) * PAGE_SIZE,
    )


def all_stats() -> list[Stat]:
    """Every live process's stat."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(entry)
            if stat is not None:
                found.append(stat)
    return found


def session_pids(session: int) -> list[int]:
    """The live processes of a session (a child started with ``start_new_session``)."""
    return [s.pid for s in all_stats() if s.session == session]


def pss_bytes(pid: int) -> int | None:
    """The proportional set size of ``pid`` (shared pages divided among their users)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass
class Group:
    """Processes counted together: the sessions of some children, or processes by name."""

    name: str
    sessions: list[int] = field(default_factory=list)
    comm: str | None = None
    """Instead of sessions: every process whose name starts with this (e.g. ``postgres``)."""

    def members(self, stats: list[Stat]) -> list[Stat]:
        if self.comm is not None:
            return [s for s in stats if s.comm.startswith(self.comm)]
        return [s for s in stats if s.session in self.sessions]

    def cpu_s(self, stats: list[Stat]) -> float:
        """CPU seconds of the group so far: its live processes, and the children its session
        leaders have reaped."""
        if self.comm is not None:  # a server's exited processes are in its main process's children time
            return sum(s.cpu_s + s.children_cpu_s for s in self.members(stats))
        return sum(s.cpu_s + (s.children_cpu_s if s.pid in self.sessions else 0.0) for s in self.members(stats))

    def rss_bytes(self, stats: list[Stat]) -> int:
        return sum(s.rss_bytes for s in self.members(stats))

    def pss_bytes(self, stats: list[Stat]) -> int:
        return sum(pss_bytes(s.pid) or 0 for s in self.members(stats))


def self_cpu_s() -> float:
    """CPU seconds of this process (every thread)."""
    times = os.times()
    return times.user + times.system
