"""A throwaway certificate authority for local TLS servers in tests and benchmarks.

Test and benchmark infrastructure, not shipped. Needs ``trustme`` (the ``test`` extra).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LocalTLS:
    """A server TLS context for ``127.0.0.1``/``localhost`` and the PEM file of its CA.

    Attributes:
        server: ``ssl.Purpose.CLIENT_AUTH`` context holding the server certificate.
        ca_file: the CA certificate (PEM) that clients should trust.
    """

    server: ssl.SSLContext
    ca_file: Path

    @classmethod
    def create(cls, ca_file: str | Path) -> LocalTLS:
        """Make a CA and a certificate for ``127.0.0.1``/``localhost`` signed by it; write the
        CA's PEM to ``ca_file``."""
        import trustme  # test dependency

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(server)
        ca.cert_pem.write_to_path(str(ca_file))
        return cls(server, Path(ca_file))

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only this CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))
