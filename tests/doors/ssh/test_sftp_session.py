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
    FILEXFER_ATTR_PERMISSIONS,
    FX_BAD_MESSAGE,
    FX_FAILURE,
    FX_NO_SUCH_FILE,
    FX_OK,
    FX_OP_UNSUPPORTED,
    FX_PERMISSION_DENIED,
    FXF_CREAT,
    FXF_READ,
    FXF_TRUNC,
    FXF_WRITE,
    FXP_ATTRS,
    FXP_CLOSE,
    FXP_DATA,
    FXP_EXTENDED,
    FXP_EXTENDED_REPLY,
    FXP_FSETSTAT,
    FXP_HANDLE,
    FXP_INIT,
    FXP_LSTAT,
    FXP_MKDIR,
    FXP_OPEN,
    FXP_OPENDIR,
    FXP_READ,
    FXP_READLINK,
    FXP_REALPATH,
    FXP_REMOVE,
    FXP_RENAME,
    FXP_RMDIR,
    FXP_SETSTAT,
    FXP_STAT,
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
from cmdserver.doors.ssh.sftp import JailedFileTransferServer, status_message
from cmdserver.doors.ssh.sftp_files import MAX_PACKET, MAX_READ, MAX_WRITE
from cmdserver.policy import Policy
from tests.helpers import OutsideTreeTempMixin, capture_audit

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


class SFTPSessionBase(OutsideTreeTempMixin, unittest.TestCase):
    """An sftp subsystem on a RefusingSSHSession on a connection that records packets;
    with ``several_roots``, the jail has a second root beside ``root``."""

    several_roots = False

    def setUp(self) -> None:
        self.root = os.path.realpath(self.mktemp())
        os.makedirs(self.root)
        roots = [self.root]
        if self.several_roots:
            roots.append(os.path.realpath(self.mktemp()))
            os.makedirs(roots[1])
        self.payload = os.urandom(5 * 32768)
        with open(os.path.join(self.root, "big.bin"), "wb") as f:
            f.write(self.payload)
        self.threads = HeldThreads()
        policy = Policy(roots)
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

    def version(self) -> tuple[int, dict[bytes, bytes]]:
        """The VERSION packet: the version and the extensions it names."""
        out = self.output()
        (length,) = struct.unpack("!L", out[:4])
        body = out[4:4 + length]
        self.assertEqual(body[0], FXP_VERSION)
        (version,), data, extensions = struct.unpack("!L", body[1:5]), body[5:], {}
        while data:
            name, data = common.getNS(data)
            extensions[name], data = common.getNS(data)
        return version, extensions

    def extended(self, name: bytes, payload: bytes = b"") -> tuple[int, bytes]:
        """Send an extension request and finish its work: (reply type, payload)."""
        request_id = self.request(FXP_EXTENDED, common.NS(name) + payload)
        self.threads.finish_newest_first()
        [(kind, _, data)] = [r for r in self.replies() if r[1] == request_id]
        return kind, data

    def status_of(self, reply: tuple[int, bytes]) -> tuple[int, bytes]:
        kind, data = reply
        self.assertEqual(kind, FXP_STATUS)
        return struct.unpack("!L", data[:4])[0], common.getNS(data[4:])[0]

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



class SFTPSessionTest(SFTPSessionBase):

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

    def test_a_packet_of_a_kind_not_served_is_answered_unsupported(self) -> None:
        """A reply's kind (STATUS) or one no version defines gets OP_UNSUPPORTED in
        its turn, with no error logged, and the session goes on and ends cleanly."""
        reply_kind = self.request(FXP_STATUS, struct.pack("!L", 0))
        unknown = self.request(250, b"whatever")
        stat = self.request(FXP_STAT, common.NS(b"big.bin"))
        self.threads.finish_newest_first()
        self.assertEqual([(kind, i) for kind, i, _ in self.replies()],
                         [(FXP_STATUS, reply_kind), (FXP_STATUS, unknown), (FXP_ATTRS, stat)])
        self.assertEqual(self.statuses(), [(reply_kind, FX_OP_UNSUPPORTED),
                                           (unknown, FX_OP_UNSUPPORTED)])
        self.assertEqual(self.flushLoggedErrors(), [])
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


