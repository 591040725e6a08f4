"""``upload`` with its MAC after the content, on every door that takes it.

The line door (StringTransport), ``ssh HOST upload …`` (an exec session on a fake
channel) and PB (brokers joined by an iosim pump) drive the real upload engine:
its worker threads, the global reactor.  Each case is asked of every door and
must end the same way there: the same answer, or the same one-line error and
nothing left behind.  The endings only a byte stream has (a trailer line that is
not one, a stream that ends early) are asked of the two text doors; PB's own
(``close()`` without the MAC) of PB.  HTTP keeps the MAC in its header
(tests/doors/http/test_files.py).
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Generator
from typing import Any

from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.internet import reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.testing import StringTransport
from twisted.spread import pb
from twisted.test import iosim
from twisted.trial import unittest

from cmdserver.auth.portal import Account, Realm, build_portal
from cmdserver.commands.upload.engine import UploadSettings
from cmdserver.commands.upload.spool import PARALLEL_MIN
from cmdserver.doors.line.protocol import LineProtocol, LineSettings
from cmdserver.doors.pb.door import pb_factory
from cmdserver.doors.pb.upload import consumer_starter
from cmdserver.doors.ssh.avatar import SSHAvatar, SSHSettings
from cmdserver.doors.ssh.session import CommandSession
from tests.doors.test_command_contract import FakeChannel
from tests.helpers import capture_audit, commands_audited
from tests.helpers.upload import KEY, leftovers, listing, make_core, temp_dir, wait_until

DATA = os.urandom(300_000)
LARGE = os.urandom(PARALLEL_MIN + 4321)  # hashed in the engine's own thread
HMAC = hmac.new(KEY, DATA, hashlib.sha256).hexdigest()
B2 = hashlib.blake2b(DATA, key=KEY, digest_size=32).hexdigest()


def mac(data: bytes) -> str:
    return hmac.new(KEY, data, hashlib.sha256).hexdigest()


# (content, options on the text doors, PB's named values, the MAC sent, the outcome)
CASES: list[tuple[bytes, str, dict[str, Any], str, str]] = [
    (DATA, "", {}, HMAC, f"Upload OK t.bin {len(DATA)} mac=hmac-sha256:{HMAC}"),
    (LARGE, "", {}, mac(LARGE), f"Upload OK t.bin {len(LARGE)} mac=hmac-sha256:{mac(LARGE)}"),
    (DATA, " --sha256", {"sha256": True}, HMAC,
     f"Upload OK t.bin {len(DATA)} mac=hmac-sha256:{HMAC} "
     f"sha256={hashlib.sha256(DATA).hexdigest()}"),
    (DATA, " --mac blake2b", {"mac": "blake2b"}, B2,
     f"Upload OK t.bin {len(DATA)} mac=blake2b:{B2}"),
    (b"", "", {}, mac(b""), f"Upload OK t.bin 0 mac=hmac-sha256:{mac(b'')}"),
    (DATA, "", {}, "0" * 64, "Error: HMAC mismatch, upload discarded"),
    (LARGE, "", {}, mac(DATA), "Error: HMAC mismatch, upload discarded"),
    (DATA, " --mac blake2b", {"mac": "blake2b"}, HMAC,
     "Error: MAC mismatch (blake2b), upload discarded"),
    (DATA, "", {}, HMAC[:-2], "Error: the MAC must be 64 hex digits, upload discarded"),
    (DATA, "", {}, HMAC[:-1] + "g", "Error: the MAC must be 64 hex digits, upload discarded"),
    (DATA, " --mac md5", {"mac": "md5"}, HMAC,
     "Error: mac must be one of hmac-sha256, blake2b, not 'md5'"),
]

# The answers to a line in the trailer's place that is not ``MAC <64 hex digits>``.
NOT_A_TRAILER = ("Error: expected the trailer line ", "Error: the MAC must be 64 hex digits",
                 "Error: extra bytes after the MAC in the trailer line")


class UploadParityTests(unittest.TestCase):
    def setUp(self) -> None:
        self.root = temp_dir(self)
        self.core, self.uploads = make_core(self.root)

    def tearDown(self) -> Any:
        return wait_until(lambda: not self.uploads.active)

    @inlineCallbacks
    def settled(self) -> Generator[Deferred[Any], Any, None]:
        """No upload left in flight; nothing but the published file on disk."""
        yield wait_until(lambda: not self.uploads.active)
        self.assertEqual(leftovers(self.root), [])

    def reset(self) -> None:
        for name in listing(self.root):
            os.unlink(os.path.join(self.root, name))

    # -- the doors -----------------------------------------------------------

    @inlineCallbacks
    def line(self, data: bytes, options: str, ending: bytes,
             eof: bool = False) -> Generator[Deferred[Any], Any, list[str]]:
        """The lines the line door answers; ``ending`` follows the content."""
        protocol = LineProtocol(self.core, LineSettings(greeting="", idle_timeout=0))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        protocol.makeConnection(transport)
        self.addCleanup(lambda: protocol.connectionLost(None) if protocol._connected else None)

        def lines() -> list[str]:
            return transport.value().decode().splitlines()

        protocol.dataReceived(f"upload t.bin {len(data)} -{options}\n".encode())
        yield wait_until(lambda: bool(lines()))
        if lines()[0].startswith("Ready for "):
            protocol.dataReceived(data + ending)
            if eof:
                protocol.readConnectionLost()
                yield wait_until(lambda: len(lines()) == 2)
            else:
                protocol.dataReceived(b"ping\n")  # the stream goes on after the upload
                yield wait_until(lambda: len(lines()) >= 2)
                if lines()[1].startswith(NOT_A_TRAILER):
                    # Out of step: nothing after that line runs, the connection closes.
                    self.assertTrue(transport.disconnecting, lines())
                    self.assertEqual(len(lines()), 2)
                else:
                    yield wait_until(lambda: len(lines()) == 3)
                    self.assertEqual(lines()[2], "pong")
        return lines()[:2]

    @inlineCallbacks
    def ssh(self, data: bytes, options: str, ending: bytes,
            eof: bool = True) -> Generator[Deferred[Any], Any, list[str]]:
        """``ssh HOST upload t.bin SIZE - < content+ending``: stdout then stderr lines."""
        session = CommandSession(SSHAvatar(self.core, Account("ops"), SSHSettings()))
        channel = FakeChannel()
        session.execCommand(channel, f"upload t.bin {len(data)} -{options}".encode())
        yield wait_until(lambda: bool(channel.out or channel.err))
        if channel.out.startswith(b"Ready for "):
            session.input_received(data + ending)
            if eof:
                session.eofReceived()
        yield wait_until(lambda: channel.status is not None)
        return (channel.out + channel.err).decode().splitlines()

    @inlineCallbacks
    def pb(self, data: bytes, named: dict[str, Any],
           close: tuple[Any, ...]) -> Generator[Deferred[Any], Any, list[str]]:
        """``upload(…, "-")``, the writes, ``close(*close)``: the answer as the text
        doors print it."""
        portal = build_portal(Realm(), [InMemoryUsernamePasswordDatabaseDontUse(ops=b"pw")])
        server = pb_factory(self.core, portal, upload=consumer_starter(self.uploads.begin))
        client = pb.PBClientFactory()
        addr = IPv4Address("TCP", "127.0.0.1", 4321)
        _, _, pump = iosim.connectedServerAndClient(
            lambda: server.buildProtocol(addr), lambda: client.buildProtocol(addr))

        @inlineCallbacks
        def pumped(d: Deferred) -> Generator[Deferred[Any], Any, Any]:
            while not d.called:
                pump.flush()
                yield task.deferLater(reactor, 0.002, lambda: None)
            return (yield d)

        root = yield pumped(client.getRootObject())
        avatar = yield pumped(root.callRemote("authenticate", "ops", "pw"))
        try:
            writer = yield pumped(avatar.callRemote("upload", "t.bin", len(data), "-",
                                                    **named))
            for i in range(0, len(data), 65536):
                yield pumped(writer.callRemote("write", data[i:i + 65536]))
            result = yield pumped(writer.callRemote("close", *close))
        except (pb.Error, pb.RemoteError) as e:  # the door's errors; the engine's refusals
            return [f"Error: {e}"]
        sha = f" sha256={result['sha256']}" if result["sha256"] is not None else ""
        return [f"Upload OK {result['name']} {result['size']} mac={result['mac']}{sha}"]

    # -- the cases -------------------------------------------------------------

    @inlineCallbacks
    def test_every_case_ends_the_same_on_every_door(self) -> Generator[Deferred[Any], Any, None]:
        for data, options, named, mac_hex, outcome in CASES:
            trailer = f"MAC {mac_hex}\n".encode()
            refused_before_ready = "must be one of" in outcome
            ready = [] if refused_before_ready else [f"Ready for {len(data)} bytes"]
            for door in ("line", "ssh", "pb"):
                if door == "line":
                    lines = yield self.line(data, options, trailer)
                elif door == "ssh":
                    lines = yield self.ssh(data, options, trailer)
                else:
                    lines = yield self.pb(data, named, (mac_hex,))
                expected = [*ready, outcome] if door != "pb" else [outcome]
                self.assertEqual(lines, expected, (door, options, mac_hex))
                yield self.settled()
                wanted = ["t.bin"] if outcome.startswith("Upload OK") else []
                self.assertEqual(listing(self.root), wanted, (door, outcome))
                if wanted:
                    with open(os.path.join(self.root, "t.bin"), "rb") as f:
                        self.assertEqual(f.read(), data)
                self.reset()

    @inlineCallbacks
    def test_the_audit_record_names_the_mac_on_every_door(
            self) -> Generator[Deferred[Any], Any, None]:
        events = capture_audit(self)
        trailer = f"MAC {B2}\n".encode()
        for door in ("line", "ssh", "pb"):
            if door == "line":
                lines = yield self.line(DATA, " --mac blake2b", trailer)
            elif door == "ssh":
                lines = yield self.ssh(DATA, " --mac blake2b", trailer)
            else:
                lines = yield self.pb(DATA, {"mac": "blake2b"}, (B2,))
            self.assertTrue(lines[-1].startswith("Upload OK"), (door, lines))
            yield self.settled()
            self.reset()
        records = [(e["door"], e["outcome"], e["args"]) for e in commands_audited(events)
                   if e["command"] == "upload"]
        args = {"name": "t.bin", "size": len(DATA), "mac": "blake2b"}
        self.assertEqual(records, [("line", "ok", args), ("ssh", "ok", args),
                                   ("pb", "ok", args)])

    @inlineCallbacks
    def test_a_mac_the_server_does_not_take_is_refused_on_every_door(
            self) -> Generator[Deferred[Any], Any, None]:
        self.uploads.settings = UploadSettings(macs=("hmac-sha256",))
        refusal = ("Error: MAC blake2b is not accepted here (this server accepts: "
                   "hmac-sha256)")
        trailer = f"MAC {B2}\n".encode()
        self.assertEqual((yield self.line(DATA, " --mac blake2b", trailer)), [refusal])
        self.assertEqual((yield self.ssh(DATA, " --mac blake2b", trailer)), [refusal])
        self.assertEqual((yield self.pb(DATA, {"mac": "blake2b"}, (B2,))), [refusal])
        yield self.settled()
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_a_key_too_long_for_blake2b_is_refused_not_replaced(
            self) -> Generator[Deferred[Any], Any, None]:
        self.uploads.server_key = b"k" * 65
        refusal = ("Error: MAC blake2b takes a key of at most 64 bytes; this key is "
                   "longer: use hmac-sha256")
        self.assertEqual((yield self.line(DATA, " --mac blake2b", b"")), [refusal])
        self.assertEqual((yield self.pb(DATA, {"mac": "blake2b"}, (B2,))), [refusal])
        yield self.settled()
        self.assertEqual(listing(self.root), [])

    # -- what only a byte stream has: the text doors -------------------------------

    @inlineCallbacks
    def test_bad_trailer_lines_on_the_text_doors(self) -> Generator[Deferred[Any], Any, None]:
        expected = "Error: expected the trailer line 'MAC <64 hex digits>' after the content"
        cases = [
            (b"ping\n", f"{expected}, upload discarded"),  # the next command, no trailer
            (f"xMAC {HMAC}\n".encode(), f"{expected}, upload discarded"),  # SIZE + 1 bytes
            (f"HMAC {HMAC}\n".encode(), f"{expected}, upload discarded"),
            (f"MAC {HMAC} x\n".encode(),
             "Error: extra bytes after the MAC in the trailer line, upload discarded"),
            (f"MAC {HMAC}{HMAC}\n".encode(),
             "Error: extra bytes after the MAC in the trailer line, upload discarded"),
            (b"MAC \n", "Error: the MAC must be 64 hex digits, upload discarded"),
            (b"x" * 5000 + b"\n", None),  # too long for a line: see below
        ]
        for ending, outcome in cases:
            if outcome is not None:
                lines = yield self.line(DATA, "", ending)
                self.assertEqual(lines, [f"Ready for {len(DATA)} bytes", outcome], ending)
                yield self.settled()
                self.assertEqual(listing(self.root), [])
            lines = yield self.ssh(DATA, "", ending)
            self.assertEqual(lines[0], f"Ready for {len(DATA)} bytes")
            self.assertEqual(lines[1:], [outcome or f"{expected}, upload discarded"], ending)
            yield self.settled()
            self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_a_stream_that_ends_before_the_trailer(self) -> Generator[Deferred[Any], Any, None]:
        ready = f"Ready for {len(DATA)} bytes"
        lines = yield self.line(DATA, "", b"", eof=True)
        self.assertEqual(lines, [ready, "Error: upload incomplete: the client closed the "
                                        "stream before the MAC trailer"])
        yield self.settled()
        lines = yield self.ssh(DATA, "", b"")
        self.assertEqual(lines, [ready, "Error: upload incomplete: the input ended before "
                                        "the MAC trailer, upload discarded"])
        yield self.settled()
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_a_trailer_without_its_newline_counts_at_the_end(
            self) -> Generator[Deferred[Any], Any, None]:
        ok = f"Upload OK t.bin {len(DATA)} mac=hmac-sha256:{HMAC}"
        lines = yield self.line(DATA, "", f"MAC {HMAC}".encode(), eof=True)
        self.assertEqual(lines[1], ok)
        yield self.settled()
        self.reset()
        lines = yield self.ssh(DATA, "", f"MAC {HMAC}\r".encode())
        self.assertEqual(lines[1], ok)

    @inlineCallbacks
    def test_ssh_bytes_after_the_trailer_discard_the_upload(
            self) -> Generator[Deferred[Any], Any, None]:
        for ending in (f"MAC {HMAC}\nping\n".encode(), f"MAC {HMAC}\n\n".encode()):
            lines = yield self.ssh(DATA, "", ending)
            self.assertEqual(lines[1:], ["Error: extra bytes after the MAC trailer, "
                                         "upload discarded"])
            yield self.settled()
            self.assertEqual(listing(self.root), [])

    # -- PB's own endings --------------------------------------------------------------

    @inlineCallbacks
    def test_pb_close_must_carry_the_mac_of_a_trailer_upload(
            self) -> Generator[Deferred[Any], Any, None]:
        for close, message in [
                ((), "the MAC is missing: close(MAC) ends an upload whose MAC follows "
                     "the content, upload discarded"),
                ((b"\xab" * 32,), "the MAC must be 64 hex digits, upload discarded"),
                (("ab" * 33,), "the MAC must be 64 hex digits, upload discarded")]:
            self.assertEqual((yield self.pb(DATA, {}, close)), [f"Error: {message}"])
            yield self.settled()
            self.assertEqual(listing(self.root), [])

