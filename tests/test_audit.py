"""The JSON-lines audit log."""

from __future__ import annotations

import json
import os
import stat

from twisted.logger import Logger

from cmdserver.audit import AuditFile


def test_writes_audit_events_only(tmp_path):
    path = tmp_path / "audit.log"
    audit = AuditFile(str(path))
    audit.open()
    audit({"log_namespace": "other", "log_time": 0, "user": "x"})
    audit({"log_namespace": "cmdserver.audit", "log_time": 0, "user": "ops", "peer": "p",
           "door": "line", "command": "ls", "args": {"path": "a"}, "outcome": "ok",
           "duration": 0.5, "error": None, "log_format": "ignored"})
    # Flushed at once: readable before close.
    [line] = path.read_text().splitlines()
    assert json.loads(line) == {
        "time": "1970-01-01T00:00:00.000+00:00", "user": "ops", "peer": "p", "door": "line",
        "command": "ls", "args": {"path": "a"}, "outcome": "ok", "duration": 0.5,
        "error": None}
    audit.close()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    audit({"log_namespace": "cmdserver.audit", "log_time": 0})  # closed: ignored


def test_appends_and_survives_odd_values(tmp_path):
    path = tmp_path / "audit.log"
    path.write_text('{"old": 1}\n')
    audit = AuditFile(str(path))
    audit.open()
    audit({"log_namespace": "cmdserver.audit", "log_time": 1.5, "args": {"x": object()}})
    audit.close()
    lines = path.read_text().splitlines()
    assert lines[0] == '{"old": 1}'
    assert json.loads(lines[1])["args"]["x"].startswith("<object")


def test_is_a_log_observer(tmp_path):
    from twisted.logger import LogPublisher

    publisher = LogPublisher()
    audit = AuditFile(str(tmp_path / "a.log"))
    audit.open()
    publisher.addObserver(audit)
    Logger(namespace="cmdserver.audit", observer=publisher).info("x", command="ping")
    audit.close()
    assert json.loads((tmp_path / "a.log").read_text())["command"] == "ping"
