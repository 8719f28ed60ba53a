"""Upstreams that try to hold a worker: each attempt ends at its deadline, headers included."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from sqlmodel import Session

from models.tables import Connection, Job, Request
from tests.conftest import in_process_runtime, new_tenant, test_settings
from worker.executor import run_job
from worker.guard import system_resolver


@pytest.fixture
def dripping_headers() -> Iterator[int]:
    """A server on 127.0.0.1 that sends a status line, then one header byte every 0.2 s
    (for 30 s at most, or until the client goes away)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                try:
                    conn.sendall(b"HTTP/1.1 200 OK\r\n")
                    ends = time.monotonic() + 30
                    while not stop.is_set() and time.monotonic() < ends:
                        conn.sendall(b"X")
                        time.sleep(0.2)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join(5)
    listener.close()


def test_headers_dripped_byte_by_byte_end_at_the_deadline(engine, database_url, dripping_headers) -> None:
    # Given a job to a service that never finishes its headers, each byte well within the read timeout
    tenant_id, _key = new_tenant(engine, "drip")
    with Session(engine) as session:
        connection = Connection(tenant_id=tenant_id, name="drip", base_url=f"http://127.0.0.1:{dripping_headers}",
                                allowed_hosts=["127.0.0.1"], auth_header_values={},
                                template={"service_name": "s", "integration_method": "rest", "auth_type": "none",
                                          "auth_headers": [], "verbs": ["GET"]})
        session.add(connection)
        session.commit()
        request = Request(tenant_id=tenant_id, connection_id=connection.id, name="r", kind="manual", method="GET",
                          url="/slow", headers={}, query={}, body=None, media_type="application/json")
        session.add(request)
        session.commit()
        job = Job(tenant_id=tenant_id, connection_id=connection.id, request_id=request.id, action="request",
                  status="queued", params={"path_params": {}, "variables": {}}, secrets_used=[])
        session.add(job)
        session.commit()
        job_id = job.id
    settings = test_settings(database_url, request_deadline_s=1.5, read_timeout_s=5.0)
    runtime = in_process_runtime(settings, engine, None, system_resolver)
    # When the worker runs it
    started = time.monotonic()
    with runtime.client:
        run_job(job_id, runtime)
    took = time.monotonic() - started
    # Then it failed with read_timeout, in about the deadline rather than never
    with Session(engine) as session:
        done = session.get(Job, job_id)
        assert done is not None
        assert (done.status, done.error["code"]) == ("failed", "read_timeout"), done.error
    assert took < 10
