"""``python -m bench``: the hub end to end against a bare Celery app, in one run.

See bench/README.md for what is measured and how to read it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import load, procs, profile, report
from bench.stack import ROOT, Stack, WorkerSet

BENCH = ROOT / "bench"
WORK = BENCH / ".work"
POOLS = ("prefork", "threads", "gevent")


def _levels(text: str) -> list[int]:
    levels = sorted({int(part) for part in text.split(",") if part.strip()})
    if not levels or levels[0] < 1:
        raise argparse.ArgumentTypeError("give in-flight counts ≥ 1, comma-separated, e.g. 8,32")
    return levels


def _pools(text: str) -> list[str]:
    pools = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [p for p in pools if p not in POOLS]
    if not pools or unknown:
        raise argparse.ArgumentTypeError(f"pools are {', '.join(POOLS)}, comma-separated")
    return pools


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=(
        "Benchmark the Integration Hub end to end against a bare Celery app doing the same HTTP call. "
        "See bench/README.md."))
    p.add_argument("--quick", action="store_true",
                   help="small counts: a smoke test of about two minutes (results go to bench/.work/ unless --out)")
    p.add_argument("--pool", type=_pools, default=None,
                   help="worker pool(s), comma-separated, measured one after the other in this run "
                        "(default prefork,threads; gevent only if installed)")
    p.add_argument("--concurrency", type=_levels, default=None,
                   help="jobs in flight (client threads), comma-separated (default 8,32; quick 4,16)")
    p.add_argument("--jobs", type=int, default=None, help="measured jobs per level and system (default 2000; quick 150)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                   help="worker processes that run tasks (default: one per core). prefork: one worker with "
                        "-c WORKERS; threads/gevent: WORKERS workers with -c PER_PROCESS each")
    p.add_argument("--per-process", type=int, default=32,
                   help="-c of each threads/gevent worker process (default 32)")
    p.add_argument("--token-jobs", type=int, default=None, help="jobs for the token count (default 1000; quick 200)")
    p.add_argument("--memory-jobs", type=int, default=None,
                   help="jobs with a 10 MB body for the memory measure (default 1000; quick 100)")
    p.add_argument("--database-url", default=None,
                   help="a PostgreSQL server (postgresql://user@host:port/db): the hub gets a fresh database "
                        "there, dropped at the end; default a fresh SQLite file")
    p.add_argument("--baseline-delivery", choices=("celery", "hub"), default="celery",
                   help="the baseline's Celery delivery settings: Celery's defaults, or the hub's "
                        "(late acks, prefetch 1, task events)")
    p.add_argument("--profile", action="store_true",
                   help="also count database statements and Redis round trips per job in the hub's API and "
                        "workers, and sample them with py-spy (if installed); writes PROFILE.md beside --out")
    p.add_argument("--out", type=Path, default=None,
                   help="the results file (default bench/RESULTS.md; with --quick or --profile "
                        "bench/.work/RESULTS.md); the chart and raw figures go beside it")
    return p


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    pools = args.pool or ["prefork", "threads", *(["gevent"] if importlib.util.find_spec("gevent") else [])]
    levels = args.concurrency or ([4, 16] if quick else [8, 32])
    return {
        "quick": quick,
        "pools": pools,
        "levels": levels,
        "jobs": args.jobs or (150 if quick else 2000),
        "warmup": 40 if quick else 200,
        "workers": args.workers,
        "per_process": args.per_process,
        "token_jobs": args.token_jobs or (200 if quick else 1000),
        "memory_jobs": args.memory_jobs or (100 if quick else 1000),
        "database_url": args.database_url,
        "baseline_delivery": args.baseline_delivery,
        "profile": args.profile,
    }


def _timeout(jobs: int) -> float:
    return max(90.0, jobs / 4.0)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 2)


class Bench:
    """One run: the stack, the measures per pool, the results."""

    def __init__(self, settings: dict[str, Any], stack: Stack) -> None:
        self.s = settings
        self.stack = stack
        self.pools: dict[str, Any] = {}
        self.problems: list[str] = []
        self.profiler: profile.Profiler | None = None

    # --- one phase ---------------------------------------------------------------------------

    def phase(self, name: str, job: Callable[[int], load.Outcome], jobs: int, in_flight: int,
              meter: load.Meter, *, count: bool = False) -> dict[str, Any]:
        """Run a closed loop and what it cost: latencies, CPU per group, Redis commands."""
        counts_before = self._counts() if count else None
        before = meter.read()
        run = load.closed_loop(job, jobs=jobs, in_flight=in_flight, timeout_s=_timeout(jobs))
        after = meter.read()
        cpu, calls = load.Meter.delta(before, after)
        done = max(run.done, 1)
        latencies, submits = run.latencies(), run.submits()
        result: dict[str, Any] = {
            "jobs": jobs, "in_flight": in_flight, "done": run.done, "failures": run.failures,
            "errors": run.errors(), "wall_s": round(run.wall_s, 3), "per_s": round(run.per_s, 1),
            "p50_ms": _ms(load.percentile(latencies, 50)), "p99_ms": _ms(load.percentile(latencies, 99)),
            "submit_p50_ms": _ms(load.percentile(submits, 50)), "submit_p99_ms": _ms(load.percentile(submits, 99)),
            "stages_p50_ms": {k: _ms(load.percentile(v, 50)) for k, v in run.stages().items()},
            "stages_p99_ms": {k: _ms(load.percentile(v, 99)) for k, v in run.stages().items()},
            "cpu_ms_per_job": {k: round(v * 1000 / done, 2) for k, v in cpu.items()},
            "cpu_s": {k: round(v, 3) for k, v in cpu.items()},
            "redis_calls_per_job": {k: round(v / done, 2) for k, v in calls.most_common()},
        }
        if counts_before is not None:
            time.sleep(1.2)  # every instrumented process has written its counts since
            after_counts = self._counts()
            result["counts_per_job"] = {
                role: {k: round(v / done, 2) for k, v in (after_counts.get(role, Counter())
                                                          - counts_before.get(role, Counter())).most_common()}
                for role in after_counts
            }
        if run.failures:
            self.problems.append(f"{name}: {run.failures} of {jobs} jobs failed: {'; '.join(run.errors())}")
        status = f"{run.per_s:7.1f} jobs/s  p50 {result['p50_ms']} ms  p99 {result['p99_ms']} ms"
        if run.failures:
            status += f"  FAILURES {run.failures}"
        print(f"    {name:<34} {status}", flush=True)
        return result

    def _counts(self) -> dict[str, Counter[str]]:
        from bench.instrument import read_counts

        return read_counts(self.stack.work / "counts")

    # --- one pool ----------------------------------------------------------------------------

    def run_pool(self, pool: str) -> None:
        s, stack = self.s, self.stack
        print(f"\n== pool {pool}: {s['workers']} worker process(es)"
              + ("" if pool == "prefork" else f", -c {s['per_process']} each"), flush=True)
        hub_workers = stack.start_workers("hub", pool, s["workers"], s["per_process"])
        baseline_workers: WorkerSet | None = None
        try:
            baseline_workers = stack.start_workers("baseline", pool, s["workers"], s["per_process"],
                                                   s["baseline_delivery"])
            self._measure_pool(pool, hub_workers, baseline_workers)
        finally:
            if self.profiler is not None:
                self.profiler.stop()
            if baseline_workers is not None:
                stack.stop_workers(baseline_workers)
            stack.stop_workers(hub_workers)

    def _measure_pool(self, pool: str, hub_workers: WorkerSet, baseline_workers: WorkerSet) -> None:
        s, stack = self.s, self.stack
        groups = [*stack.groups.values(), hub_workers.group, baseline_workers.group]
        meter = load.Meter(groups, stack.redis_url)
        top = max(s["levels"])
        http = load.hub_http(stack.api, stack.key, max(top, 8))
        hub = load.HubClient(http, "bench", "items")
        baseline = load.BaselineClient(stack.redis_url, f"{stack.upstream}/echo/baseline")
        result: dict[str, Any] = {
            "hub_workers": hub_workers.command_line(),
            "baseline_workers": baseline_workers.command_line(),
            "worker_processes": s["workers"],
            "per_process": hub_workers.concurrency if pool != "prefork" else 1,
            "levels": [],
        }
        self.pools[pool] = result
        try:
            print(f"  warm-up: {s['warmup']} jobs each", flush=True)
            self.phase("baseline warm-up", baseline.job, s["warmup"], top, meter)
            self.phase("hub warm-up", hub.job, s["warmup"], top, meter)
            if s["profile"]:
                self.profiler = profile.Profiler(stack.work / f"py-spy-{pool}", pool)
                self.profiler.start(stack.groups["api"].sessions[0], [c.pid for c in hub_workers.children])
            for level in s["levels"]:
                print(f"  {level} in flight, {s['jobs']} jobs each", flush=True)
                result["levels"].append({
                    "in_flight": level,
                    "baseline": self.phase(f"baseline {level}", baseline.job, s["jobs"], level, meter),
                    "hub": self.phase(f"hub {level}", hub.job, s["jobs"], level, meter, count=s["profile"]),
                })
            if self.profiler is not None:
                result["profile"] = self.profiler.stop()
                self.profiler = None
            result["tokens"] = self.tokens(pool, meter, top)
            result["memory"] = self.memory(pool, hub_workers, meter, top)
        finally:
            baseline.close()
            http.close()
            meter.close()

    # --- token requests and submissions ------------------------------------------------------

    def tokens(self, pool: str, meter: load.Meter, in_flight: int) -> dict[str, Any]:
        """A burst of submissions on a new connection (a cold token cache), then every result."""
        s, stack = self.s, self.stack
        jobs = s["token_jobs"]
        name = f"tokens-{pool}"
        stack.create_connection(name)
        http = load.hub_http(stack.api, stack.key, in_flight)
        client = load.HubClient(http, name, "items")
        ids: list[str] = []
        print(f"  token cache: {jobs} jobs submitted at once on a new connection", flush=True)
        before = stack.token_stats()

        def submit(_index: int) -> load.Outcome:
            job_id, took, error = client.submit()
            if job_id is not None:
                ids.append(job_id)
            return load.Outcome(job_id is not None, took, took, error)

        def finish(index: int) -> load.Outcome:
            started = time.perf_counter()
            _job, error = client.wait(ids[index])
            return load.Outcome(error is None, time.perf_counter() - started, None, error)

        try:
            submitted = self.phase("submissions only", submit, jobs, in_flight, meter)
            finished = self.phase("their results", finish, len(ids), in_flight, meter)
        finally:
            http.close()
        after = stack.token_stats()
        token_requests = after["token_requests"] - before["token_requests"]
        protected = after["protected_calls"] - before["protected_calls"]
        if token_requests != 1:
            self.problems.append(f"{pool}: {jobs} jobs on one connection made {token_requests} token requests, not 1")
        print(f"    token requests for {jobs} jobs: {token_requests}; protected calls {protected}", flush=True)
        return {"jobs": jobs, "connection": name, "token_requests": token_requests, "protected_calls": protected,
                "unauthorized": after["protected_unauthorized"] - before["protected_unauthorized"],
                "succeeded": finished["done"] - finished["failures"], "submissions": submitted}

    # --- memory ------------------------------------------------------------------------------

    def memory(self, pool: str, workers: WorkerSet, meter: load.Meter, in_flight: int) -> dict[str, Any]:
        """The hub workers' memory while jobs each receive a 10 MB body (the hub keeps 32 KB)."""
        jobs = self.s["memory_jobs"]
        http = load.hub_http(self.stack.api, self.stack.key, in_flight)

        def capped(job: dict[str, Any]) -> str | None:
            result = job["result"]
            if not result["truncated"] or result["size"] != 32768:
                return f"body not cut at 32 KB: size {result['size']}, truncated {result['truncated']}"
            return None

        client = load.HubClient(http, "bench", "big", check=capped)
        sampler = load.MemorySampler(workers.group)
        print(f"  memory: {jobs} jobs with a 10 MB body each, {in_flight} in flight", flush=True)
        try:
            before = _steady(sampler)
            sampler.samples.clear()
            sampler.start()
            run = self.phase("10 MB bodies", client.job, jobs, in_flight, meter)
            sampler.stop()
            during = list(sampler.samples)
            time.sleep(2.0)
            after = _steady(sampler)
        finally:
            sampler.stop()
            http.close()
        peak_rss = max((rss for _t, rss, _p in during), default=0)
        peak_pss = max((pss for _t, _r, pss in during), default=0)
        members = workers.group.members(procs.all_stats())
        mib = 1024 * 1024
        result = {
            "jobs": jobs, "in_flight": in_flight, "processes": len(members),
            "rss_before_mib": round(before[0] / mib, 1), "rss_peak_mib": round(peak_rss / mib, 1),
            "rss_after_mib": round(after[0] / mib, 1),
            "pss_before_mib": round(before[1] / mib, 1), "pss_peak_mib": round(peak_pss / mib, 1),
            "pss_after_mib": round(after[1] / mib, 1),
            "largest_process_peak_mib": round(max(sampler.peak_per_process.values(), default=0) / mib, 1),
            "samples": len(during), "run": run,
            "series": [(round(t - during[0][0], 2), round(rss / mib, 1)) for t, rss, _p in during[::4]] if during else [],
        }
        print(f"    worker RSS before {result['rss_before_mib']} MiB, peak {result['rss_peak_mib']} MiB, "
              f"after {result['rss_after_mib']} MiB ({len(members)} processes)", flush=True)
        return result


