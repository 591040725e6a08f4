"""The credential store on disk: the users file and the per-user SSH key files.

``<data-dir>/users`` holds one user a line as a JSON object
(``{"name": ..., "hash": ..., "roots": [...]}``): unambiguous for any path,
still one line per user.  It is only ever replaced whole (temporary file,
fsync, rename) with mode 0600, under a lock file so two administrators cannot
lose each other's change.  ``<data-dir>/keys/<user>.pub`` holds a user's SSH
public keys in OpenSSH ``authorized_keys`` format.

Everything here blocks (disk, bcrypt): the daemon calls it from threads or
before the reactor runs; the ``cmdserver`` command line calls it directly.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import bcrypt
from twisted.conch.ssh import keys

USERS_FILE = "users"
HMAC_SUFFIX = ".hmac"
KEYS_DIR = "keys"
LOCK_FILE = "users.lock"
INITIAL_PASSWORD_FILE = "initial-admin-password"
DEFAULT_COST = 12
MAX_PASSWORD_BYTES = 72  # bcrypt's limit; longer ones are refused, not cut
RESERVED_NAMES = frozenset({"anonymous"})  # the name of a connection before login
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")


class CredentialError(Exception):
    """A bad name, password, key or users file; the message is one line for the user."""


@dataclass(frozen=True)
class UserRecord:
    """One line of the users file."""

    name: str
    hash: str
    roots: tuple[str, ...] | None = None


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid user name (it also names a key file), else raise."""
    if not _NAME.match(name) or name in RESERVED_NAMES:
        raise CredentialError(
            f"invalid user name {name!r}: use 1-64 letters, digits, '_', '.', '-', "
            "not starting with '.' or '-'" + (" (reserved)" if name in RESERVED_NAMES else ""))
    return name


def check_password(password: str) -> bytes:
    """The password's bytes if it is usable on every door, else raise."""
    if not password:
        raise CredentialError("empty password")
    if not password.isprintable():
        raise CredentialError("the password contains control characters")
    raw = password.encode("utf-8")
    if len(raw) > MAX_PASSWORD_BYTES:
        raise CredentialError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")
    return raw


def check_cost(cost: int) -> int:
    if not 4 <= cost <= 31:
        raise CredentialError(f"bcrypt cost must be 4 to 31, not {cost}")
    return cost


def hash_password(password: str, cost: int = DEFAULT_COST) -> str:
    """A bcrypt hash of ``password`` (slow on purpose: call it off the reactor thread)."""
    return bcrypt.hashpw(check_password(password), bcrypt.gensalt(check_cost(cost))).decode()


def verify_password(password: str | bytes, hashed: str) -> bool:
    """True if ``password`` matches the bcrypt hash; False for anything malformed."""
    raw = password.encode("utf-8") if isinstance(password, str) else password
    if not raw or len(raw) > MAX_PASSWORD_BYTES:
        return False
    try:
        return bcrypt.checkpw(raw, hashed.encode("ascii"))
    except ValueError:
        return False


def random_password() -> str:
    return secrets.token_urlsafe(18)


def parse_users(text: str, source: str) -> dict[str, UserRecord]:
    """Parse the users file; errors name the line but never show its content (hashes)."""
    users: dict[str, UserRecord] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{source}: line {number}"
        try:
            entry = json.loads(line)
        except ValueError:
            raise CredentialError(f"{where}: not a JSON object") from None
        if not isinstance(entry, dict) or set(entry) - {"name", "hash", "roots"}:
            raise CredentialError(f"{where}: expected name, hash and optional roots")
        name, hashed, roots = entry.get("name"), entry.get("hash"), entry.get("roots")
        if not isinstance(name, str):
            raise CredentialError(f"{where}: no user name")
        try:
            check_name(name)
        except CredentialError as e:
            raise CredentialError(f"{where}: {e}") from None
        if not isinstance(hashed, str) or not hashed.startswith("$2"):
            raise CredentialError(f"{where}: the hash is not a bcrypt hash")
        if roots is not None and (not isinstance(roots, list) or not roots
                                  or not all(isinstance(r, str) and r for r in roots)):
            raise CredentialError(f"{where}: roots must be a non-empty list of paths")
        if name in users:
            raise CredentialError(f"{where}: user {name} appears twice")
        users[name] = UserRecord(name, hashed, tuple(roots) if roots else None)
    return users


def format_users(users: dict[str, UserRecord]) -> str:
    lines = []
    for user in sorted(users.values(), key=lambda u: u.name):
        entry: dict[str, object] = {"name": user.name, "hash": user.hash}
        if user.roots:
            entry["roots"] = list(user.roots)
        lines.append(json.dumps(entry))
    return "".join(line + "\n" for line in lines)


def parse_keys(text: str, source: str) -> list[keys.Key]:
    """Public keys from ``authorized_keys`` text; blank lines and comments are skipped."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            key = keys.Key.fromString(line.encode("utf-8"))
        except (keys.BadKeyError, ValueError, UnicodeError):
            if re.search(r"\s(ssh|ecdsa|sk)-", line):
                raise CredentialError(f"{source}: line {number}: authorized_keys options "
                                      "(from=, command=, ...) are not supported") from None
            raise CredentialError(f"{source}: line {number}: not an SSH public key") from None
        if not key.isPublic():
            raise CredentialError(f"{source}: line {number}: a private key, not a public one")
        found.append(key)
    return found


def write_atomically(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never half."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _ignore_missing():
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextmanager
def credentials_lock(data_dir: str) -> Iterator[None]:
    """The data directory's credentials lock (users, keys, tokens), held exclusively:
    the ``cmdserver`` subcommands' read-modify-write of a file never interleave."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(data_dir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@contextmanager
