"""``--profile``: where the hub's time per job goes.

- py-spy (when it is installed) samples the API and every hub worker process (a prefork
  worker's pool processes too) during the measured hub levels, 100 times a second, counting
  only threads that are running, not waiting. The samples are summed by function (inclusive:
  the function or anything it calls; self: the function itself) and by package of the
  innermost frame.
- The API and the workers run under :mod:`bench.instrument`, which counts database statements
  (by verb and table), commits, pool checkouts and Redis round trips per process; the
  benchmark divides them by the jobs of each level. Redis's own ``INFO commandstats`` gives the
  commands per job in every run, with or without ``--profile``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOTS = {"worker": "run_job (worker/executor.py)", "api": "submit (api_shim/routes/executions.py)"}
"""The function a job's wall time is measured under, per role."""


class Profiler:
    """py-spy on the API and the hub workers of one pool, twice at once (both non-blocking):
    ``cpu`` samples only threads holding the GIL (where Python CPU goes), ``wall`` samples
    every thread, waiting or not (where a job's elapsed time goes)."""

    MODES = {"cpu": ["--gil"], "wall": ["--idle"]}

    def __init__(self, directory: Path, pool: str) -> None:
        self.directory = directory
        self.pool = pool
        self.running: list[tuple[str, str, subprocess.Popen[bytes], Path]] = []
        self.note = ""

    def start(self, api_pid: int, worker_pids: list[int]) -> None:
        # The venv's bin directory need not be on PATH (python -m bench run by the venv's python).
        binary = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
        if binary is None:
            self.note = "py-spy is not installed (pip install py-spy): no samples"
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        targets = [("api", api_pid)] + [(f"worker-{n}", pid) for n, pid in enumerate(worker_pids, 1)]
        for name, pid in targets:
            for mode, options in self.MODES.items():
                output = self.directory / f"{name}-{mode}.txt"
                command = [binary, "record", "--pid", str(pid), "--output", str(output), "--format", "raw",
                           "--function", "--rate", "100", "--subprocesses", "--nonblocking", *options]
                log = open(self.directory / f"{name}-{mode}.log", "wb")
                try:
                    process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
                finally:
                    log.close()
                self.running.append((name, mode, process, output))

    def stop(self) -> dict[str, Any]:
        """Stop sampling (py-spy writes its file on SIGINT) and summarize the samples."""
        for _name, _mode, process, _output in self.running:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        stacks: dict[tuple[str, str], Counter[str]] = {}
        for name, mode, process, output in self.running:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
            role = "api" if name == "api" else "worker"
            if output.exists():
                stacks.setdefault((role, mode), Counter()).update(read_raw(output))
        self.running = []
        summary: dict[str, Any] = {"note": self.note}
        for (role, mode), counted in stacks.items():
            summary[f"{role} {mode}"] = summarize(counted) if mode == "cpu" else under(counted, ROOTS[role])
        return summary


def read_raw(path: Path) -> Counter[str]:
    """py-spy's raw output: ``frame;frame;... count`` lines, without the ``process`` frames."""
    counted: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stack, _, number = line.rpartition(" ")
        if not stack or not number.isdigit():
            continue
        frames = [f for f in stack.split(";") if not f.startswith("process ") and not f.startswith("thread ")]
        counted[";".join(_function(f) for f in frames)] += int(number)
    return counted


def _function(frame: str) -> str:
    """``name (path/file.py:12)`` without the line number."""
    head, _, tail = frame.rpartition(":")
    return head + ")" if tail.rstrip(")").isdigit() and head else frame


def _package(frame: str) -> str:
    """The package (or stdlib module) a frame's file belongs to."""
    path = frame[frame.rfind("(") + 1:].rstrip(")")
    top = path.split("/", 1)[0]
    return top.removesuffix(".py") or "?"


SCAFFOLDING = ("click/", "<frozen runpy>", "threading.py", "celery/bin/", "celery/bootsteps.py", "celery/worker/worker.py",
               "billiard/process.py", "billiard/popen_fork.py", "billiard/context.py", "billiard/pool.py",
               "celery/concurrency/asynpool.py", "celery/concurrency/prefork.py", "celery/concurrency/base.py",
               "api_shim/cli.py", "bench/instrument.py", "uvicorn/main.py", "uvicorn/server.py", "uvicorn/_compat.py",
               "asyncio/runners.py", "asyncio/base_events.py", "concurrent/futures/thread.py", "anyio/_backends/")
"""Entry points and thread or process starts: in nearly every sample, so not worth a line."""


