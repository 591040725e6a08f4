"""TLS for the line door: self-signed certificates, client-certificate endpoints, CN login.

``ssl:`` endpoint strings go to Twisted's own parser, except when
``--tls-client-ca`` is set: Twisted's ``ssl:`` parser has no option for a CA,
so :func:`client_ca_endpoint` reads the same description and builds an
``SSL4ServerEndpoint`` whose ``CertificateOptions`` trust only that CA and
require a client certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from OpenSSL import SSL
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint

from cmdserver.auth.portal import ANONYMOUS
from cmdserver.auth.users import CredentialError, write_atomically
from cmdserver.commands.account import log_in
from cmdserver.text import escape

TLS_DIR = "tls"
_HOST = re.compile(r"(?=.{1,253}\Z)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+\Z")
LOOPBACK_NAMES = ("tcp", "tcp6", "ssl")
CERTIFICATE = "certificate"  # the login method, as the audit log names it


def split_description(description: str) -> list[str]:
    """Split an endpoint string on unescaped colons, removing the backslashes."""
    parts, current, escaped = [], [], False
    for char in description:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def quote(value: str) -> str:
    """Escape a value for an endpoint string."""
    return value.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def parse_description(description: str) -> tuple[str, list[str], dict[str, str]]:
    """``(type, positional args, keyword args)`` of an endpoint string."""
    kind, *rest = split_description(description)
    args, kwargs = [], {}
    for part in rest:
        key, sep, value = part.partition("=")
        if sep:
            kwargs[key] = value
        else:
            args.append(part)
    return kind.lower(), args, kwargs


def binds_only_loopback(description: str) -> bool:
    """True for a TCP or TLS endpoint whose interface is a loopback address."""
    kind, _, kwargs = parse_description(description)
    if kind not in LOOPBACK_NAMES:
        return False
    try:
        return ipaddress.ip_address(kwargs.get("interface", "")).is_loopback
    except ValueError:
        return False


def is_tls(description: str) -> bool:
    return parse_description(description)[0] == "ssl"


def check_host(host: str) -> str:
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if not _HOST.match(host):
        raise CredentialError(f"invalid host name {host!r}")
    return host.rstrip(".").lower()


def make_certificate(host: str, days: int = 825) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a self-signed certificate for ``host``, both PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        alt = x509.DNSName(host)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def gencert(data_dir: str, host: str, port: int = 9443, days: int = 825,
            force: bool = False) -> tuple[str, str, str]:
    """Write ``tls/HOST.key`` (0600) and ``tls/HOST.crt``; returns them and the endpoint."""
    host = check_host(host)
    if not 1 <= days <= 36500:
        raise CredentialError(f"days must be 1 to 36500, not {days}")
    if not 1 <= port <= 65535:
        raise CredentialError(f"port must be 1 to 65535, not {port}")
    directory = os.path.join(os.path.abspath(data_dir), TLS_DIR)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    key_path = os.path.join(directory, f"{host}.key")
    cert_path = os.path.join(directory, f"{host}.crt")
    if not force and (os.path.exists(key_path) or os.path.exists(cert_path)):
        raise CredentialError(f"{key_path} already exists (use --force to replace it)")
    key_pem, cert_pem = make_certificate(host, days)
    write_atomically(key_path, key_pem, 0o600)
    write_atomically(cert_path, cert_pem, 0o644)
    endpoint = f"ssl:{port}:privateKey={quote(key_path)}:certKey={quote(cert_path)}"
    return key_path, cert_path, endpoint


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CredentialError(f"{what} {path}: {e.strerror}") from None


def load_ca(path: str) -> list[Any]:
    """The CA certificates in a PEM file; raises CredentialError."""
    data = _read(path, "--tls-client-ca")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise CredentialError(f"--tls-client-ca {path}: no PEM certificate found")
    return [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)) for c in certs]


SUPPORTED_WITH_CA = {"privateKey", "certKey", "interface", "backlog", "extraCertChain"}


def client_ca_endpoint(reactor: Any, description: str, ca_path: str) -> SSL4ServerEndpoint:
    """An ``ssl:`` endpoint that requires a client certificate signed by the CA file."""
    kind, args, kwargs = parse_description(description)
    if kind != "ssl" or len(args) != 1:
        raise CredentialError(f"{description}: not an ssl:PORT:... endpoint")
    unknown = sorted(set(kwargs) - SUPPORTED_WITH_CA)
    if unknown:
        raise CredentialError(f"{description}: {', '.join(unknown)} not supported "
                              "together with --tls-client-ca")
    try:
        port, backlog = int(args[0]), int(kwargs.get("backlog", "50"))
    except ValueError:
        raise CredentialError(f"{description}: the port is not a number") from None
    key_path = kwargs.get("privateKey", "server.pem")
    key_pem = _read(key_path, "privateKey")
    cert_pem = _read(kwargs.get("certKey", key_path), "certKey")
    try:
        private = ssl.PrivateCertificate.loadPEM(cert_pem + b"\n" + key_pem)
        chain = []
        if "extraCertChain" in kwargs:
            chain = [ssl.Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM)).original
                     for c in x509.load_pem_x509_certificates(
                         _read(kwargs["extraCertChain"], "extraCertChain"))]
    except Exception as e:  # pyOpenSSL raises its own Error types for bad PEM
        raise CredentialError(f"{description}: cannot load the key or certificate ({e})"
                              ) from None
    options = ssl.CertificateOptions(
        privateKey=private.privateKey.original,
        certificate=private.original,
        extraCertChain=chain,
        trustRoot=ssl.trustRootFromCertificates(load_ca(ca_path)),
    )
    return SSL4ServerEndpoint(reactor, port, options, backlog=backlog,
                              interface=kwargs.get("interface", ""))


def certificate_user(transport: Any) -> str | None:
    """The common name of the client's verified certificate, if it sent one."""
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        cert = get()
    except Exception:  # not a TLS transport, or no handshake yet
        return None
    if cert is None:
        return None
    names = cert.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


