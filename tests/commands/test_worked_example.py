"""The worked example of docs/development.md ("Adding a command") works as written:
one module and one registry line give a command that every door serves."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from twisted.trial import unittest

from tests.helpers import make_context, make_core

DOC = Path(__file__).resolve().parents[2] / "docs" / "development.md"


def example_module() -> dict[str, Any]:
    text = DOC.read_text()
    section = text.split("## Adding a command", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "development.md lost its worked example"
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), str(DOC), "exec"), namespace)  # our own docs, not input
    return namespace


class WorkedExampleTests(unittest.TestCase):
    def setUp(self) -> None:
        self.core = make_core(self.mktemp())
        self.core.registry.add(example_module()["Uptime"]())
        self.core.reactor.advance(750)

    def line(self, text: str) -> list[str]:
        return self.successResultOf(self.core.run_line(make_context(self.core), text)).lines

    def test_text_doors(self) -> None:
        self.assertEqual(self.line("uptime --unit m"), ["12.5"])
        self.assertEqual(self.line("uptime --unit d"),
                         ["Error: unit must be one of s, m, h, not 'd'"])
        self.assertEqual(self.line("help uptime")[0], "Usage: uptime [--unit UNIT]")

    def test_named_values(self) -> None:
        ctx = make_context(self.core, door="pb")
        self.assertEqual(self.successResultOf(self.core.call(ctx, "uptime", unit="h")),
                         750 / 3600)
        failure = self.failureResultOf(self.core.call(ctx, "uptime", unit="d"))
        self.assertEqual(str(failure.value), "unit must be one of s, m, h, not 'd'")
