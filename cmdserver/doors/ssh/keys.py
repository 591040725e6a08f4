"""SSH host keys: Ed25519 and RSA 3072, made on first run and reused afterwards.

The keys are written in OpenSSH's private key format with mode 0600 into the
data directory (``ssh_host_ed25519_key`` and ``ssh_host_rsa_key``), the same
names OpenSSH uses, so an admin recognises them and can compare fingerprints
with ``ssh-keygen -lf``.
"""

from __future__ import annotations

import os
import tempfile

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from twisted.conch.ssh.keys import FingerprintFormats, Key
from twisted.logger import Logger

log = Logger()

RSA_BITS = 3072
HOST_KEY_FILES = {
    "ed25519": "ssh_host_ed25519_key",
    "rsa": "ssh_host_rsa_key",
}


def _generate(kind: str) -> bytes:
    """A new private key of ``kind`` in OpenSSH format."""
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                             serialization.NoEncryption())


def _write_private(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0600; never half a key."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".hostkey-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)  # fails if another process made the key meanwhile
    finally:
        os.unlink(tmp)


def load_host_keys(data_dir: str) -> dict[bytes, Key]:
    """The host keys by SSH key type, created in ``data_dir`` if missing."""
    keys: dict[bytes, Key] = {}
    for kind, name in HOST_KEY_FILES.items():
        path = os.path.join(data_dir, name)
        if not os.path.exists(path):
            try:
                _write_private(path, _generate(kind))
                log.info("created SSH host key {path}", path=path)
            except FileExistsError:
                pass
        key = Key.fromFile(path)
        keys[key.sshType()] = key
    return keys


def fingerprint(key: Key) -> str:
    """``SHA256:…``, as ``ssh-keygen -lf`` and the OpenSSH client print it."""
    return "SHA256:" + key.fingerprint(FingerprintFormats.SHA256_BASE64).rstrip("=")


def log_fingerprints(keys: dict[bytes, Key]) -> None:
    for key_type, key in sorted(keys.items()):
        log.info("SSH host key {key_type} {fingerprint}", key_type=key_type.decode(),
                 fingerprint=fingerprint(key))