class SFTPExtensionsTest(SFTPSessionBase):
    """OpenSSH's extensions (its PROTOCOL file, section 4), on the wire."""

    def test_the_version_names_the_extensions_it_serves(self) -> None:
        self.assertEqual(self.version(), (3, {
            b"posix-rename@openssh.com": b"1", b"statvfs@openssh.com": b"2",
            b"fstatvfs@openssh.com": b"2", b"fsync@openssh.com": b"1",
            b"limits@openssh.com": b"1"}))

    def test_limits_are_the_servers(self) -> None:
        kind, data = self.extended(b"limits@openssh.com")
        self.assertEqual(kind, FXP_EXTENDED_REPLY)
        self.assertEqual(struct.unpack("!4Q", data), (MAX_PACKET, MAX_READ, MAX_WRITE, 64))
        # A read of more is answered with MAX_READ bytes.
        with open(os.path.join(self.root, "big.bin"), "wb") as f:
            f.write(os.urandom(MAX_PACKET * 2))
        handle = self.open(b"big.bin", FXF_READ)
        self.request(FXP_READ, common.NS(handle) + struct.pack("!QL", 0, MAX_PACKET * 2))
        self.threads.finish_newest_first()
        kind, _, payload = self.replies()[-1]
        self.assertEqual((kind, len(common.getNS(payload)[0])), (FXP_DATA, MAX_READ))

    def test_a_packet_longer_than_the_limit_ends_the_session(self) -> None:
        handle = self.open(b"up.bin", PUT)
        header = common.NS(handle) + struct.pack("!Q", 0)
        data = os.urandom(MAX_PACKET - 9 - len(header) - 4)  # type, id, handle, offset, length
        write = self.request(FXP_WRITE, header + common.NS(data))  # as long as it may be
        self.threads.finish_newest_first()
        self.assertEqual(self.statuses(), [(write, FX_OK)])
        self.send(struct.pack("!LBL", MAX_PACKET + 1, FXP_WRITE, 99) + b"x" * 1000)
        self.assertIn("close", self.channel_events())
        self.send(b"x" * 1000)  # whatever follows is dropped
        self.threads.finish_newest_first()  # the upload is dropped
        self.assertEqual(sorted(os.listdir(self.root)), ["big.bin"])
        self.assertEqual(self.statuses(), [(write, FX_OK)])

    def statvfs_fields(self, data: bytes) -> tuple[int, ...]:
        fields = struct.unpack("!11Q", data)
        return fields[:3] + fields[5:6] + fields[8:]  # sizes, files, fsid, flag, namemax

    def test_statvfs_and_fstatvfs(self) -> None:
        st = os.statvfs(self.root)
        flag = (1 if st.f_flag & os.ST_RDONLY else 0) | (2 if st.f_flag & os.ST_NOSUID else 0)
        expected = (st.f_bsize, st.f_frsize, st.f_blocks, st.f_files, st.f_fsid, flag,
                    st.f_namemax)
        for path in (b".", b"/", b"/big.bin"):
            kind, data = self.extended(b"statvfs@openssh.com", common.NS(path))
            self.assertEqual(kind, FXP_EXTENDED_REPLY)
            self.assertEqual(self.statvfs_fields(data), expected)
        for handle in (self.open(b"big.bin", FXF_READ), self.open(b"up.bin", PUT)):
            kind, data = self.extended(b"fstatvfs@openssh.com", common.NS(handle))
            self.assertEqual(kind, FXP_EXTENDED_REPLY)
            self.assertEqual(self.statvfs_fields(data), expected)
        code, message = self.status_of(self.extended(b"statvfs@openssh.com",
                                                     common.NS(b"/nosuch")))
        self.assertEqual(message, b"no such file or directory: /nosuch")

    def test_fsync_in_turn_after_the_writes(self) -> None:
        synced: list[int] = []
        real_fsync = os.fsync

        def fsync(fd: int) -> None:
            synced.append(fd)
            real_fsync(fd)

        self.patch(os, "fsync", fsync)
        handle = self.open(b"up.bin", PUT)
        writes = [self.request(FXP_WRITE, common.NS(handle) + struct.pack("!Q", offset)
                               + common.NS(self.payload[offset:offset + 32768]))
                  for offset in range(0, len(self.payload), 32768)]
        sync = self.request(FXP_EXTENDED, common.NS(b"fsync@openssh.com") + common.NS(handle))
        close = self.request(FXP_CLOSE, common.NS(handle))
        self.assertEqual(self.threads.finish_newest_first(), 1)  # one at a time, in turn
        self.assertEqual(self.statuses(), [(i, FX_OK) for i in [*writes, sync, close]])
        self.assertEqual(len(synced), 2)  # the request's, then the close's
        with open(os.path.join(self.root, "up.bin"), "rb") as f:
            self.assertEqual(f.read(), self.payload)

    def test_fsync_and_fstatvfs_need_an_open_file(self) -> None:
        self.request(FXP_OPENDIR, common.NS(b"."))
        self.threads.finish_newest_first()
        listing = common.getNS(self.replies()[-1][2])[0]
        for name, handle, message in (
                (b"fsync@openssh.com", b"nosuch", b"invalid handle"),
                (b"fstatvfs@openssh.com", b"nosuch", b"invalid handle"),
                (b"fsync@openssh.com", listing,
                 b"fsync needs an open file, not a directory listing")):
            reply = self.extended(name, common.NS(handle))
            self.assertEqual(self.status_of(reply), (FX_FAILURE, message))

    def test_posix_rename_replaces_and_is_audited_as_a_rename(self) -> None:
        audit = capture_audit(self)
        with open(os.path.join(self.root, "other.bin"), "wb") as f:
            f.write(b"old")
        reply = self.extended(b"posix-rename@openssh.com",
                              common.NS(b"big.bin") + common.NS(b"/other.bin"))
        self.assertEqual(self.status_of(reply)[0], FX_OK)
        self.assertEqual(os.listdir(self.root), ["other.bin"])
        with open(os.path.join(self.root, "other.bin"), "rb") as f:
            self.assertEqual(f.read(), self.payload)
        self.assertEqual([(e["command"], e["args"], e["outcome"]) for e in audit],
                         [("rename", {"path": "big.bin", "to": "other.bin"}, "ok")])
        # The jail's checks are a rename's: a root is not replaced, nothing leads out.
        os.symlink("/tmp", os.path.join(self.root, "out"))
        for old, new in ((b"other.bin", b"/"), (b"other.bin", b"out/x"), (b"/", b"x")):
            reply = self.extended(b"posix-rename@openssh.com", common.NS(old) + common.NS(new))
            self.assertEqual(self.status_of(reply)[0], FX_PERMISSION_DENIED, (old, new))

    def test_hard_links_are_refused(self) -> None:
        reply = self.extended(b"hardlink@openssh.com",
                              common.NS(b"big.bin") + common.NS(b"link.bin"))
        self.assertEqual(self.status_of(reply),
                         (FX_OP_UNSUPPORTED, b"hard links are not allowed in the jail"))
        self.assertEqual(os.listdir(self.root), ["big.bin"])
        reply = self.extended(b"nosuch@example.com")
        self.assertEqual(self.status_of(reply)[0], FX_OP_UNSUPPORTED)



