"""The daemon's view of the credential store: checkers, realm lookup and reloading.

:class:`Credentials` keeps the users and keys in memory (so a login never
touches the disk on the reactor thread) and swaps in a fresh copy when the
files change: a cheap stat poll on a ``LoopingCall`` and SIGHUP (the service's
one hook, :class:`cmdserver.service.Hangup`) both trigger a reload, which runs
in a thread.  Open sessions are never touched by a reload.  Files that cannot
be read are reported once per change of them, and the last good users stay.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import os
import secrets
import threading
from collections.abc import Callable
from typing import Any

import bcrypt
from twisted.application.service import Service
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker
from twisted.conch.ssh import keys
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet import defer, task, threads
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from cmdserver.auth.portal import Account, Realm, build_portal
from cmdserver.auth.tokens import TokenChecker, TokenRecord, TokenStore, looks_like_token
from cmdserver.auth.tokens import check as check_token
from cmdserver.auth.users import (
    DEFAULT_COST,
    HMAC_SUFFIX,
    INITIAL_PASSWORD_FILE,
    CredentialError,
    UserRecord,
    UserStore,
    verify_password,
)
from cmdserver.workers import background

log = Logger()

Runner = Callable[..., Deferred]
Signature = tuple[Any, ...]


def _stat(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def store_signature(store: UserStore) -> Signature:
    """What changes when the users file or any key file changes (stat calls only)."""
    try:
        entries = sorted(e for e in os.listdir(store.keys_dir)
                         if e.endswith((".pub", HMAC_SUFFIX)))
    except FileNotFoundError:
        entries = []
    key_stats = tuple((e, _stat(os.path.join(store.keys_dir, e))) for e in entries)
    return (_stat(store.users_path), key_stats, _stat(TokenStore(store.data_dir).path))


class UnreadableStore(CredentialError):
    """The users file or a key file cannot be used; ``signature`` is what was read."""

    def __init__(self, message: str, signature: Signature) -> None:
        super().__init__(message)
        self.signature = signature


def read_store(store: UserStore, previous: Signature | None) -> tuple[Any, ...] | None:
    """Blocking: (signature, users, SSH keys, upload HMAC keys, API tokens), or None
    if nothing changed since ``previous``; UnreadableStore if a file is broken."""
    signature = store_signature(store)
    if signature == previous:
        return None
    try:
        users = store.load()
        return (signature, users, store.load_keys(set(users)),
                store.load_hmac_keys(set(users)), TokenStore(store.data_dir).load())
    except CredentialError as e:
        raise UnreadableStore(str(e), signature) from None


_BCRYPT_ALPHABET = "./ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"


@functools.lru_cache(maxsize=32)
def decoy_hash(cost: int) -> str:
    """A bcrypt hash of cost ``cost`` that no password matches, made without hashing.

    Checking a password against it costs what a check against a real hash of that
    cost costs: it is checked against for names that are not users."""
    digest = "".join(secrets.choice(_BCRYPT_ALPHABET) for _ in range(31))
    return bcrypt.gensalt(cost).decode("ascii") + digest


def hash_cost(hashed: str) -> int | None:
    """The cost of a bcrypt hash (``$2b$12$…``: 12), or None if it is malformed."""
    parts = hashed.split("$")
    if len(parts) < 4 or not parts[2].isdigit():
        return None
    return int(parts[2])


class Credentials:
    """Users and keys in memory, reloaded from the store without a restart."""

    def __init__(self, store: UserStore, run_in_thread: Runner | None = None,
                 cost: int = DEFAULT_COST) -> None:
        self.store = store
        self.cost = cost
        self.users: dict[str, UserRecord] = {}
        self.keys: dict[str, list[keys.Key]] = {}
        self.hmac_keys: dict[str, bytes] = {}
        self.tokens: dict[str, TokenRecord] = {}
        # Called with the ids of tokens that went away (revoked): their sessions end.
        self.on_revoked: Callable[[set[str]], Any] | None = None
        # The files as last read, good or broken: a broken file is reported once,
        # and read again only when it changes.
        self._signature: Signature | None = None
        self._loaded = False
        self._run = run_in_thread or threads.deferToThread
        self._reloading: Deferred | None = None
        self._again = False
        self._decoy_key = secrets.token_bytes(32)  # picks an unknown name's decoy cost
        self._costs: list[int] = []  # the users' hash costs, in name order

    def load_now(self) -> None:
        """Blocking first load (before the reactor serves anyone); raises CredentialError."""
        self._apply(read_store(self.store, None))

    def _apply(self, result: Any) -> None:
        if result is None:
            return
        signature, users, found_keys, hmac_keys, tokens = result
        changed, self._loaded = self._loaded, True
        revoked = set(self.tokens) - set(tokens)
        self._signature, self.users, self.keys = signature, users, found_keys
        self.hmac_keys, self.tokens = hmac_keys, tokens
        self._costs = [c for c in (hash_cost(users[n].hash) for n in sorted(users))
                       if c is not None]
        if revoked and self.on_revoked is not None:
            self.on_revoked(revoked)
        log.info("{action} credentials: {users} user(s), {keys} SSH key(s)",
                 action="reloaded" if changed else "loaded", users=len(users),
                 keys=sum(map(len, found_keys.values())))
        if not users:
            log.warn("no users on file in {path}: password and key logins fail until "
                     "one is added (cmdserver useradd)", path=self.store.users_path)

    def reload(self) -> Deferred:
        """Reread the files in a thread if they changed; a bad file keeps the old view."""
        if self._reloading is not None:
            self._again = True
            return self._reloading
        d = self._run(read_store, self.store, self._signature)

        def failed(failure: Failure) -> None:
            if isinstance(failure.value, UnreadableStore):
                self._signature = failure.value.signature  # said once for this version
                log.error("credentials not reloaded, keeping the previous ones: {error}",
                          error=str(failure.value))
            else:
                log.failure("credentials not reloaded", failure)

        def done(_: Any) -> Deferred | None:
            self._reloading = None
            if self._again:
                self._again = False
                return self.reload()
            return None

        d.addCallbacks(self._apply, failed).addBoth(done)
        self._reloading = d if not d.called else None
        return d

    # -- what the portal asks -------------------------------------------

    def account(self, name: str) -> Account:
        """The realm's lookup: the account of a user on file."""
        record = self.users.get(name)
        if record is None:
            raise UnauthorizedLogin("no such user")
        return Account(record.name, record.roots)

    def hmac_key(self, name: str) -> bytes | None:
        """The user's own upload key, if they have one (else uploads use the server's)."""
        return self.hmac_keys.get(name)

    def check_token(self, name: str | None, token: bytes | str) -> str:
        """The user a token logs in as (``name``'s only, if given); UnauthorizedLogin
        for an unknown, expired or revoked token, or a token of another user.  A
        SHA-256 on the reactor thread: no bcrypt, no thread."""
        record = check_token(self.tokens, name, token)
        if record is None or record.user not in self.users:
            raise UnauthorizedLogin("bad token")
        return record.user

    def decoy_cost(self, name: str) -> int:
        """The bcrypt cost an unknown ``name`` is checked at.

        The cost of one of the users, picked from the name with a key chosen at
        start: a name always costs the same, and unknown names cost what the
        users' checks cost, in the same mix, however their costs differ from
        ``--bcrypt-cost`` and from each other.  With no users on file, the
        daemon's own cost."""
        if not self._costs:
            return self.cost
        digest = hmac.new(self._decoy_key, name.encode("utf-8", "surrogatepass"),
                          hashlib.sha256).digest()
        return self._costs[int.from_bytes(digest[:8], "big") % len(self._costs)]

    def check_password(self, name: str, password: bytes, run: Runner) -> Deferred:
        """Fires with True if ``name`` exists and ``password`` matches (bcrypt in a thread).

        A name that is not a user is checked against a decoy hash of the cost
        :meth:`decoy_cost` picks, so that it takes as long as a user's check."""
        record = self.users.get(name)
        hashed = record.hash if record is not None else decoy_hash(self.decoy_cost(name))

        def check() -> bool:
            return verify_password(password, hashed) and record is not None

        return run(check)


