"""RESULTS.md and the chart (matplotlib, Agg backend) from a run's figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def chart_path(out: Path) -> Path:
    """``results.png`` beside ``RESULTS.md``; ``NAME.png`` beside any other ``NAME.md``."""
    return out.with_name("results.png") if out.name == "RESULTS.md" else out.with_suffix(".png")


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _ratio(hub: float, baseline: float) -> str:
    return f"{hub / baseline:.2f}" if baseline else "–"


def markdown(results: dict[str, Any], chart: str) -> str:
    meta = results["meta"]
    s = meta["settings"]
    m = meta["machine"]
    v = meta["versions"]
    pools = results["pools"]
    out = [
        "# Integration Hub benchmark (issue 7)",
        "",
        f"Measured on {meta['started_at']} by `{meta['command']}` in {meta['duration_s'] / 60:.1f} minutes. "
        "Everything below comes from this one run on one machine: compare figures within it, not with another "
        "run (this machine's speed drifts by 20–40 % within an hour). How to run it and what each figure means: "
        "[README.md](README.md).",
        "",
        f"![throughput and latency against jobs in flight]({chart})",
        "",
        *_summary(pools),
        "## Machine, versions, settings",
        "",
        "| | |",
        "| --- | --- |",
        f"| machine | {m['cpu']}, {m['cores']} cores, {m['memory']}, {m['system']} |",
        f"| Python | {m['python']} |",
        f"| hub | integration-hub {v['integration-hub']}, source {v['hub source']} |",
        f"| libraries | celery {v['celery']}, kombu {v['kombu']}, redis-py {v['redis']} (hiredis {v['hiredis']}), "
        f"httpx {v['httpx']} (httpcore {v['httpcore']}), SQLAlchemy {v['sqlalchemy']}, psycopg {v['psycopg']}, "
        f"FastAPI {v['fastapi']}, uvicorn {v['uvicorn']} |",
        f"| Redis | {v['redis server']}, {meta['redis']} |",
        f"| hub database | {meta['database']} |",
        f"| pools | {', '.join(s['pools'])}: {s['workers']} worker process(es) run tasks; prefork: one worker with "
        f"`-c {s['workers']}`; threads/gevent: {s['workers']} workers with `-c {s['per_process']}` each |",
        f"| load | closed loop: K client threads each submit a job and wait for its result, K = "
        f"{', '.join(map(str, s['levels']))}; {s['jobs']} measured jobs per level and system after "
        f"{s['warmup']} warm-up jobs per system and pool |",
        "| hub job | `POST /v1/executions` of a stored `GET /oauth/protected/items` on an OAuth 2.0 connection "
        "(client credentials, token cached in Redis; a secret in the `X-Bench-Key` header), then "
        "`GET /v1/executions/{id}?wait=30` until it is final |",
        f"| baseline job | Celery task `bench.fetch` (httpx GET of `/echo/baseline`, returns the body), "
        f"{'Celery default' if s['baseline_delivery'] == 'celery' else 'the hub'}'s delivery settings; "
        "completion through the Redis result backend (one client `PSUBSCRIBE celery-task-meta-*`) |",
        "",
        "## Throughput and submit-to-result latency",
        "",
        "| pool | in flight | baseline jobs/s | hub jobs/s | **hub/baseline** | baseline p50 ms | baseline p99 ms "
        "| hub p50 ms | hub p99 ms | hub POST p50 ms | hub POST p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for pool, data in pools.items():
        for level in data["levels"]:
            b, h = level["baseline"], level["hub"]
            out.append(
                f"| {pool} | {level['in_flight']} | {_fmt(b['per_s'])} | {_fmt(h['per_s'])} | "
                f"**{_ratio(h['per_s'], b['per_s'])}** | {_fmt(b['p50_ms'])} | {_fmt(b['p99_ms'])} | "
                f"{_fmt(h['p50_ms'])} | {_fmt(h['p99_ms'])} | {_fmt(h['submit_p50_ms'])} | {_fmt(h['submit_p99_ms'])} |")
    faster = _faster_pool(pools)
    if faster:
        out += ["", faster]
    out += [
        "",
        "### Where a hub job's latency goes",
        "",
        "From each job's own timestamps (`created_at`, `started_at`, `finished_at`, milliseconds, the same "
        "machine's clock) and the client's clock: **api** from the client's POST to `created_at` (the row is made "
        "early in the POST, before the tenant lock and the commit); **queue** from `created_at` to `started_at` "
        "(the rest of the POST, the broker, a worker picking it up and reading it); **run** to `finished_at` "
        "(rate limiter, claim, token, the call, up to the final UPDATE); **delivery** from `finished_at` to the "
        "result in the client's hands (the final commit, then the API's `?wait` loop, which looks at the "
        "database every 100 ms). p50 / p99 in ms.",
        "",
        "| pool | in flight | api | queue | run | delivery | end to end |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for pool, data in pools.items():
        for level in data["levels"]:
            h = level["hub"]
            p50, p99 = h.get("stages_p50_ms", {}), h.get("stages_p99_ms", {})
            cells = [f"{_fmt(p50.get(k))} / {_fmt(p99.get(k))}" for k in ("api", "queue", "run", "delivery")]
            out.append(f"| {pool} | {level['in_flight']} | " + " | ".join(cells)
                       + f" | {_fmt(h['p50_ms'])} / {_fmt(h['p99_ms'])} |")
    out += [
        "",
        "## Submission latency alone",
        "",
        "`POST /v1/executions` timed by the client while K threads submit as fast as they can, the workers "
        "running the jobs meanwhile (the token measure's burst, below); the POST times under the closed loop "
        "are in the table above.",
        "",
        "| pool | jobs | threads | submissions/s | POST p50 ms | POST p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for pool, data in pools.items():
        if "tokens" not in data:
            continue
        sub = data["tokens"]["submissions"]
        out.append(f"| {pool} | {sub['jobs']} | {sub['in_flight']} | {_fmt(sub['per_s'])} | "
                   f"{_fmt(sub['submit_p50_ms'])} | {_fmt(sub['submit_p99_ms'])} |")
    out += [
        "",
        "## OAuth token requests",
        "",
        "A new connection (cold token cache), its jobs submitted in one burst: the demo OAuth server's "
        "`/oauth/admin/stats` before and after.",
        "",
        "| pool | jobs | token requests | protected calls | 401s | jobs succeeded |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for pool, data in pools.items():
        if "tokens" in data:
            t = data["tokens"]
            out.append(f"| {pool} | {t['jobs']} | **{t['token_requests']}** | {t['protected_calls']} | "
                       f"{t['unauthorized']} | {t['succeeded']} |")
    out += [
        "",
        "## Worker memory with 10 MB bodies",
        "",
        "Each job GETs `/bytes/10485760` (10 MB); the hub keeps 32,768 bytes (`truncated: true`, checked for "
        "every job). Memory of all hub worker processes, read from /proc every 50 ms: RSS summed (shared pages "
        "of prefork's pool processes count once per process) and PSS (shared pages divided). Before: the median "
        "over 1 s before the jobs; after: the median over 1 s starting 2 s after the last one.",
        "",
        "| pool | processes | jobs | in flight | jobs/s | RSS before MiB | RSS peak MiB | RSS after MiB "
        "| PSS before | PSS peak | PSS after | largest process peak MiB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for pool, data in pools.items():
        if "memory" in data:
            mem = data["memory"]
            out.append(
                f"| {pool} | {mem['processes']} | {mem['jobs']} | {mem['in_flight']} | {_fmt(mem['run']['per_s'])} | "
                f"{mem['rss_before_mib']} | **{mem['rss_peak_mib']}** | {mem['rss_after_mib']} | "
                f"{mem['pss_before_mib']} | {mem['pss_peak_mib']} | {mem['pss_after_mib']} | "
                f"{mem['largest_process_peak_mib']} |")
    out += [
        "",
        "## CPU per job",
        "",
        "CPU milliseconds per finished job, per process group, from /proc (user + system) over each measured "
        "level. `client` is the benchmark's own process (the K threads, and for the baseline the result "
        "listener); `wall ms` is the elapsed time per job (wall / jobs), for scale: on 2 cores at most "
        "2,000 CPU ms fit in 1,000 wall ms. `CPU ceiling` is cores × 1000 / total: the jobs per second at which "
        "this machine's CPUs would be busy all the time at this cost per job.",
        "",
    ]
    names = _cpu_names(pools)
    cores = int(meta["machine"]["cores"]) if str(meta["machine"]["cores"]).isdigit() else 1
    out += ["| pool | in flight | system | " + " | ".join(names) + " | total | wall ms | CPU ceiling jobs/s |",
            "| --- | ---: | --- | " + " | ".join("---:" for _ in names) + " | ---: | ---: | ---: |"]
    for pool, data in pools.items():
        for level in data["levels"]:
            for system in ("baseline", "hub"):
                phase = level[system]
                cpu = phase["cpu_ms_per_job"]
                shown = [cpu.get(name, 0.0) for name in names]
                wall = phase["wall_s"] * 1000 / max(phase["done"], 1)
                ceiling = cores * 1000 / sum(shown) if sum(shown) > 0 else None
                out.append(f"| {pool} | {level['in_flight']} | {system} | " + " | ".join(_fmt(x, 2) for x in shown)
                           + f" | {_fmt(sum(shown), 2)} | {_fmt(wall, 2)} | {_fmt(ceiling, 0)} |")
    out += [
        "",
        "## Redis commands per job",
        "",
        "From Redis's `INFO commandstats` over each measured level (every client: broker, events, results, "
        "the hub's rate limiter and token cache)"
        + (" — the Redis is shared (`HUB_REDIS_URL`), so other clients may be counted too." if
           meta["redis"] == "HUB_REDIS_URL" else "."),
        "",
        "| pool | in flight | system | commands per job | the most frequent |",
        "| --- | ---: | --- | ---: | --- |",
    ]
    for pool, data in pools.items():
        for level in data["levels"]:
            for system in ("baseline", "hub"):
                calls = level[system]["redis_calls_per_job"]
                top = ", ".join(f"{k} {v}" for k, v in list(calls.items())[:8])
                out.append(f"| {pool} | {level['in_flight']} | {system} | {_fmt(sum(calls.values()), 1)} | {top} |")
    out += ["", "## Worker command lines", ""]
    for pool, data in pools.items():
        out += [f"- {pool}, hub: `{data['hub_workers']}`", f"- {pool}, baseline: `{data['baseline_workers']}`"]
    problems = results.get("problems") or []
    out += ["", "## Problems", ""]
    out += [f"- {p}" for p in problems] if problems else ["None: every job of every measure succeeded."]
    return "\n".join(out) + "\n"


def _summary(pools: dict[str, Any]) -> list[str]:
    """The headline figures, one line each."""
    lines = ["## In short", ""]
    for pool, data in pools.items():
        levels = data["levels"]
        if levels:
            parts = [f"{lv['in_flight']} in flight: hub {lv['hub']['per_s']:.0f} jobs/s vs baseline "
                     f"{lv['baseline']['per_s']:.0f} (**{_ratio(lv['hub']['per_s'], lv['baseline']['per_s'])}**), "
                     f"p50/p99 {_fmt(lv['hub']['p50_ms'], 0)}/{_fmt(lv['hub']['p99_ms'], 0)} ms vs "
                     f"{_fmt(lv['baseline']['p50_ms'], 0)}/{_fmt(lv['baseline']['p99_ms'], 0)} ms"
                     for lv in levels]
            lines.append(f"- **{pool}**: " + "; ".join(parts) + ".")
        tokens, memory = data.get("tokens"), data.get("memory")
        if tokens and memory:
            sub = tokens["submissions"]
            lines.append(
                f"- **{pool}**: POST alone p50/p99 {_fmt(sub['submit_p50_ms'], 0)}/{_fmt(sub['submit_p99_ms'], 0)} ms "
                f"in a burst of {sub['jobs']}; {tokens['token_requests']} token request(s) for {tokens['jobs']} jobs; "
                f"worker RSS with 10 MB bodies {memory['rss_before_mib']:.0f} → peak {memory['rss_peak_mib']:.0f} → "
                f"{memory['rss_after_mib']:.0f} MiB.")
    return [*lines, ""]


def _cpu_names(pools: dict[str, Any]) -> list[str]:
    order = ["client", "api", "hub workers", "baseline workers", "upstream", "redis", "postgres"]
    seen: set[str] = set()
    for data in pools.values():
        for level in data["levels"]:
            for system in ("baseline", "hub"):
                seen.update(level[system]["cpu_ms_per_job"])
    return [name for name in order if name in seen]


def _faster_pool(pools: dict[str, Any]) -> str:
    """One sentence: which pool gave more jobs per second, per system, summed over the levels."""
    if len(pools) < 2:
        return ""
    parts = []
    for system in ("hub", "baseline"):
        totals = {pool: sum(level[system]["per_s"] for level in data["levels"]) / max(len(data["levels"]), 1)
                  for pool, data in pools.items()}
        best = max(totals, key=lambda pool: totals[pool])
        others = ", ".join(f"{pool} {totals[pool]:.0f}" for pool in totals if pool != best)
        close = all(totals[best] <= totals[pool] * 1.05 for pool in totals)
        verdict = f"{best}, by less than 5 %: a tie" if close else f"**{best}**"
        parts.append(f"{system}: {verdict} ({totals[best]:.0f} jobs/s on average over the levels; {others})")
    return "Faster pool here — " + "; ".join(parts) + "."


def write_chart(results: dict[str, Any], path: Path) -> None:
    """Throughput, and p50/p99 latency, against jobs in flight: hub and baseline per pool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pools = results["pools"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = {"prefork": "tab:blue", "threads": "tab:orange", "gevent": "tab:green"}
    for pool, data in pools.items():
        levels = [level["in_flight"] for level in data["levels"]]
        colour = colours.get(pool, "tab:gray")
        for system, style in (("baseline", "--"), ("hub", "-")):
            phases = [level[system] for level in data["levels"]]
            left.plot(levels, [p["per_s"] for p in phases], style, marker="o", color=colour,
                      label=f"{system}, {pool}")
            right.plot(levels, [p["p50_ms"] for p in phases], style, marker="o", color=colour,
                       label=f"{system} p50, {pool}")
            right.plot(levels, [p["p99_ms"] for p in phases], style, marker="^", color=colour, alpha=0.5,
                       label=f"{system} p99, {pool}")
    left.set_title("Throughput")
    left.set_xlabel("jobs in flight (client threads)")
    left.set_ylabel("jobs per second")
    left.set_ylim(bottom=0)
    right.set_title("Submit-to-result latency")
    right.set_xlabel("jobs in flight (client threads)")
    right.set_ylabel("milliseconds (log scale)")
    right.set_yscale("log")
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        ticks = sorted({level["in_flight"] for data in pools.values() for level in data["levels"]})
        axis.set_xticks(ticks)
        axis.set_xticklabels([str(t) for t in ticks])
        axis.grid(True, alpha=0.3)
    left.legend(fontsize=8)
    right.legend(fontsize=7, ncol=2)
    meta = results["meta"]
    figure.suptitle(f"Integration Hub vs bare Celery — {meta['machine']['cores']} cores, {meta['started_at']} "
                    f"(dashed: baseline, solid: hub)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