# A name a client sends, and how a status message writes it: SFTP v3's messages
# are UTF-8 (ISO-10646); a byte that is not UTF-8, or a character that could drive
# a terminal, is written as its escape.
NAMES = {
    "café.txt".encode(): "café.txt".encode(),
    b"caf\xe9.txt": b"caf\\xe9.txt",
    b"\x1b[2J\xe2\x80\xaeclear": b"\\x1b[2J\\u202eclear",
}
NO_ATTRS = struct.pack("!L", 0)
MISSING = b"no such file or directory: {}"
Case = tuple[int, bytes, int, bytes]  # request type, payload, status code, message


class SFTPNamesInStatusTest(SFTPSessionBase):
    """Every failure whose message names the client's path is answered, once, with
    the path as the client wrote it, whatever bytes it is made of."""

    def ask(self, cases: list[Case]) -> None:
        """Send every request, then check that each got one status, with its code
        and message; then that the session ends at EOF."""
        sent = [self.request(kind, payload) for kind, payload, _, _ in cases]
        self.threads.finish_newest_first()
        replies = self.replies()
        self.assertEqual(sorted(request_id for _, request_id, _ in replies), sent)
        answers = {request_id: self.status_of((kind, payload))
                   for kind, request_id, payload in replies}
        for request_id, (kind, payload, code, message) in zip(sent, cases, strict=True):
            self.assertEqual(answers[request_id], (code, message), (kind, payload))
        self.eof()  # nothing is left unanswered: the session ends
        self.assertEqual(self.channel_events(), [("exit-status", 0), "close"])

    def test_status_message(self) -> None:
        cases: list[tuple[bytes | str, bytes]] = [
            *((os.fsdecode(name), shown) for name, shown in NAMES.items()),
            (b"request failed", b"request failed"),
            ("x\ud800y", b"x\\ud800y"),  # a surrogate that no name decodes to
        ]
        for message, sent in cases:
            self.assertEqual(status_message(message), sent)

    def test_in_a_root(self) -> None:
        self.ask([case for name, shown in NAMES.items()
                  for case in self.root_cases(name, shown)])

    def root_cases(self, name: bytes, shown: bytes) -> list[Case]:
        def disk(suffix: bytes) -> bytes:
            return os.path.join(os.fsencode(self.root), name + suffix)

        os.mkdir(disk(b"-dir"))
        open(disk(b"-file"), "wb").close()
        os.mkfifo(disk(b"-fifo"))
        os.symlink(b"/", disk(b"-out"))

        def ns(suffix: bytes = b"") -> bytes:
            return common.NS(name + suffix)

        reserved = b"." + name + b".cmdserver-upload-0123abcd-89abcdef"
        read, put = struct.pack("!L", FXF_READ) + NO_ATTRS, struct.pack("!L", PUT) + NO_ATTRS
        cases = [
            # Nothing by that name.
            (FXP_STAT, ns(), FX_NO_SUCH_FILE, MISSING),
            (FXP_LSTAT, ns(), FX_NO_SUCH_FILE, MISSING),
            (FXP_OPEN, ns() + read, FX_NO_SUCH_FILE, MISSING),
            (FXP_REMOVE, ns(), FX_NO_SUCH_FILE, MISSING),
            (FXP_RMDIR, ns(), FX_NO_SUCH_FILE, MISSING),
            (FXP_OPENDIR, ns(), FX_NO_SUCH_FILE, MISSING),
            (FXP_SETSTAT, ns() + struct.pack("!LL", FILEXFER_ATTR_PERMISSIONS, 0o600),
             FX_NO_SUCH_FILE, MISSING),
            (FXP_READLINK, ns(), FX_NO_SUCH_FILE, MISSING),
            (FXP_RENAME, ns() + common.NS(b"x"), FX_NO_SUCH_FILE, MISSING),
            (FXP_EXTENDED, common.NS(b"statvfs@openssh.com") + ns(), FX_NO_SUCH_FILE,
             MISSING),
            (FXP_EXTENDED, common.NS(b"posix-rename@openssh.com") + ns() + common.NS(b"x"),
             FX_NO_SUCH_FILE, MISSING),
            # No directory by that name.
            (FXP_MKDIR, ns(b"/x") + NO_ATTRS, FX_NO_SUCH_FILE, MISSING + b"/x"),
            (FXP_OPEN, ns(b"/x") + put, FX_NO_SUCH_FILE, MISSING + b"/x"),
            (FXP_REALPATH, ns(b"/x/y"), FX_NO_SUCH_FILE, MISSING + b"/x/y"),
            # The wrong kind of file, or one that is there already.
            (FXP_MKDIR, ns(b"-dir") + NO_ATTRS, FX_FAILURE, b"file exists: {}-dir"),
            (FXP_RENAME, ns(b"-file") + ns(b"-dir"), FX_FAILURE, b"file exists: {}-dir"),
            (FXP_RMDIR, ns(b"-file"), FX_FAILURE, b"not a directory: {}-file"),
            (FXP_REMOVE, ns(b"-dir"), FX_FAILURE, b"is a directory: {}-dir"),
            (FXP_OPEN, ns(b"-dir") + read, FX_FAILURE, b"is a directory: {}-dir"),
            (FXP_OPEN, ns(b"-fifo") + read, FX_FAILURE, b"not a regular file: {}-fifo"),
            (FXP_READLINK, ns(b"-file"), FX_FAILURE, b"not a symlink: {}-file"),
            (FXP_OPEN, common.NS(reserved) + put, FX_FAILURE,
             b"reserved name (upload temporary files look like it): "
             b".{}.cmdserver-upload-0123abcd-89abcdef"),
            (FXP_EXTENDED, ns(b"@example.com"), FX_OP_UNSUPPORTED,
             b"extension {}@example.com is not supported here"),
            # Refused.
            (FXP_READLINK, ns(b"-out"), FX_PERMISSION_DENIED,
             b"the symlink leads outside the jail: {}-out"),
            (FXP_STAT, ns(b"-out/x"), FX_PERMISSION_DENIED, b"path outside allowed roots"),
        ]
        return [(kind, payload, code, message.replace(b"{}", shown))
                for kind, payload, code, message in cases]