def _scaffolding(frame: str) -> bool:
    path = frame[frame.rfind("(") + 1:]
    return path.startswith(SCAFFOLDING) or frame.startswith("<module> ")


def summarize(counted: Counter[str], top: int = 30) -> dict[str, Any]:
    """Inclusive and self shares by function, self shares by package."""
    total = sum(counted.values())
    inclusive: Counter[str] = Counter()
    self_time: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for stack, n in counted.items():
        frames = stack.split(";") if stack else []
        if not frames:
            continue
        for frame in set(frames):
            if not _scaffolding(frame):
                inclusive[frame] += n
        self_time[frames[-1]] += n
        packages[_package(frames[-1])] += n

    def share(items: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in items.most_common(top)] if total else []

    return {"samples": total, "inclusive": share(inclusive), "self": share(self_time), "packages": share(packages)}


def under(counted: Counter[str], root: str, top: int = 30) -> dict[str, Any]:
    """Inclusive shares of the functions called under ``root``, of the samples inside ``root``."""
    inside: Counter[str] = Counter()
    total = 0
    for stack, n in counted.items():
        frames = stack.split(";")
        if root not in frames:
            continue
        total += n
        for frame in set(frames[frames.index(root):]):
            inside[frame] += n
    shares = [(name, round(100 * n / total, 1)) for name, n in inside.most_common(top)] if total else []
    return {"root": root, "samples": total, "inclusive": shares}


def markdown(results: dict[str, Any]) -> str:
    """PROFILE.md: counts per job and the sampled profiles of every pool."""
    meta = results["meta"]
    lines = [
        "# Where the hub's time per job goes",
        "",
        f"From `{meta['command']}` on {meta['started_at']} ({meta['machine']['cpu']}, {meta['machine']['cores']} cores; "
        f"database: {meta['database']}). How it is measured: `bench/profile.py`. The API and the workers ran under "
        "`bench.instrument` (statement and round-trip counters) and py-spy, so their throughput here is a little "
        "lower than in RESULTS.md.",
        "",
    ]
    for pool, data in results["pools"].items():
        lines += [f"## Pool {pool}", ""]
        for level in data["levels"]:
            hub = level["hub"]
            lines += [f"### {level['in_flight']} jobs in flight: {hub['per_s']} jobs/s, p50 {hub['p50_ms']} ms", ""]
            counts = hub.get("counts_per_job", {})
            if counts:
                lines += ["Per job, counted in the processes (API: every request of the client, the POST and its "
                          "polls; worker: the task):", "", "| what | API | worker |", "| --- | ---: | ---: |"]
                keys = sorted(set(counts.get("api", {})) | set(counts.get("worker", {})),
                              key=lambda k: (not k.startswith(("sql", "commit", "pool", "redis")), k))
                for key in keys:
                    lines.append(f"| {key} | {counts.get('api', {}).get(key, 0)} | "
                                 f"{counts.get('worker', {}).get(key, 0)} |")
                lines.append("")
            calls = hub.get("redis_calls_per_job", {})
            if calls:
                lines += ["Redis commands per job (server side, `INFO commandstats`, every client): "
                          + ", ".join(f"{k} {v}" for k, v in calls.items()), ""]
            cpu = hub.get("cpu_ms_per_job", {})
            lines += ["CPU ms per job: " + ", ".join(f"{k} {v}" for k, v in cpu.items() if v >= 0.05), ""]
        sampled = data.get("profile", {})
        if sampled.get("note"):
            lines += [sampled["note"], ""]
        for role in ("worker", "api"):
            cpu = sampled.get(f"{role} cpu")
            if cpu:
                lines += [f"### py-spy, {role}: Python CPU ({cpu['samples']} samples holding the GIL)", "",
                          "Self time by package of the innermost frame: "
                          + ", ".join(f"{name} {pct}%" for name, pct in cpu["packages"][:15]), "",
                          "| inclusive % | function | | self % | function |", "| ---: | --- | --- | ---: | --- |"]
                for (inc_name, inc), (self_name, own) in zip(cpu["inclusive"], cpu["self"], strict=False):
                    lines.append(f"| {inc} | `{inc_name}` | | {own} | `{self_name}` |")
                lines.append("")
            wall = sampled.get(f"{role} wall")
            if wall and wall["samples"]:
                lines += [f"### py-spy, {role}: elapsed time inside `{wall['root']}` ({wall['samples']} samples of "
                          "threads in it, waiting or not)", "", "| % of the time in it | function |",
                          "| ---: | --- |"]
                lines += [f"| {pct} | `{name}` |" for name, pct in wall["inclusive"]]
                lines.append("")
    return "\n".join(lines) + "\n"
