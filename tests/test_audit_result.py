"""The audit file keeps a command's result summary (portscan's counts) when there is one."""

from __future__ import annotations

import json

from cmdserver.audit import NAMESPACE, AuditFile


def test_result_summary_written(tmp_path) -> None:
    audit = AuditFile(str(tmp_path / "audit.log"))
    audit.open()
    base = {"log_namespace": NAMESPACE, "log_time": 0.0, "command": "portscan",
            "outcome": "ok", "args": {"host": "localhost", "ports": None, "count": 1024}}
    audit({**base, "result": {"address": "127.0.0.1", "ports": 1024, "open": 2,
                              "elapsed": 0.02}})
    audit({**base, "command": "ping"})
    audit.close()
    first, second = (json.loads(line) for line in
                     (tmp_path / "audit.log").read_text().splitlines())
    assert first["result"] == {"address": "127.0.0.1", "ports": 1024, "open": 2,
                               "elapsed": 0.02}
    assert first["args"]["count"] == 1024
    assert "result" not in second
