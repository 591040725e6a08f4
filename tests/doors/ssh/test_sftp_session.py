"""The SFTP subsystem on a session channel, with the file work run by the test.

Each call the server makes to run work "in a thread" waits until the test
finishes it, in whatever order the test likes: that is how a real thread pool
may finish them.  Packets go in and come out as bytes, as over the wire.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any, cast

from twisted.conch.ssh import common, connection
from twisted.conch.ssh.filetransfer import (
    FX_BAD_MESSAGE,
    FX_FAILURE,
    FX_OK,
    FXF_CREAT,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    FXP_ATTRS,
    FXP_CLOSE,
    FXP_DATA,
    FXP_FSETSTAT,
    FXP_HANDLE,
    FXP_INIT,
    FXP_LSTAT,
    FXP_OPEN,
    FXP_READ,
    FXP_RENAME,
    FXP_STATUS,
    FXP_VERSION,
    FXP_WRITE,
)
from twisted.internet import defer, task
from twisted.trial import unittest

from cmdserver.auth.portal import Account
from cmdserver.commands.base import Registry
from cmdserver.commands.upload.spool import TEMP_RE
from cmdserver.core import CommandCore
from cmdserver.doors.ssh.door import (
    CmdServerConnection,
    CmdServerTransport,
    SSHAvatar,
    SSHSettings,
)
from cmdserver.doors.ssh.session import RefusingSSHSession
from cmdserver.doors.ssh.sftp import JailedFileTransferServer
from cmdserver.policy import Policy
from tests.helpers import OutsideTreeTempMixin

PUT = FXF_WRITE | FXF_CREAT | FXF_TRUNC


class HeldThreads:
    """``run_in_thread`` whose calls wait for the test to finish them."""

    def __init__(self) -> None:
        self.waiting: list[tuple[Callable[[], Any], defer.Deferred]] = []

    def __call__(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self.waiting.append((lambda: f(*args, **kwargs), d))
        return d

    def finish_newest_first(self) -> int:
        """Finish every call, the latest started first, until none waits; returns
        the most that were waiting at once."""
        most = 0
        while self.waiting:
            most = max(most, len(self.waiting))
            f, d = self.waiting.pop()
            try:
                result = f()
            except Exception:
                d.errback()
            else:
                d.callback(result)
        return most


class FakeSSHTransport:
    def __init__(self) -> None:
        self.packets: list[tuple[int, bytes]] = []

    def sendPacket(self, kind: int, data: bytes) -> None:
        self.packets.append((kind, data))


def sftp_packet(kind: int, request_id: int, payload: bytes) -> bytes:
    body = struct.pack("!BL", kind, request_id) + payload
    return struct.pack("!L", len(body)) + body


class SFTPSessionTest(OutsideTreeTempMixin, unittest.TestCase):
    """An sftp subsystem on a RefusingSSHSession on a connection that records packets."""

    def setUp(self) -> None:
        self.root = os.path.realpath(self.mktemp())
        os.makedirs(self.root)
        self.payload = os.urandom(5 * 32768)
        with open(os.path.join(self.root, "big.bin"), "wb") as f:
            f.write(self.payload)
        self.threads = HeldThreads()
        policy = Policy([self.root])
        core = CommandCore(Registry(), policy, task.Clock(), run_in_thread=self.threads)
        avatar = SSHAvatar(core, Account("ops"), SSHSettings(temp_run_id="0123abcd"))
        self.conn = CmdServerConnection()
        self.ssh_transport = FakeSSHTransport()
        self.conn.transport = cast(CmdServerTransport, self.ssh_transport)
        self.channel = RefusingSSHSession(conn=self.conn, avatar=avatar)
        self.channel.id = 0  # type: ignore[assignment]  # conch types it by its None default
        self.conn.channels[0] = self.channel
        self.conn.channelsToRemoteChannel[self.channel] = 7
        self.conn.localToRemoteChannel[0] = 7
        self.channel.remoteWindowLeft = 1 << 30
        self.channel.remoteMaxPacket = 1 << 20
        # OpenSSH's sftp and scp send LANG first: a session object exists.
        self.channel.requestReceived(b"env", common.NS(b"LANG") + common.NS(b"C.UTF-8"))
        self.assertTrue(self.channel.requestReceived(b"subsystem", common.NS(b"sftp")))
        assert self.channel.client is not None
        self.server = getattr(self.channel.client.transport, "proto", None)  # conch's wrapper
        self.assertIsInstance(self.server, JailedFileTransferServer)
        self.send(struct.pack("!LBL", 5, FXP_INIT, 3))
        self.next_id = 1
        self.read_at = 0

    # -- the client's side ----------------------------------------------------

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    def request(self, kind: int, payload: bytes) -> int:
        request_id, self.next_id = self.next_id, self.next_id + 1
        self.send(sftp_packet(kind, request_id, payload))
        return request_id

    def open(self, name: bytes, flags: int) -> bytes:
        self.request(FXP_OPEN, common.NS(name) + struct.pack("!LL", flags, 0))
        self.threads.finish_newest_first()
        kind, _, payload = self.replies()[-1]
        self.assertEqual(kind, FXP_HANDLE)
        return common.getNS(payload)[0]

    def output(self) -> bytes:
        return b"".join(common.getNS(data[4:])[0] for kind, data in self.ssh_transport.packets
                        if kind == connection.MSG_CHANNEL_DATA)

    def replies(self) -> list[tuple[int, int, bytes]]:
        """Every SFTP reply so far but VERSION: (type, request id, payload)."""
        out, replies = self.output(), []
        while out:
            (length,) = struct.unpack("!L", out[:4])
            body, out = out[4:4 + length], out[4 + length:]
            if body[0] != FXP_VERSION:
                replies.append((body[0], struct.unpack("!L", body[1:5])[0], body[5:]))
        return replies

    def statuses(self) -> list[tuple[int, int]]:
        return [(request_id, struct.unpack("!L", payload[:4])[0])
                for kind, request_id, payload in self.replies() if kind == FXP_STATUS]

    def channel_events(self) -> list[Any]:
        """The channel requests, EOF and close the server sent, in order."""
        events: list[Any] = []
        for kind, data in self.ssh_transport.packets:
            if kind == connection.MSG_CHANNEL_REQUEST:
                name, rest = common.getNS(data[4:])
                events.append((name.decode(), struct.unpack(">L", rest[1:5])[0]))
            elif kind == connection.MSG_CHANNEL_CLOSE:
                events.append("close")
        return events

    def eof(self) -> None:
        self.conn.ssh_CHANNEL_EOF(struct.pack(">L", 0))

    def temps(self) -> list[str]:
        return [n for n in os.listdir(self.root) if TEMP_RE.match(n)]

    # -- tests ------------------------------------------------------------------

    def test_reads_are_answered_in_order_whatever_order_the_threads_finish(self) -> None:
        # OpenSSH 9.2's scp cuts a download at the first reply out of order.
        handle = self.open(b"big.bin", FXF_READ)
        reads = [self.request(FXP_READ, common.NS(handle) + struct.pack("!QL", offset, 32768))
                 for offset in range(0, len(self.payload), 32768)]
        self.assertEqual(self.threads.finish_newest_first(), 1)  # one at a time
        data = [(request_id, common.getNS(payload)[0])
                for kind, request_id, payload in self.replies() if kind == FXP_DATA]
        self.assertEqual([request_id for request_id, _ in data], reads)
        self.assertEqual(b"".join(chunk for _, chunk in data), self.payload)

    def test_eof_waits_for_the_requests_before_it_then_exit_status_0(self) -> None:
        handle = self.open(b"up.bin", PUT)
        writes = [self.request(FXP_WRITE, common.NS(handle) + struct.pack("!Q", offset)
                               + common.NS(self.payload[offset:offset + 32768]))
                  for offset in range(0, len(self.payload), 32768)]
        # scp's in-place upload sends the size it wrote, then close.
        size = self.request(FXP_FSETSTAT, common.NS(handle)
                            + struct.pack("!LQ", 1, len(self.payload)))
        close = self.request(FXP_CLOSE, common.NS(handle))
        self.eof()  # at once, before any answer
        self.assertEqual(self.channel_events(), [])  # nothing answered yet: no end
        self.threads.finish_newest_first()
        self.assertEqual(self.statuses(), [(i, FX_OK) for i in [*writes, size, close]])
        self.assertEqual(self.channel_events(), [("exit-status", 0), "close"])
        with open(os.path.join(self.root, "up.bin"), "rb") as f:
            self.assertEqual(f.read(), self.payload)
        self.assertEqual(self.temps(), [])

    def test_eof_drops_an_upload_the_client_did_not_close(self) -> None:
        handle = self.open(b"up.bin", PUT)
        write = self.request(FXP_WRITE, common.NS(handle) + struct.pack("!Q", 0)
                             + common.NS(b"partial"))
        self.eof()
        self.threads.finish_newest_first()
        self.assertEqual(self.statuses(), [(write, FX_OK)])
        self.assertEqual(self.channel_events(), [("exit-status", 0), "close"])
        self.threads.finish_newest_first()  # the clean-up of the abandoned upload
        self.assertEqual(sorted(os.listdir(self.root)), ["big.bin"])

    def test_eof_with_nothing_in_flight_ends_at_once(self) -> None:
        self.eof()
        self.assertEqual(self.channel_events(), [("exit-status", 0), "close"])

    def test_eof_after_a_stat_that_conch_hands_on(self) -> None:
        # conch's LSTAT calls its STAT: still one request, one reply.
        lstat = self.request(FXP_LSTAT, common.NS(b"big.bin"))
        self.eof()
        self.assertEqual(self.channel_events(), [])
        self.threads.finish_newest_first()
        self.assertEqual([(kind, i) for kind, i, _ in self.replies()], [(FXP_ATTRS, lstat)])
        self.assertEqual(self.channel_events(), [("exit-status", 0), "close"])

    def test_a_malformed_request_is_answered_and_does_not_hold_the_end(self) -> None:
        # conch fails on a READ of an unknown handle without answering it.
        bad = self.request(FXP_READ, common.NS(b"nosuch") + struct.pack("!QL", 0, 10))
        self.flushLoggedErrors(AttributeError)
        self.assertEqual(self.statuses(), [(bad, FX_BAD_MESSAGE)])
        self.eof()
        self.assertEqual(self.channel_events(), [("exit-status", 0), "close"])

    def test_closing_the_channel_first_aborts_open_uploads(self) -> None:
        handle = self.open(b"up.bin", PUT)
        self.request(FXP_WRITE, common.NS(handle) + struct.pack("!Q", 0) + common.NS(b"x"))
        self.conn.ssh_CHANNEL_CLOSE(struct.pack(">L", 0))  # no EOF: the client went away
        self.threads.finish_newest_first()
        self.assertEqual(sorted(os.listdir(self.root)), ["big.bin"])
        self.assertNotIn(("exit-status", 0), self.channel_events())

    def test_only_version_3_status_codes(self) -> None:
        # Renaming onto an existing name: "file exists", as FX_FAILURE (4), not
        # FILE_ALREADY_EXISTS (11), which v3 clients show as "Unknown status".
        with open(os.path.join(self.root, "other.bin"), "wb") as f:
            f.write(b"x")
        request_id = self.request(FXP_RENAME, common.NS(b"big.bin") + common.NS(b"other.bin"))
        self.threads.finish_newest_first()
        [(kind, answered, payload)] = [r for r in self.replies() if r[1] == request_id]
        self.assertEqual((kind, answered), (FXP_STATUS, request_id))
        code = struct.unpack("!L", payload[:4])[0]
        self.assertEqual(code, FX_FAILURE)
        self.assertIn(b"file exists", common.getNS(payload[4:])[0])
