"""The reference docs keep up with the code: every option and every command is documented."""

from __future__ import annotations

from pathlib import Path

from cmdserver import tap
from cmdserver.commands import default_registry
from cmdserver.commands.lastlog import LogSource

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_every_option_is_in_configuration_md():
    text = (DOCS / "configuration.md").read_text()
    options = set(tap.SETTINGS) | {"config", "overwrite", "pb-anonymous"}
    missing = sorted(name for name in options if f"`--{name}" not in text)
    assert not missing, f"configuration.md does not document: {missing}"


def test_every_command_is_in_protocol_md():
    text = (DOCS / "protocol.md").read_text()
    names = [c.name for c in default_registry(LogSource(None)).commands()]
    names += ["login", "portscan", "upload"]  # registered by makeService
    missing = sorted(n for n in names if f"### {n}" not in text)
    assert not missing, f"protocol.md has no section for: {missing}"


def test_every_option_has_one_table_row():
    rows = [line for line in (DOCS / "configuration.md").read_text().splitlines()
            if line.startswith("| `--")]
    options = set(tap.SETTINGS) | {"config", "overwrite", "pb-anonymous"}
    counts = {name: sum(row.startswith((f"| `--{name} ", f"| `--{name}`")) for row in rows)
              for name in options}
    wrong = sorted(name for name, count in counts.items() if count != 1)
    assert not wrong, f"configuration.md: not exactly one table row for {wrong}"
