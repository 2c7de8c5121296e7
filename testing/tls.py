"""A throwaway certificate authority and a loopback server certificate.

Generated with ``cryptography`` at test time (EC P-256, so it takes milliseconds) and
cached for the process. The leaf certificate names ``127.0.0.1``, ``::1`` and
``localhost``; clients trust it through :func:`client_context`, which trusts only the
throwaway CA, so certificate validation stays switched on in tests. A child
process (a dispatcher started by an acceptance test) shares the parent's certificate
through ``OUTBOX_TEST_TLS_DIR`` (:func:`shared_environment`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class LoopbackCertificate:
    """PEM files of the throwaway CA and of the server certificate signed by it."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    directory: Path

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.directory / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.directory / "server.key"

    def server_context(self) -> ssl.SSLContext:
        """An SSL context that serves this certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


SHARED_DIRECTORY_VARIABLE = "OUTBOX_TEST_TLS_DIR"
"""Names the folder of a certificate made by another process (a test that starts
dispatcher subprocesses passes :func:`shared_environment` to them)."""


def shared_environment() -> dict[str, str]:
    """Environment that makes a child process trust (and serve) this process's certificate."""
    return {SHARED_DIRECTORY_VARIABLE: str(loopback_certificate().directory)}


@cache
def loopback_certificate() -> LoopbackCertificate:
    """Create (once per process) a CA and a server certificate for loopback names.

    When ``OUTBOX_TEST_TLS_DIR`` names a folder holding one already, use that one.
    """
    shared = os.environ.get(SHARED_DIRECTORY_VARIABLE)
    if shared and (Path(shared) / "ca.pem").is_file():
        directory = Path(shared)
        return LoopbackCertificate(
            ca_pem=(directory / "ca.pem").read_bytes(),
            cert_pem=(directory / "server.pem").read_bytes(),
            key_pem=(directory / "server.key").read_bytes(),
            directory=directory,
        )
    return make_certificate(Path(tempfile.mkdtemp(prefix="outbox-tls-")))


def make_certificate(directory: Path) -> LoopbackCertificate:
    """Create a CA and a server certificate for loopback names, valid for two days,
    and write them to ``directory`` (``ca.pem``, ``server.pem``, ``server.key``).
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("outbox test CA"))
        .issuer_name(_name("outbox test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    x509.IPAddress(ipaddress.ip_address("::1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    bundle = LoopbackCertificate(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM),
        key_pem=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        directory=directory,
    )
    bundle.ca_file.write_bytes(bundle.ca_pem)
    bundle.cert_file.write_bytes(bundle.cert_pem)
    bundle.key_file.touch(mode=0o600)
    bundle.key_file.write_bytes(bundle.key_pem)
    return bundle


def server_context() -> ssl.SSLContext:
    """An SSL context that serves the loopback certificate."""
    return loopback_certificate().server_context()


def client_context() -> ssl.SSLContext:
    """A verifying client context that trusts the throwaway CA and nothing else."""
    context = ssl.create_default_context(cafile=str(loopback_certificate().ca_file))
    return context
