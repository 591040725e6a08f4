"""Every command of the registry is reachable through the JSON API and XML-RPC: the
registry is walked, with the samples of tests/doors/test_command_contract.py, so a
new command cannot be forgotten on the HTTP door."""

from __future__ import annotations

import xmlrpc.client
from typing import Any

from twisted.internet import defer
from twisted.trial import unittest

from tests.doors.http.support import HTTPServer
from tests.doors.test_command_contract import SAMPLES, SPECIAL
from tests.end_to_end.support import in_thread
from tests.helpers import OutsideTreeTempMixin


class HTTPContractTests(OutsideTreeTempMixin, unittest.TestCase):
    @defer.inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits on a returned Deferred
        self.server = HTTPServer(self.mktemp())
        yield self.server.start()
        self.addCleanup(self.server.stop)
        with open(f"{self.server.root}/a.txt", "w") as f:
            f.write("alpha")

    @defer.inlineCallbacks
    def test_every_command_is_reachable_by_json_and_xml_rpc(self) -> Any:
        registry = self.server.service.core.registry
        proxy = xmlrpc.client.ServerProxy(
            f"http://admin:{self.server.password}@127.0.0.1:{self.server.port}/RPC2")
        checked = []
        for command in registry.commands():
            if not command.serves("http"):
                answer = yield self.server.command(command.name)
                self.assertEqual(answer.status, 404, command.name)
                continue
            if command.name in SPECIAL:  # upload: PUT /v1/files (test_files.py)
                continue
            words, kwargs, _ = SAMPLES[command.name]
            by_name = yield self.server.command(command.name, {"args": kwargs})
            self.assertEqual(by_name.status, 200, (command.name, by_name))
            by_words = yield self.server.command(command.name, {"argv": words})
            self.assertEqual(by_words.status, 200, (command.name, by_words))
            value = yield in_thread(getattr(proxy, command.name), kwargs)
            self.assertEqual(type(value), type(by_name.json["result"]), command.name)
            checked.append(command.name)
        self.assertLessEqual({"help", "ping", "stats", "whoami", "ls", "comphash", "lastlog",
                              "portscan"}, set(checked))