def _steady(sampler: load.MemorySampler, seconds: float = 1.0) -> tuple[int, int]:
    """The median of readings over ``seconds``."""
    readings = []
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        readings.append(sampler.sample())
        time.sleep(0.1)
    readings.sort()
    return readings[len(readings) // 2]


# --- the run ---------------------------------------------------------------------------------


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git() -> str:
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}  # read only: git status must not touch the index
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, env=env).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10, env=env).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    changed = [line[3:] for line in dirty if line.strip()]
    if not commit:
        return "unknown"
    return f"{commit} (changed since: {', '.join(changed)})" if changed else commit


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return {"cpu": cpu, "cores": str(os.cpu_count()), "memory": memory,
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version()}


def versions() -> dict[str, str]:
    names = ("integration-hub", "celery", "kombu", "redis", "hiredis", "httpx", "httpcore", "sqlalchemy",
             "psycopg", "fastapi", "uvicorn", "matplotlib", "py-spy", "gevent")
    return {name: _version(name) for name in names}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    s = settings_from(args)
    if "gevent" in s["pools"]:
        try:
            import gevent  # noqa: F401
        except ImportError:
            print("gevent is not installed: drop it from --pool (or pip install gevent)", file=sys.stderr)
            return 2
    out: Path = args.out or (WORK / "RESULTS.md" if (args.quick or args.profile) else BENCH / "RESULTS.md")
    out = out.resolve()
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)

    def on_signal(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    started_at = dt.datetime.now(dt.timezone.utc)
    source = _git()  # at the start: the processes load the code as it is now
    started = time.monotonic()
    stack = Stack(WORK, procs.Children(WORK / "logs"), profile=s["profile"])
    bench = Bench(s, stack)
    status = 0
    print(f"Benchmark: logs in {WORK / 'logs'}", flush=True)
    try:
        stack.start_redis()
        stack.start_upstream()
        stack.start_hub(s["database_url"])
        stack.create_connection("bench")
        print(f"  redis {stack.redis_url} ({stack.redis_origin})\n  database {stack.database_label}\n"
              f"  api {stack.api}  upstream {stack.upstream}", flush=True)
        for pool in s["pools"]:
            bench.run_pool(pool)
    except KeyboardInterrupt:
        print("\nInterrupted.", file=sys.stderr, flush=True)
        status = 130
    except procs.StartError as exc:
        print(f"\nCould not run the benchmark: {exc}", file=sys.stderr, flush=True)
        status = 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("Stopping every process the benchmark started...", flush=True)
        try:
            redis_version = stack.redis_version() if stack.redis_url else "n/a"
        except Exception:
            redis_version = "unknown"
        stack.stop()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if status != 0:
        return status
    duration = time.monotonic() - started
    meta = {
        "started_at": started_at.strftime("%Y-%m-%d %H:%M UTC"), "duration_s": round(duration, 1),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "versions": {**versions(), "redis server": redis_version,
                                           "hub source": source},
        "settings": {k: v for k, v in s.items() if k != "database_url"},
        "database": stack.database_label, "redis": stack.redis_origin,
    }
    results = {"meta": meta, "pools": bench.pools, "problems": bench.problems}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    chart = report.chart_path(out)
    report.write_chart(results, chart)
    out.write_text(report.markdown(results, chart.name))
    if s["profile"]:
        (out.parent / "PROFILE.md").write_text(profile.markdown(results))
    print(f"\nDone in {duration / 60:.1f} min. Results: {out}, chart: {chart}", flush=True)
    if bench.problems:
        print("Problems:\n  " + "\n  ".join(bench.problems), file=sys.stderr)
        return 1
    return 0
