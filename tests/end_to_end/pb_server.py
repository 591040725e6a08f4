"""A real cmdserver with a PB door on loopback port 0, for the PB end-to-end tests.

Also a small file upload engine for the PB writer seam: bytes go to a
temporary file in the target directory, the HMAC (given with the request, or
to ``finish`` when it follows the content) is checked on finish and the file
renamed into place only if it matches.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tempfile
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import defer
from twisted.internet.defer import Deferred

from cmdserver.auth.gate import GateSettings
from cmdserver.auth.portal import Account
from cmdserver.commands import default_registry
from cmdserver.commands.base import Context
from cmdserver.commands.lastlog import LogSource
from cmdserver.core import CommandCore
from cmdserver.doors.pb.door import pb_factory
from cmdserver.errors import CommandError
from cmdserver.policy import Policy
from cmdserver.service import CmdServerService, Limits

KEY = b"k" * 32
USERS = {"ops": "s3cret", "jailed": "pw2"}


class FileEngine:
    """Streams into a temp file beside the target; renames it in place on a good HMAC."""

    def __init__(self, target: str, size: int, mac_hex: str, key: bytes,
                 sha256: bool = False) -> None:
        self.target = target
        self.size = size
        self.expected = mac_hex
        self.trailer = mac_hex == "-"
        self.want_sha256 = sha256 or not self.trailer
        self.mac = hmac.new(key, digestmod=hashlib.sha256)
        self.sha = hashlib.sha256()
        fd, self.temp = tempfile.mkstemp(prefix=".upload-", dir=os.path.dirname(target))
        self.file = os.fdopen(fd, "wb")
        self.events: list[str] = []

    def feed(self, chunk: bytes) -> None:
        self.mac.update(chunk)
        self.sha.update(chunk)
        self.file.write(chunk)

    def finish(self, mac: bytes | None = None) -> Deferred:
        self.events.append("finish")
        self.file.close()
        expected = mac.hex() if mac is not None else self.expected
        if not hmac.compare_digest(self.mac.hexdigest(), expected):
            os.unlink(self.temp)
            return defer.fail(CommandError("HMAC mismatch, upload discarded"))
        os.rename(self.temp, self.target)
        name = os.path.basename(self.target)
        sha256 = self.sha.hexdigest() if self.want_sha256 else None
        if self.trailer:
            return defer.succeed({"name": name, "size": self.size,
                                  "mac": f"hmac-sha256:{expected}", "sha256": sha256})
        return defer.succeed({"name": name, "size": self.size, "sha256": sha256})

    def abort(self) -> None:
        self.events.append("abort")
        self.file.close()
        if os.path.exists(self.temp):
            os.unlink(self.temp)


class FileEngines:
    """The upload starter: refuses names outside the jail and existing targets."""

    def __init__(self) -> None:
        self.started: list[FileEngine] = []

    def __call__(self, ctx: Context, name: str, size: int, mac_hex: str,
                 algorithm: str = "hmac-sha256", sha256: bool = False) -> Deferred:
        if algorithm != "hmac-sha256":
            return defer.fail(CommandError(f"MAC {algorithm} is not accepted here "
                                           "(this server accepts: hmac-sha256)"))
        try:
            target = ctx.policy.jail.real_path(name)
        except (CommandError, OSError) as e:
            return defer.fail(e)
        if os.path.exists(target):
            return defer.fail(CommandError(f"target exists: {name}"))
        engine = FileEngine(target, size, mac_hex, KEY, sha256)
        self.started.append(engine)
        return defer.succeed(engine)


class PBServer:
    """Core + service + PB door on 127.0.0.1:0, started; ``port`` once listening."""

    def __init__(self, root: str, log_file: str, anonymous: bool = False,
                 jailed_root: str | None = None, max_clients: int = 20) -> None:
        from twisted.internet import reactor

        self.root = root
        registry = default_registry(LogSource(log_file))
        # Loopback is exempt from login penalties here: these tests are about PB, and
        # tests/end_to_end/test_login_gate_e2e.py about the penalties.
        self.core = CommandCore(registry, Policy([root]), reactor,
                                gate=GateSettings(exempt=("127.0.0.0/8",)))
        self.service = CmdServerService(self.core, Limits(max_clients=max_clients, max_per_ip=20))
        lookup = {"jailed": (jailed_root,)} if jailed_root else {}

        self.service.realm.lookup = lambda name: Account(name, lookup.get(name))
        self.service.portal.registerChecker(InMemoryUsernamePasswordDatabaseDontUse(
            **{u: p.encode() for u, p in USERS.items()}))
        self.uploads = FileEngines()
        factory = pb_factory(self.core, self.service.portal, anonymous, self.uploads)
        self.door = self.service.add_door("pb", "tcp:0:interface=127.0.0.1", factory)
        self.port = 0

    @defer.inlineCallbacks
    def start(self) -> Any:
        self.service.startService()
        listening = yield self.door.listening
        self.port = listening.getHost().port

    def stop(self) -> Deferred:
        return defer.maybeDeferred(self.service.stopService)
