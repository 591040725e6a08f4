"""A real Prometheus scrapes the HTTP door (not in the default run: it needs Debian's
``prometheus`` package; ``apt-get install prometheus``).

    .venv/bin/python -m pytest tests/http_external

``promtool check metrics`` finds nothing to say about /metrics, and a Prometheus
server logged in with an API token scrapes the door and answers a query on it.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from typing import Any

import pytest
from twisted.internet import defer, task
from twisted.trial import unittest

from tests.doors.http.support import HTTPServer
from tests.end_to_end.support import in_thread
from tests.helpers import OutsideTreeTempMixin

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(not (PROMETHEUS and PROMTOOL),
                                reason="apt-get install prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusTests(OutsideTreeTempMixin, unittest.TestCase):
    timeout = 120

    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        self.server = HTTPServer(self.mktemp())
        yield self.server.start()
        self.addCleanup(self.server.stop)
        self.work = os.path.dirname(self.server.data_dir)

    @defer.inlineCallbacks
    def test_promtool_finds_nothing_to_say(self) -> Any:
        for name in ("ping", "lastlog", "nosuch"):
            yield self.server.command(name)
        answer = yield self.server.call("GET", "/metrics")
        done = subprocess.run([str(PROMTOOL), "check", "metrics"], input=answer.body,
                              capture_output=True, timeout=60, check=False)
        self.assertEqual((done.returncode, done.stdout, done.stderr), (0, b"", b""))

    @defer.inlineCallbacks
    def test_a_prometheus_server_scrapes_the_door(self) -> Any:
        yield self.server.command("ping")
        token_file = os.path.join(self.work, "token")
        with open(token_file, "w") as f:
            f.write(self.server.token)
        config = os.path.join(self.work, "prometheus.yml")
        with open(config, "w") as f:
            f.write(f"""global:
  scrape_interval: 1s
scrape_configs:
  - job_name: cmdserver
    authorization:
      credentials_file: {token_file}
    static_configs:
      - targets: ["127.0.0.1:{self.server.port}"]
""")
        web = free_port()
        log = open(os.path.join(self.work, "prometheus.log"), "wb")  # noqa: SIM115
        self.addCleanup(log.close)
        proc = subprocess.Popen([str(PROMETHEUS), f"--config.file={config}",
                                 f"--storage.tsdb.path={self.work}/tsdb",
                                 f"--web.listen-address=127.0.0.1:{web}"],
                                stdout=log, stderr=subprocess.STDOUT)

        def stop() -> None:
            proc.terminate()
            proc.wait(30)

        self.addCleanup(stop)

        def query(path: str) -> Any:
            with urllib.request.urlopen(f"http://127.0.0.1:{web}{path}", timeout=5) as r:
                return json.load(r)

        deadline = time.monotonic() + 60
        found: list = []
        while time.monotonic() < deadline and not found:
            yield task.deferLater(self.server.service.core.reactor, 0.5, lambda: None)
            try:
                targets = yield in_thread(query, "/api/v1/targets")
                result = yield in_thread(
                    query, "/api/v1/query?query=cmdserver_commands_total"
                           '%7Bcommand%3D%22ping%22%7D')
            except OSError:
                continue
            [target] = targets["data"]["activeTargets"] or [None]
            if target is not None:
                self.assertIn(target["health"], ("up", "unknown"), target.get("lastError"))
            found = result["data"]["result"]
        self.assertTrue(found, "Prometheus never stored cmdserver_commands_total")
        self.assertEqual(found[0]["metric"]["door"], "http")
        self.assertEqual(found[0]["metric"]["outcome"], "ok")
        self.assertGreaterEqual(float(found[0]["value"][1]), 1)
