"""The jailed SFTP server's audit records: through the core, jail-relative paths,
byte counts, durations and outcomes."""

from __future__ import annotations

import os

from twisted.conch.ssh.filetransfer import FXF_READ

from tests.doors.ssh.test_sftp_jail import PUT, SFTPServerTestBase
from tests.helpers import capture_audit


class SFTPAuditTest(SFTPServerTestBase):
    def setUp(self) -> None:
        super().setUp()
        self.audit = capture_audit(self)
        self.clock = self.server.core.reactor

    def records(self) -> list[tuple]:
        return [(e["event"], e["door"], e["session"], e["user"], e["command"], e["args"],
                 e["outcome"]) for e in self.audit]

    def test_operations_are_file_records_of_the_session(self) -> None:
        upload = self.put(b"new.bin", b"12345")
        self.clock.advance(1.5)
        self.successResultOf(upload.close())
        f = self.successResultOf(self.server.openFile(b"/a.txt", FXF_READ, {}))
        self.assertEqual(self.successResultOf(f.readChunk(0, 3)), b"alp")
        self.assertEqual(self.successResultOf(f.readChunk(3, 100)), b"ha")
        self.successResultOf(f.close())
        self.successResultOf(self.server.makeDirectory(b"d", {}))
        self.successResultOf(self.server.renameFile(b"new.bin", b"d/moved.bin"))
        self.successResultOf(self.server.removeFile(b"d/moved.bin"))
        self.successResultOf(self.server.openDirectory(b"d"))
        self.successResultOf(self.server.removeDirectory(b"d"))
        base = ("file", "sftp", "feedc0de0001", "ops")
        self.assertEqual(self.records(), [
            (*base, "put", {"path": "new.bin"}, "ok"),
            (*base, "get", {"path": "a.txt"}, "ok"),  # asked for as /a.txt
            (*base, "mkdir", {"path": "d"}, "ok"),
            (*base, "rename", {"path": "new.bin", "to": "d/moved.bin"}, "ok"),
            (*base, "rm", {"path": "d/moved.bin"}, "ok"),
            (*base, "ls", {"path": "d"}, "ok"),
            (*base, "rmdir", {"path": "d"}, "ok"),
        ])
        put, get = self.audit[:2]
        self.assertEqual((put["result"], put["duration"]), ({"bytes": 5}, 1.5))
        self.assertEqual(get["result"], {"bytes": 5})
        self.assertNotIn(self.root, repr(self.audit))
        stats = self.server.core.stats.file_operations
        self.assertEqual(dict(stats), {"put": 1, "get": 1, "mkdir": 1, "rename": 1, "rm": 1,
                                       "ls": 1, "rmdir": 1})

    def test_refusals_and_errors(self) -> None:
        os.symlink(self.outside, self.path("out"))
        self.failureResultOf(self.server.openFile(b"/out/secret", FXF_READ, {}))
        self.failureResultOf(self.server.removeFile(b"missing"))
        self.failureResultOf(self.server.openFile(b"a.txt", PUT | 0x20, {}))  # EXCL: exists
        self.failureResultOf(self.server.getAttrs(b"../out", True))
        self.failureResultOf(self.server.getAttrs(b"/etc", True))  # not there: not audited
        self.assertEqual([r[4:] for r in self.records()], [
            ("get", {"path": "out/secret"}, "refused"),
            ("rm", {"path": "missing"}, "error"),
            ("put", {"path": "a.txt"}, "error"),
            ("stat", {"path": "out"}, "refused"),
        ])
        self.assertEqual(self.audit[0]["error"], "path outside allowed roots")
        self.assertIn("no such file", self.audit[1]["error"])

    def test_an_abandoned_upload_is_an_error_with_its_bytes(self) -> None:
        from cmdserver.doors.ssh.sftp import JailedFileTransferServer

        protocol = JailedFileTransferServer(self.server)
        upload = self.put(b"big.bin", b"x" * 100)
        protocol.openFiles[b"1"] = upload
        protocol.connectionLost()
        [record] = self.audit
        self.assertEqual((record["command"], record["outcome"], record["result"]),
                         ("put", "error", {"bytes": 100}))
        self.assertIn("session ended", record["error"])
