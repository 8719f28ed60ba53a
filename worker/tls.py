"""TLS for the worker's calls: the trusted CAs, and a connection's client certificate for
mutual TLS, loaded from its secrets into memory for one job.

``ssl`` loads a certificate chain only from files, so the PEM texts are written to files
readable by this process alone, in a fresh private directory, and deleted as soon as they are
loaded.
"""

from __future__ import annotations

import os
import shutil
import ssl
import tempfile
from collections.abc import Mapping

from models import errors
from models.settings import Settings


def context(settings: Settings, client_certificate: Mapping[str, str] | None = None) -> ssl.SSLContext:
    """A TLS client context: the system CAs (or ``HUB_TLS_CA_FILE``), and the given
    certificate and key (PEM texts) when the service asks for one."""
    cafile = str(settings.tls_ca_file) if settings.tls_ca_file else None
    built = ssl.create_default_context(cafile=cafile)
    if client_certificate:
        directory = tempfile.mkdtemp(prefix="hub-mtls-")
        try:
            paths = {}
            for part in ("cert", "key"):
                paths[part] = os.path.join(directory, part)
                descriptor = os.open(paths[part], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "w") as handle:
                    handle.write(client_certificate[part])
            built.load_cert_chain(paths["cert"], paths["key"])
        except (ssl.SSLError, OSError, KeyError):
            raise errors.TlsError("the connection's client certificate or key is not valid PEM") from None
        finally:
            shutil.rmtree(directory, ignore_errors=True)
    return built
