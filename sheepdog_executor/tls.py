"""TLS for the worker channel: a certificate the client makes for itself, pinned by the workers.

No certificate authority is involved: the client makes a fresh key and self-signed certificate per
session, serves it from the endpoint, and hands the workers the SHA-256 fingerprint of its DER
encoding; a worker talks only to an endpoint presenting exactly that certificate.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import ssl
import tempfile
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate and its private key (PEM), with the fingerprint workers pin."""

    cert_pem: bytes
    key_pem: bytes

    @property
    def fingerprint(self) -> str:
        """Lower-case hex SHA-256 of the DER certificate: what ``ssl.getpeercert(True)`` hashes to."""
        return fingerprint_of(ssl.PEM_cert_to_DER_cert(self.cert_pem.decode()))

    def server_context(self) -> ssl.SSLContext:
        """A server-side context that presents this certificate (TLS 1.2 or later)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # load_cert_chain only reads files: write them in a private directory, for a moment
        with tempfile.TemporaryDirectory(prefix="sheepdog-tls-") as directory:
            cert_path = os.path.join(directory, "cert.pem")
            key_path = os.path.join(directory, "key.pem")
            for path, data in ((cert_path, self.cert_pem), (key_path, self.key_pem)):
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
            context.load_cert_chain(cert_path, key_path)
        return context


def fingerprint_of(der: bytes) -> str:
    """The pinned form of a DER certificate."""
    return hashlib.sha256(der).hexdigest()


def make_certificate(common_name: str = "sheepdog-executor", days: int = 30) -> Certificate:
    """A fresh ECDSA P-256 key and a self-signed certificate for it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))  # nodes whose clocks lag still accept it
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return Certificate(
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