class SFTPNamesInStatusSeveralRootsTest(SFTPNamesInStatusTest):
    """The same in a session of several roots, and in its virtual ``/``, where
    nothing but the roots is found."""

    several_roots = True

    def test_in_the_virtual_root(self) -> None:
        cases: list[Case] = []
        for name, shown in NAMES.items():
            path = b"/" + name
            missing, below = MISSING.replace(b"{}", b"/" + shown), b"/x"
            cases += [
                (FXP_STAT, common.NS(path), FX_NO_SUCH_FILE, missing),
                (FXP_LSTAT, common.NS(path), FX_NO_SUCH_FILE, missing),
                (FXP_OPEN, common.NS(path) + struct.pack("!L", FXF_READ) + NO_ATTRS,
                 FX_NO_SUCH_FILE, missing),
                (FXP_OPENDIR, common.NS(path), FX_NO_SUCH_FILE, missing),
                (FXP_SETSTAT, common.NS(path) + NO_ATTRS, FX_NO_SUCH_FILE, missing),
                (FXP_READLINK, common.NS(path), FX_NO_SUCH_FILE, missing),
                (FXP_REALPATH, common.NS(path + below), FX_NO_SUCH_FILE, missing + below),
                (FXP_EXTENDED, common.NS(b"statvfs@openssh.com") + common.NS(path),
                 FX_NO_SUCH_FILE, missing),
            ]
        self.ask(cases)