@implementer(ICredentialsChecker)
class BcryptChecker:
    """Username and password against the bcrypt hashes; at most ``concurrency`` at once.

    The others wait in a queue; a check cancelled while it waits (its client
    left) leaves the queue and never runs.  The bound keeps a flood of logins
    from taking every thread and CPU.  Credentials that come through the
    login gate carry a ticket (:class:`cmdserver.auth.gate.Ticket`), told when
    the check starts and when it is over.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, credentials: Credentials, run_in_thread: Runner | None = None,
                 concurrency: int = 2) -> None:
        self.credentials = credentials
        self._run = run_in_thread or threads.deferToThread
        self._semaphore = defer.DeferredSemaphore(concurrency)

    def requestAvatarId(self, credentials: Any) -> Deferred:
        ticket = getattr(credentials, "ticket", None)
        try:
            name = credentials.username.decode("utf-8")
        except (AttributeError, UnicodeDecodeError):
            if ticket is not None:
                ticket.finish()
            return defer.fail(UnauthorizedLogin())
        password = credentials.password
        if isinstance(password, str):
            password = password.encode("utf-8")
        if looks_like_token(password):  # an API token: a SHA-256, no bcrypt, no slot
            if ticket is not None:
                ticket.start()
            try:
                user = self.credentials.check_token(name, password)
            except UnauthorizedLogin:
                if ticket is not None:
                    ticket.finish(False)
                return defer.fail(UnauthorizedLogin())
            if ticket is not None:
                ticket.finish(True)
            return defer.succeed(user)
        slot = self._semaphore.acquire()
        # Cancelling the answer (the client left) takes a waiting check out of the
        # queue, but must not free the slot while bcrypt still runs in its thread,
        # or connect-login-disconnect loops would pass the bound.
        answer: Deferred = Deferred(lambda _: None if slot.called else slot.cancel())

        def check(_: Any) -> None:
            if ticket is not None:
                ticket.start()
            self.credentials.check_password(name, password, self._run).addBoth(deliver)

        def deliver(result: Any) -> None:
            self._semaphore.release()
            if ticket is not None:
                ticket.finish(result if isinstance(result, bool) else None)
            if not answer.called:
                answer.callback(result)  # a Failure goes down the errback chain
            elif isinstance(result, Failure):
                log.failure("password check failed", result)

        def not_run(failure: Failure) -> None:
            if ticket is not None:
                ticket.finish()
            failure.trap(defer.CancelledError)

        slot.addCallbacks(check, not_run)

        def result(ok: bool) -> str:
            if not ok:
                raise UnauthorizedLogin()
            return name

        return answer.addCallback(result)


class HashPool(Service):
    """The threads bcrypt runs in: ``size`` of its own, apart from the reactor's pool.

    File work uses the reactor's pool; logins cannot take its threads, and file
    work cannot hold up logins.  The pool starts with the first check and stops
    with the service (its threads are daemon threads, so a pool nobody stopped
    does not keep the process alive either).
    """

    name = "bcrypt-threads"

    def __init__(self, size: int = 2, reactor: Any = None) -> None:
        if reactor is None:
            from twisted.internet import reactor
        self.size = size
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=0, maxthreads=size, name="cmdserver-bcrypt")
        self.pool.threadFactory = _daemon_thread  # type: ignore[assignment]  # a class attribute

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred:
        if not self.pool.started:
            self.pool.start()
        return threads.deferToThreadPool(self.reactor, self.pool, f, *args)

    def stopService(self) -> Any:
        super().stopService()
        if self.pool.started:
            self.pool.stop()


def _daemon_thread(target: Callable[[], None], name: str | None = None) -> threading.Thread:
    """A bcrypt thread: a daemon thread, nicer than the reactor's (a login flood
    then slows logins, not every client's answers)."""
    return threading.Thread(target=background(target), name=name, daemon=True)


