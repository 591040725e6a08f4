"""The SFTP subsystem on a session channel, with the file work run by the test.

Each call the server makes to run work "in a thread" waits until the test
finishes it, in whatever order the test likes: that is how a real thread pool
may finish them.  Packets go in and come out as bytes, as over the wire.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any

from twisted.conch.ssh import common, connection
from twisted.conch.ssh.filetransfer import (
    FXF_CREAT,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    FXP_DATA,
    FXP_HANDLE,
    FXP_INIT,
    FXP_OPEN,
    FXP_READ,
    FXP_VERSION,
)
from twisted.internet import defer, task
from twisted.trial import unittest

from cmdserver.auth import Account
from cmdserver.commands.base import Registry
from cmdserver.core import CommandCore
from cmdserver.doors.sftp import JailedFileTransferServer
from cmdserver.doors.ssh import CmdServerConnection, SSHAvatar, SSHSettings
from cmdserver.doors.ssh_session import RefusingSSHSession
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
        self.conn.transport = FakeSSHTransport()
        self.channel = RefusingSSHSession(conn=self.conn, avatar=avatar)
        self.channel.id = 0
        self.conn.channels[0] = self.channel
        self.conn.channelsToRemoteChannel[self.channel] = 7
        self.conn.localToRemoteChannel[0] = 7
        self.channel.remoteWindowLeft = 1 << 30
        self.channel.remoteMaxPacket = 1 << 20
        # OpenSSH's sftp and scp send LANG first: a session object exists.
        self.channel.requestReceived(b"env", common.NS(b"LANG") + common.NS(b"C.UTF-8"))
        self.assertTrue(self.channel.requestReceived(b"subsystem", common.NS(b"sftp")))
        self.server = self.channel.client.transport.proto
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
        return b"".join(common.getNS(data[4:])[0] for kind, data in self.conn.transport.packets
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
