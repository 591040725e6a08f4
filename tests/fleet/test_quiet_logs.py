"""After every tool has run against them: the daemons' main logs stay quiet.

No warnings, errors or tracebacks, none of twisted.conch's own lines (key
exchange, channels, SFTP packets), no refusals: a connection logs its login and
its logout, whichever tool made it.
"""

from __future__ import annotations

import re

import pytest

from tests.fleet.cluster import Fleet

TROUBLE = re.compile(r"#(warn|error|critical)\]|Traceback|Unhandled")
CONCH = re.compile(r"\[twisted\.conch|\[cmdserver\.doors\.ssh\.\w+\.(CmdServer|Refusing|Jailed)")


@pytest.mark.after_all
def test_main_logs_have_one_line_per_login_and_logout(fleet: Fleet) -> None:
    for host in fleet.hosts:
        rows = host.log().splitlines()
        assert [r for r in rows if TROUBLE.search(r)] == [], host.name
        assert [r for r in rows if CONCH.search(r)] == [], host.name
        assert [r for r in rows if "refused" in r] == [], host.name
        logins = [r for r in rows if "ssh: ops logged in" in r]
        logouts = [r for r in rows if "ssh: ops@" in r and "logged out" in r]
        assert len(logins) > 10, host.name  # every tool came by
        assert len(logouts) <= len(logins), host.name
