"""The HTTP door as an operator meets it: curl for commands, files and metrics."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import shutil
import subprocess
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.trial import unittest

from tests.doors.http.support import HTTPServer
from tests.end_to_end.support import in_thread
from tests.helpers import OutsideTreeTempMixin

CURL = shutil.which("curl")


@pytest.mark.skipif(CURL is None, reason="curl is not installed (apt-get install curl)")
class CurlTests(OutsideTreeTempMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        self.server = HTTPServer(self.mktemp())
        yield self.server.start()
        self.addCleanup(self.server.stop)
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.work = os.path.dirname(self.server.data_dir)

    def curl(self, *args: str) -> defer.Deferred:
        def run() -> str:
            done = subprocess.run([str(CURL), "-sS", *args], capture_output=True, timeout=30,
                                  check=True)
            return done.stdout.decode()

        return in_thread(run)

    @defer.inlineCallbacks
    def test_commands_files_and_metrics_with_curl(self) -> Any:
        token = f"Authorization: Bearer {self.server.token}"
        basic = f"admin:{self.server.password}"
        out = yield self.curl("-H", token, "-H", "Content-Type: application/json", "-d",
                              '{"argv": ["1"]}', f"{self.url}/v1/commands/lastlog")
        self.assertEqual(json.loads(out)["result"], ["log line 19"])
        out = yield self.curl("-N", "-u", basic, "-H", "Accept: application/x-ndjson",
                              "-H", "Content-Type: application/json", "-d", "{}",
                              f"{self.url}/v1/commands/lastlog")
        self.assertEqual(json.loads(out.splitlines()[0]), {"line": "Begin lastlog"})
        data = os.urandom(200_000)
        path = os.path.join(self.work, "upload.bin")
        with open(path, "wb") as out_file:
            out_file.write(data)
        with open(os.path.join(self.server.data_dir, "hmac.key")) as key_file:
            key = bytes.fromhex(key_file.read().strip())
        mac = hmac.new(key, data, hashlib.sha256).hexdigest()
        out = yield self.curl("-u", basic, "-T", path, "-H", f"X-Cmdserver-HMAC: {mac}",
                              f"{self.url}/v1/files/up.bin")
        self.assertEqual(json.loads(out)["result"]["sha256"], hashlib.sha256(data).hexdigest())
        out = yield self.curl("-u", basic, "-r", "100-199", "-o", path + ".part", "-w",
                              "%{http_code}", f"{self.url}/v1/files/up.bin")
        self.assertEqual(out, "206")
        with open(path + ".part", "rb") as part:
            self.assertEqual(part.read(), data[100:200])
        out = yield self.curl("-H", token, f"{self.url}/metrics")
        names = {f.name for f in text_string_to_metric_families(out)}
        self.assertLessEqual({"cmdserver_commands", "cmdserver_upload_bytes",
                              "cmdserver_file_operations"}, names)
        out = yield self.curl("-w", "%{http_code}", "-o", os.devnull,
                              "-H", "Host: evil.example", f"{self.url}/healthz")
        self.assertEqual(out, "421")