@implementer(IAuthorizedKeysDB)
class KeyDB:
    """Keys from ``<data-dir>/keys/<user>.pub``, as last loaded, for users on file."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials

    def getAuthorizedKeys(self, avatarId: bytes | str) -> list[keys.Key]:
        name = avatarId.decode("utf-8", "replace") if isinstance(avatarId, bytes) else avatarId
        if name not in self.credentials.users:
            return []
        return list(self.credentials.keys.get(name, ()))


def build_checkers(credentials: Credentials, run_in_thread: Runner | None = None,
                   concurrency: int = 2) -> list[ICredentialsChecker]:
    """The portal's checkers: bcrypt passwords (and API tokens given as passwords),
    API tokens alone (``Authorization: Bearer``) and SSH public keys."""
    return [BcryptChecker(credentials, run_in_thread, concurrency), TokenChecker(credentials),
            SSHPublicKeyChecker(KeyDB(credentials))]


class ReloadService(Service):
    """Polls the store's stat signature every ``interval`` seconds (0: never).

    :meth:`on_sighup` is for the service's SIGHUP hook (makeService adds it).
    """

    name = "credentials-reload"

    def __init__(self, credentials: Credentials, interval: float, clock: Any = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.credentials = credentials
        self.interval = interval
        self.clock = clock
        self._loop: task.LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        if self.interval > 0:
            self._loop = task.LoopingCall(self.credentials.reload)
            self._loop.clock = self.clock
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: log.failure("credentials polling stopped", f))

    def on_sighup(self) -> Deferred:
        log.info("SIGHUP: rereading the users file and keys")
        return self.credentials.reload()

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None


def open_credentials(data_dir: str, cost: int, core: Any, hashing: HashPool | None = None
                     ) -> tuple[Credentials, Portal]:
    """Start-up: first-run admin, first load, and the shared portal (blocking, once).

    Password checks run in ``hashing``'s threads (a pool of two of its own if
    none is given).  A broken users or key file stops the daemon with a
    one-line message.  The first-run admin's password goes to its 0600 file
    only, never to a log.
    """
    store = UserStore(data_dir)
    try:
        created = store.ensure_admin(cost)
        credentials = Credentials(store, core.in_thread, cost)
        credentials.load_now()
    except (CredentialError, OSError) as e:
        raise SystemExit(f"cmdserver: {e}") from None
    if created:
        log.warn("First run: created user admin; its password is in {path} (mode 0600). "
                 "Change it with: cmdserver passwd admin, then delete that file",
                 path=os.path.join(data_dir, INITIAL_PASSWORD_FILE))
    realm = Realm(credentials.account)
    hashing = hashing or HashPool(reactor=core.reactor)
    checkers = build_checkers(credentials, hashing.run, hashing.size)
    return credentials, build_portal(realm, checkers)
