"""Delivering a finished job to its ``callback_url``: the job document as JSON, signed.

One POST per delivery attempt, through the same destination guard as every other call (a
callback URL cannot reach an internal address), no redirects followed. A 2xx answer is a
delivery; anything else is tried again with backoff, ``HUB_CALLBACK_ATTEMPTS`` times in all.
"""

from __future__ import annotations

import json
import logging
import random
from datetime import timedelta

import sqlalchemy as sa
from sqlmodel import Session

from models import callbacks, errors, metrics
from models.base import utcnow
from models.logs import job_event
from models.tables import Job
from models.views import JobPublic, job_public
from worker import guard, render, retries, upstream
from worker.runtime import Runtime

log = logging.getLogger("hub.worker")

CALLBACK_DEADLINE_S = 10.0
CALLBACK_BACKOFF_CAP_S = 300.0


def body(job: Job) -> bytes:
    """What a callback carries: the job as ``GET /v1/executions/{id}`` shows it."""
    document = JobPublic.model_validate(job_public(job)).model_dump(mode="json")
    return json.dumps(document, separators=(",", ":")).encode()


def deliver(job_id: str, runtime: Runtime) -> float | None:
    """Try once to deliver the job's callback; the seconds to wait before the next try, or
    None when there is nothing more to do (delivered, given up, or no callback pending)."""
    with Session(runtime.engine, expire_on_commit=False) as session:
        job = session.get(Job, job_id)
        if job is None or job.callback_state != "pending" or not job.callback_url:
            return None
        content = body(job)
        key = callbacks.callback_key(session, runtime.vault, job.tenant_id)
        attempt = job.callback_attempts + 1
        outgoing = render.Outgoing(
            method="POST",
            url=job.callback_url,
            headers={
                "Content-Type": "application/json",
                callbacks.SIGNATURE_HEADER: callbacks.signature(key, content),
                "X-Hub-Job-Id": job.id,
                "X-Hub-Delivery-Attempt": str(attempt),
            },
            content=content,
        )
        try:
            with guard.pinned(*runtime.destination(outgoing.url, None)):
                answer = upstream.send(runtime.client, outgoing, cap=1024, deadline_s=CALLBACK_DEADLINE_S)
            outcome = f"answered {answer.status_code}"
            delivered = 200 <= answer.status_code < 300
        except errors.HubError as exc:
            outcome, delivered = exc.code, False
        state = "delivered" if delivered else ("failed" if attempt >= runtime.settings.callback_attempts else "pending")
        wait = None if state != "pending" else retries.backoff(
            attempt, base_s=runtime.settings.callback_backoff_s, cap_s=CALLBACK_BACKOFF_CAP_S,
            rand=lambda: 0.5 + random.random() / 2)  # at least half: a receiver gets time
        session.execute(
            sa.update(Job)
            .where(Job.id == job_id, Job.callback_state == "pending")  # type: ignore[arg-type]
            .values(callback_state=state, callback_attempts=attempt,
                    # the sweeper sends the next try again if its message is lost
                    callback_due_at=None if wait is None else utcnow() + timedelta(seconds=wait))
        )
        session.commit()
    job_event(log, f"callback {state}", job_id, attempt=attempt, outcome=outcome)
    batch = metrics.Batch(runtime.metrics)
    batch.inc("hub_callbacks_total", outcome=state)
    batch.flush()
    return wait
