"""Files over HTTP: PUT streams into the upload engine (a file only if its HMAC matched),
GET sends a jailed file (Range too); refusals come before the body is read."""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from twisted.internet import defer, task
from twisted.trial import unittest

from tests.doors.http.support import HTTPServer
from tests.helpers import OutsideTreeTempMixin, capture_audit
from tests.helpers.upload import leftovers


class FileTests(OutsideTreeTempMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        self.server = HTTPServer(self.mktemp(), "--max-upload", "8M")
        yield self.server.start()
        self.addCleanup(self.server.stop)
        with open(os.path.join(self.server.data_dir, "hmac.key")) as f:
            self.key = bytes.fromhex(f.read().strip())

    def mac(self, data: bytes) -> str:
        return hmac.new(self.key, data, hashlib.sha256).hexdigest()

    def put(self, name: str, data: bytes, mac: str | bool | None = None,
            headers: dict | None = None) -> defer.Deferred:
        """PUT ``data``: with ``mac`` (None: its right HMAC; False: no HMAC header)."""
        headers = {**self.server.bearer(), **(headers or {})}
        if mac is not False:
            headers["X-Cmdserver-HMAC"] = mac if isinstance(mac, str) else self.mac(data)
        return self.server.call("PUT", f"/v1/files/{name}", data, headers)

    @defer.inlineCallbacks
    def wait_for_no_leftovers(self) -> Any:
        for _ in range(100):
            if not leftovers(self.server.root):
                return
            yield task.deferLater(self.server.service.core.reactor, 0.05, lambda: None)
        self.fail(f"temporary files left: {leftovers(self.server.root)}")

    @defer.inlineCallbacks
    def test_put_then_get_the_same_bytes(self) -> Any:
        data = os.urandom(3 << 20) + b"tail"
        events = capture_audit(self)
        answer = yield self.put("big.bin", data)
        self.assertEqual(answer.status, 201)
        self.assertEqual(answer.json["result"], {"name": "big.bin", "size": len(data),
                                                 "sha256": hashlib.sha256(data).hexdigest()})
        answer = yield self.server.call("GET", "/v1/files/big.bin")
        self.assertEqual((answer.status, answer.body == data), (200, True))
        self.assertEqual(answer.headers["Content-Type"], "application/octet-stream")
        self.assertEqual(answer.headers["Content-Disposition"],
                         "attachment; filename*=UTF-8''big.bin")
        self.assertEqual(answer.headers["Accept-Ranges"], "bytes")
        records = [(e["event"], e["command"], e["outcome"], e["args"]) for e in events
                   if e["event"] in ("command", "file")]
        self.assertEqual(records, [
            ("command", "upload", "ok", {"name": "big.bin", "size": len(data),
                                         "mac": "hmac-sha256"}),
            ("file", "get", "ok", {"path": "big.bin"})])
        self.assertEqual(self.server.service.core.stats.file_operations["get"], 1)

    @defer.inlineCallbacks
    def test_ranges(self) -> Any:
        data = bytes(range(256)) * 4
        yield self.put("r.bin", data)
        etag = (yield self.server.call("HEAD", "/v1/files/r.bin")).headers["ETag"]
        for header, status, body, content_range in (
                ("bytes=10-19", 206, data[10:20], "bytes 10-19/1024"),
                ("bytes=1000-", 206, data[1000:], "bytes 1000-1023/1024"),
                ("bytes=-4", 206, data[-4:], "bytes 1020-1023/1024"),
                ("bytes=1020-5000", 206, data[1020:], "bytes 1020-1023/1024"),
                ("bytes=0-1,5-6", 200, data, None),  # several ranges: the whole file
                ("bytes=2000-", 416, None, "bytes */1024")):
            answer = yield self.server.call("GET", "/v1/files/r.bin",
                                            headers={**self.server.bearer(), "Range": header})
            self.assertEqual(answer.status, status, header)
            if body is not None:
                self.assertEqual(answer.body, body, header)
            self.assertEqual(answer.headers["Content-Range"], content_range, header)
        for condition, status in ((etag, 206), ('"other"', 200)):
            answer = yield self.server.call("GET", "/v1/files/r.bin", headers={
                **self.server.bearer(), "Range": "bytes=0-0", "If-Range": condition})
            self.assertEqual(answer.status, status)
        answer = yield self.server.call("HEAD", "/v1/files/r.bin")
        self.assertEqual((answer.status, answer.body, answer.headers["Content-Length"]),
                         (200, b"", "1024"))

    @defer.inlineCallbacks
    def test_get_refusals(self) -> Any:
        os.mkdir(os.path.join(self.server.root, "sub"))
        for path, status, message in (("../x", 403, "path outside allowed roots"),
                                      ("missing", 404, "no such file or directory: missing"),
                                      ("sub", 422, "is a directory: sub")):
            answer = yield self.server.call("GET", f"/v1/files/{path}")
            self.assertEqual((answer.status, answer.json["error"]), (status, message), path)
        answer = yield self.server.call("GET", "/v1/files/sub", headers={})
        self.assertEqual(answer.status, 401)

    @defer.inlineCallbacks
    def test_the_mac_stays_in_the_header_blake2b_when_named(self) -> Any:
        data = os.urandom(100_000)
        b2 = hashlib.blake2b(data, key=self.key, digest_size=32).hexdigest()
        events = capture_audit(self)
        answer = yield self.put("b2.bin", data, b2, {"X-Cmdserver-MAC-Algorithm": "blake2b"})
        self.assertEqual((answer.status, answer.json["result"]),
                         (201, {"name": "b2.bin", "size": len(data),
                                "sha256": hashlib.sha256(data).hexdigest()}))
        [record] = [e for e in events if e["event"] == "command"]
        self.assertEqual(record["args"], {"name": "b2.bin", "size": len(data), "mac": "blake2b"})
        for mac, headers, status, message in [
                (self.mac(data), {"X-Cmdserver-MAC-Algorithm": "blake2b"}, 422,
                 "MAC mismatch (blake2b), upload discarded"),
                (b2, {"X-Cmdserver-MAC-Algorithm": "md5"}, 400,
                 "mac must be one of hmac-sha256, blake2b, not 'md5'"),
                # No trailer after an HTTP body: "-" is not a MAC here.
                ("-", {}, 400, "HMAC must be 64 hex digits (HMAC-SHA256 of the content)")]:
            answer = yield self.put("no.bin", data, mac, headers)
            self.assertEqual((answer.status, answer.json["error"]), (status, message), headers)
        yield self.wait_for_no_leftovers()
        self.assertFalse(os.path.exists(os.path.join(self.server.root, "no.bin")))

    @defer.inlineCallbacks
    def test_a_bad_upload_leaves_nothing(self) -> Any:
        data = b"content" * 1000
        answer = yield self.put("bad.bin", data, mac="0" * 64)
        self.assertEqual((answer.status, answer.json["error"]),
                         (422, "HMAC mismatch, upload discarded"))
        yield self.wait_for_no_leftovers()
        self.assertFalse(os.path.exists(os.path.join(self.server.root, "bad.bin")))

    @defer.inlineCallbacks
    def test_refusals_come_before_the_body(self) -> Any:
        yield self.put("there.txt", b"x")
        cases: list[tuple[str, bytes, str | bool | None, dict[str, str], int, str]] = [
                 ("there.txt", b"y", None, {}, 409, "target exists: there.txt"),
                 ("../out.txt", b"y", None, {}, 403, "path outside allowed roots"),
                 ("nodir/a.txt", b"y", None, {}, 422, "no such directory: nodir"),
                 ("a.txt", b"y", False, {}, 400,
                  "an upload needs the X-Cmdserver-HMAC header (hex HMAC-SHA256 of the "
                  "content)"),
                 ("a.txt", b"y", "zz", {}, 400,
                  "HMAC must be 64 hex digits (HMAC-SHA256 of the content)"),
                 ("a.txt", b"y", None, {"Authorization": "Bearer nope"}, 401,
                  "login failed")]
        for name, data, mac, headers, status, message in cases:
            answer = yield self.put(name, data, mac, headers)
            self.assertEqual((answer.status, answer.json["error"]), (status, message), name)
        # Too large, announced: answered before any byte, with 100-continue never sent.
        head = (f"PUT /v1/files/huge.bin HTTP/1.1\r\nHost: localhost\r\n"
                f"Authorization: Bearer {self.server.token}\r\n"
                f"X-Cmdserver-HMAC: {'ab' * 32}\r\nContent-Length: {9 << 20}\r\n"
                f"Expect: 100-continue\r\n\r\n").encode()
        got = yield self.server.raw(head)
        self.assertTrue(got.startswith(b"HTTP/1.1 413 "), got)
        self.assertIn(b'"upload too large: 9437184 bytes (the limit is 8388608 bytes)"', got)
        # No Content-Length (chunked): the size is not known.
        head = (f"PUT /v1/files/c.bin HTTP/1.1\r\nHost: localhost\r\n"
                f"Authorization: Bearer {self.server.token}\r\n"
                f"X-Cmdserver-HMAC: {'ab' * 32}\r\nTransfer-Encoding: chunked\r\n\r\n"
                "1\r\nx\r\n0\r\n\r\n").encode()
        got = yield self.server.raw(head)
        self.assertTrue(got.startswith(b"HTTP/1.1 411 "), got)
        self.assertEqual(sorted(os.listdir(self.server.root)), ["there.txt"])

    @defer.inlineCallbacks
    def test_expect_continue_waits_for_the_upload_to_begin(self) -> Any:
        data = b"0123456789"
        head = (f"PUT /v1/files/ten.txt HTTP/1.1\r\nHost: localhost\r\n"
                f"Authorization: Bearer {self.server.token}\r\n"
                f"X-Cmdserver-HMAC: {self.mac(data)}\r\nContent-Length: 10\r\n"
                f"Expect: 100-continue\r\nConnection: close\r\n\r\n").encode()

        def run() -> bytes:
            import socket

            with socket.create_connection(("127.0.0.1", self.server.port), timeout=10) as s:
                s.sendall(head)
                first = s.recv(100)
                s.sendall(data)
                got = first
                while chunk := s.recv(65536):
                    got += chunk
                return got

        from tests.end_to_end.support import in_thread

        got = yield in_thread(run)
        self.assertTrue(got.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 "), got)
        with open(os.path.join(self.server.root, "ten.txt"), "rb") as f:
            self.assertEqual(f.read(), data)

    @defer.inlineCallbacks
    def test_a_sender_that_goes_away_leaves_nothing(self) -> Any:
        head = (f"PUT /v1/files/half.bin HTTP/1.1\r\nHost: localhost\r\n"
                f"Authorization: Bearer {self.server.token}\r\n"
                f"X-Cmdserver-HMAC: {'ab' * 32}\r\nContent-Length: 1000000\r\n\r\n").encode()
        yield self.server.raw(head + b"x" * 300000, read=False)
        yield self.wait_for_no_leftovers()
        yield task.deferLater(self.server.service.core.reactor, 0.2, lambda: None)
        self.assertEqual(os.listdir(self.server.root), [])
        self.assertEqual(self.server.service.getServiceNamed("uploads").uploads.active, set())
