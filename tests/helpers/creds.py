"""Shared helpers for the credential, login and TLS tests."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

TEST_COST = 4  # the lowest bcrypt cost: fast tests


def run_now(f: Any, *args: Any, **kwargs: Any) -> Deferred:
    """A 'thread runner' that runs the function at once (no threads in unit tests)."""
    return defer.maybeDeferred(f, *args, **kwargs)


def flatten_events(events: list[dict]) -> str:
    """Everything a log observer could write: the formatted text and every field."""
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) + repr(sorted(e.items(), key=lambda kv: kv[0]))
                     for e in events)


def make_ca(directory: str, name: str) -> tuple[Any, Any, str]:
    """A CA key and certificate (the PEM written to ``directory/name.pem``)."""
    import datetime
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = os.path.join(directory, f"{name}.pem")
    with open(path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert, path


def make_client_cert(directory: str, ca: tuple[Any, Any, str], common_name: str
                     ) -> tuple[str, str]:
    """A client certificate for ``common_name`` signed by ``ca``: (cert path, key path)."""
    import datetime
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key, ca_cert, _ = ca
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path = os.path.join(directory, f"{common_name}.crt")
    key_path = os.path.join(directory, f"{common_name}.key")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return cert_path, key_path


def temp_dir(test: Any) -> str:
    """A fresh directory outside the work tree, removed when the test ends."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="cmdserver-test-")
    test.addCleanup(shutil.rmtree, path, True)
    return path
