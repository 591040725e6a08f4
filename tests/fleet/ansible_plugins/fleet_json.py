"""An Ansible stdout callback for the fleet suite: one JSON line per host result.

``ANSIBLE_CALLBACK_PLUGINS=tests/fleet/ansible_plugins ANSIBLE_STDOUT_CALLBACK=fleet_json``
(ansible-core no longer ships a json callback; ansible.posix's is a collection).
Each line: ``host``, ``task``, ``status`` (ok, changed, failed, unreachable),
``stdout``, ``stderr``, ``rc``, ``msg``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ansible.plugins.callback import CallbackBase


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "stdout"
    CALLBACK_NAME = "fleet_json"

    def _emit(self, result: Any, status: str) -> None:
        r = result._result
        sys.stdout.write(json.dumps({
            "host": result._host.get_name(), "task": result._task.get_name(),
            "status": "changed" if status == "ok" and r.get("changed") else status,
            "stdout": r.get("stdout", ""), "stderr": r.get("stderr", ""),
            "rc": r.get("rc"), "msg": r.get("msg", ""),
        }) + "\n")
        sys.stdout.flush()

    def v2_runner_on_ok(self, result: Any) -> None:
        self._emit(result, "ok")

    def v2_runner_on_failed(self, result: Any, ignore_errors: bool = False) -> None:
        self._emit(result, "failed")

    def v2_runner_on_unreachable(self, result: Any) -> None:
        self._emit(result, "unreachable")