class CertificateLogin:
    """Logs a TLS connection in as the user its client certificate names.

    The certificate was verified against ``--tls-client-ca`` during the
    handshake; its common name must also be a user on file.  Either way the
    core audits the login (method ``certificate``): ok, or failed for a name
    that is not a user (the connection then stays anonymous).  A failed
    certificate login penalises the address like a wrong password (the login
    gate), and so does a handshake that failed (no certificate, or one from
    another CA); from a penalised address the certificate is not even looked at
    (``refused``).
    """

    def __init__(self, lookup: Any) -> None:
        self.lookup = lookup

    def __call__(self, ctx: Any, transport: Any) -> None:
        if ctx.user != ANONYMOUS:
            return
        name = certificate_user(transport)
        if name is None:
            return
        core = ctx.core
        session = core.session_for(ctx)
        refused = core.gate.refusal(session)
        if refused is not None:
            core.login(session, name, CERTIFICATE, "refused", refused)
            return
        try:
            account = self.lookup(name)
        except Exception:
            core.login(session, name, CERTIFICATE, "failed",
                       "the certificate's name is not a user")
            core.gate.failure(session, name)
            return
        log_in(ctx, account)
        core.login(session, account.name, CERTIFICATE, "ok")
        core.gate.succeeded(session)

    def handshake_failed(self, ctx: Any, reason: Any) -> None:
        """The TLS handshake failed (no client certificate, an unknown CA, not TLS at
        all): a failed certificate login."""
        core = ctx.core
        session = core.session_for(ctx)
        error = escape(reason.getErrorMessage() if reason is not None else "", 200)
        core.login(session, ANONYMOUS, CERTIFICATE, "failed",
                   f"the TLS handshake failed: {error}")
        core.gate.failure(session, ANONYMOUS)


def handshake_failure(reason: Any) -> bool:
    """True if a connection ended because its TLS handshake or stream failed."""
    return reason is not None and bool(reason.check(SSL.Error))