def _ignore_missing() -> Iterator[None]:
    try:
        yield
    except FileNotFoundError:
        pass


class UserStore:
    """The users file and key directory of one data directory."""

    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.users_path = os.path.join(data_dir, USERS_FILE)
        self.keys_dir = os.path.join(data_dir, KEYS_DIR)

    def key_path(self, name: str) -> str:
        return os.path.join(self.keys_dir, check_name(name) + ".pub")

    def hmac_path(self, name: str) -> str:
        """The user's own upload HMAC key (hex), if they have one."""
        return os.path.join(self.keys_dir, check_name(name) + HMAC_SUFFIX)

    def load_hmac_keys(self, names: set[str]) -> dict[str, bytes]:
        """The upload keys of the users in ``names`` that have one."""
        from cmdserver.commands.upload.key import BadKeyError, read_key_file

        found: dict[str, bytes] = {}
        for name in sorted(names):
            path = self.hmac_path(name)
            try:
                found[name] = read_key_file(path)
            except FileNotFoundError:
                continue
            except (OSError, BadKeyError) as e:
                raise CredentialError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
        return found

    def ensure_hmac_key(self, name: str) -> bytes:
        """The user's upload key, created (32 random bytes, 0600) if they have none."""
        from cmdserver.commands.upload.key import KEY_BYTES, read_key_file

        if name not in self.load():
            raise CredentialError(f"no such user: {name}")
        path = self.hmac_path(name)
        try:
            return read_key_file(path)
        except FileNotFoundError:
            pass
        os.makedirs(self.keys_dir, mode=0o700, exist_ok=True)
        key = secrets.token_bytes(KEY_BYTES)
        write_atomically(path, (key.hex() + "\n").encode("ascii"))
        return key

    def load(self) -> dict[str, UserRecord]:
        """The users on file (none if there is no file yet)."""
        try:
            with open(self.users_path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            raise CredentialError(f"{self.users_path}: {getattr(e, 'strerror', None) or e}"
                                  ) from None
        return parse_users(text, self.users_path)

    def save(self, users: dict[str, UserRecord]) -> None:
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        write_atomically(self.users_path, format_users(users).encode("utf-8"))

    @contextmanager
    def locked(self) -> Iterator[dict[str, UserRecord]]:
        """Read-modify-write under an exclusive lock; the dict is saved if the block succeeds."""
        with credentials_lock(self.data_dir):
            users = self.load()
            before = dict(users)
            yield users
            if users != before:
                self.save(users)

    def load_keys(self, names: set[str] | None = None) -> dict[str, list[keys.Key]]:
        """Every user's public keys; a broken key file is an error naming it."""
        found: dict[str, list[keys.Key]] = {}
        try:
            entries = sorted(os.listdir(self.keys_dir))
        except FileNotFoundError:
            return found
        for entry in entries:
            name, ext = os.path.splitext(entry)
            if ext != ".pub" or not _NAME.match(name) or (names is not None
                                                         and name not in names):
                continue
            path = os.path.join(self.keys_dir, entry)
            try:
                with open(path, encoding="utf-8") as f:
                    found[name] = parse_keys(f.read(), path)
            except (OSError, UnicodeDecodeError) as e:
                raise CredentialError(f"{path}: {getattr(e, 'strerror', None) or e}") from None
        return found

    def add_keys(self, name: str, text: str) -> int:
        """Append the keys in ``text`` to the user's key file; returns how many were new."""
        new = parse_keys(text, "key file")
        if not new:
            raise CredentialError("no public key found in the key file")
        path = self.key_path(name)
        os.makedirs(self.keys_dir, mode=0o700, exist_ok=True)
        try:
            with open(path, encoding="utf-8") as f:
                old_text = f.read()
        except FileNotFoundError:
            old_text = ""
        old = parse_keys(old_text, path)
        lines = [line for line in old_text.splitlines() if line.strip()]
        added = 0
        for key in new:
            if key not in old:
                lines.append(key.toString("OPENSSH").decode("ascii"))
                old.append(key)
                added += 1
        write_atomically(path, "".join(line + "\n" for line in lines).encode("utf-8"))
        return added

    def remove_keys(self, name: str) -> None:
        for path in (self.key_path(name), self.hmac_path(name)):
            with _ignore_missing():
                os.unlink(path)

    def is_new(self) -> bool:
        """True for a data directory that has never had a users file: neither
        ``users`` nor its lock file ``users.lock`` (every change to the users
        file takes that lock first, and deleting the users file leaves it)."""
        return not any(os.path.lexists(os.path.join(self.data_dir, name))
                       for name in (USERS_FILE, LOCK_FILE))

    def ensure_admin(self, cost: int = DEFAULT_COST) -> bool:
        """First run: in a new data directory (:meth:`is_new`), create ``admin``
        with a random password, written only to ``initial-admin-password`` (0600).

        True if it did.  A directory whose users were all deleted, or whose
        users file was removed, is not new: it gets no admin.
        """
        if not self.is_new():
            return False
        with self.locked() as users:
            if users or os.path.lexists(self.users_path):
                return False  # another process was first
            password = random_password()
            # The password file first: an admin whose password is nowhere is no use.
            write_atomically(os.path.join(self.data_dir, INITIAL_PASSWORD_FILE),
                             (password + "\n").encode("ascii"))
            users["admin"] = UserRecord("admin", hash_password(password, cost))
        return True
