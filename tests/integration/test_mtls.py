"""Mutual TLS for real: a service on 127.0.0.1 that demands a client certificate signed by its
CA, and the worker presenting the connection's certificate and key from its secrets."""

from __future__ import annotations

import datetime
import ipaddress
import json
import ssl
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.engine import Engine
from sqlmodel import Session

from models import secrets
from models.tables import Connection, Job, Request
from models.vault import Vault
from tests.conftest import TEST_MASTER_KEY, in_process_runtime, new_tenant, test_settings
from worker.executor import run_job


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: Any, issuer: tuple[str, Any] | None = None, *, ca: bool = False,
          ip: str | None = None) -> x509.Certificate:
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(item: Any) -> str:
    if isinstance(item, x509.Certificate):
        return item.public_bytes(serialization.Encoding.PEM).decode()
    return item.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()).decode()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass

    def do_GET(self) -> None:  # noqa: N802
        peer = self.connection.getpeercert()  # type: ignore[attr-defined]
        subject = dict(item[0] for item in peer["subject"]) if peer else {}
        body = json.dumps({"client": subject.get("commonName")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A CA, a server certificate for 127.0.0.1, and two client certificates: one the CA
    signed, one self-signed."""
    directory = tmp_path_factory.mktemp("pki")
    ca_key = _key()
    ca = _cert("hub-test-ca", ca_key, ca=True)
    server_key = _key()
    server = _cert("127.0.0.1", server_key, ("hub-test-ca", ca_key), ip="127.0.0.1")
    client_key, rogue_key = _key(), _key()
    (directory / "ca.pem").write_text(_pem(ca))
    (directory / "server.pem").write_text(_pem(server) + _pem(server_key))
    return {
        "dir": directory,
        "client": (_pem(_cert("acme-client", client_key, ("hub-test-ca", ca_key))), _pem(client_key)),
        "rogue": (_pem(_cert("rogue", rogue_key)), _pem(rogue_key)),
    }


@pytest.fixture(scope="module")
def service(pki: dict[str, Any]) -> Iterator[str]:
    """An HTTPS service on 127.0.0.1 that requires a client certificate from the test CA."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["dir"] / "ca.pem"))
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(pki["dir"] / "server.pem"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


def _job(engine: Engine, base_url: str, certificate: tuple[str, str] | None) -> str:
    tenant_id, _key_unused = new_tenant(engine, f"mtls-{certificate is not None}-{id(certificate)}")
    with Session(engine) as session:
        connection = Connection(
            tenant_id=tenant_id, name="mtls", base_url=base_url, allowed_hosts=["127.0.0.1"],
            auth_header_values={},
            client_certificate={"cert": "{{secrets.tls_cert}}", "key": "{{secrets.tls_key}}"} if certificate else None,
            template={"service_name": "s", "integration_method": "rest", "auth_type": "none",
                      "auth_headers": [], "verbs": ["GET"]},
        )
        session.add(connection)
        session.commit()
        if certificate:
            for name, value in zip(("tls_cert", "tls_key"), certificate, strict=True):
                secrets.put(session, Vault.from_setting(TEST_MASTER_KEY), tenant_id=tenant_id,
                            connection_id=connection.id, name=name, value=value)
        request = Request(tenant_id=tenant_id, connection_id=connection.id, name="who", kind="manual",
                          method="GET", url="/whoami", headers={}, query={}, body=None,
                          media_type="application/json")
        session.add(request)
        session.commit()
        job = Job(tenant_id=tenant_id, connection_id=connection.id, request_id=request.id, action="request",
                  status="queued", params={"path_params": {}, "variables": {}}, secrets_used=[])
        session.add(job)
        session.commit()
        return job.id


def _run(engine: Engine, database_url: str, pki: dict[str, Any], job_id: str) -> Job:
    settings = test_settings(database_url, tls_ca_file=Path(pki["dir"] / "ca.pem"), allow_http=False)
    runtime = in_process_runtime(settings, engine, None, lambda host, port: ["127.0.0.1"])
    with runtime.client:
        run_job(job_id, runtime)
    with Session(engine) as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_the_connection_presents_its_client_certificate(engine, database_url, pki, service) -> None:
    # Given a connection whose client certificate and key are its secrets
    job_id = _job(engine, service, pki["client"])
    # When a job calls the service that demands one
    job = _run(engine, database_url, pki, job_id)
    # Then the TLS handshake carried the certificate, and the job records the secrets it read
    assert job.status == "succeeded", job.error
    assert json.loads(job.result["body"]) == {"client": "acme-client"}
    assert job.secrets_used == ["tls_cert", "tls_key"]


@pytest.mark.parametrize("which", ["none", "rogue"])
def test_without_a_certificate_the_ca_signed_the_call_fails(engine, database_url, pki, service, which) -> None:
    # Given a connection with no client certificate, or one the service's CA did not sign
    job_id = _job(engine, service, None if which == "none" else pki["rogue"])
    # When the job runs, then the service refuses the handshake and the job failed
    job = _run(engine, database_url, pki, job_id)
    assert job.status == "failed"
    assert job.error["code"] == "tls_error"
