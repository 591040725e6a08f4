"""20 daemons driven by the tools operators already use: OpenSSH with xargs, Ansible
(``raw``, ad hoc and a playbook, with and without a terminal), parallel-ssh (both
clients), Fabric's ThreadingGroup, and ``cmdserver fleet`` over the PB doors.

For each: 20/20 successes with the output ``ssh host ls`` prints, the exit
status 1 of ``ls ..`` (and 124 of a command past its deadline) on all 20, and
exactly one audit record per host and command in each DATA-DIR/audit.log.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.fleet.cluster import (
    USER,
    Fleet,
    Result,
    ansible_adhoc,
    ansible_playbook,
    ansible_rows,
    cmdserver_fleet,
    drive,
    ssh_all,
    xargs_ssh,
)
from tests.fleet.conftest import HOSTS, python_can_import

OUTSIDE = "Error: path outside allowed roots"
DEADLINE = "Error: deadline exceeded: stopped after 1 s"
PLAYBOOK = """\
- hosts: all
  gather_facts: false        # facts need a Python on the host: cmdserver has none
  tasks:
    - name: listing
      raw: ls
      changed_when: false    # a diagnostic changes nothing
    - name: outside
      raw: ls ..
      changed_when: false
      ignore_errors: true
"""


def lines(text: str) -> list[str]:
    """Text as lines, whatever the line ends (a terminal's CR LF, or LF)."""
    return text.replace("\r\n", "\n").splitlines()


def assert_audited(fleet: Fleet, marks: dict[str, int], command: str, outcome: str,
                   door: str = "ssh", count: int = 1) -> None:
    """Each host wrote exactly ``count`` command records since ``marks``, as expected."""
    new = fleet.new_commands(marks, count)
    want = [("command", door, USER, command, outcome)] * count
    got = {name: [(r["event"], r["door"], r["user"], r["command"], r["outcome"])
                  for r in rows] for name, rows in new.items()}
    assert got == {h.name: want for h in fleet.hosts}


def assert_same_output(results: dict[str, Result], expected: dict[str, Result],
                       exact: bool = True) -> None:
    """20/20 with exit status 0 and the output of plain ssh (``exact``: byte for byte,
    else line for line, for a tool that hands out lines)."""
    assert sorted(results) == sorted(expected)
    assert {name: r.rc for name, r in results.items()} == dict.fromkeys(expected, 0)
    for name, r in results.items():
        if exact:
            assert r.stdout == expected[name].stdout, name
        else:
            assert lines(r.stdout) == lines(expected[name].stdout), name


def assert_failed_everywhere(results: dict[str, Result], rc: int, message: str,
                             tty: bool) -> None:
    """Every host exited with ``rc``; the error line is on stdout with a terminal (one
    stream), on stderr without."""
    assert len(results) == HOSTS
    assert {r.rc for r in results.values()} == {rc}
    for name, r in results.items():
        stream = r.stdout if tty else r.stderr
        assert message in lines(stream), (name, r)
        if tty:
            assert message not in r.stderr, (name, r)


# -- plain ssh, and the xargs recipe --------------------------------------------

def test_plain_ssh_answers_every_host(fleet: Fleet, plain: dict[str, Result],
                                      plain_tty: dict[str, Result]) -> None:
    assert {name: (r.stdout, r.rc) for name, r in plain.items()} == {
        h.name: (f"{h.name}.txt\n", 0) for h in fleet.hosts}
    assert {name: (r.stdout, r.rc) for name, r in plain_tty.items()} == {
        h.name: (f"{h.name}.txt\r\n", 0) for h in fleet.hosts}


def test_plain_ssh_errors(fleet: Fleet) -> None:
    marks = fleet.audit_marks()
    assert_failed_everywhere(ssh_all(fleet, "ls .."), 1, OUTSIDE, tty=False)
    assert_audited(fleet, marks, "ls", "error")
    marks = fleet.audit_marks()
    assert_failed_everywhere(ssh_all(fleet, "ls ..", tty=True), 1, OUTSIDE, tty=True)
    assert_audited(fleet, marks, "ls", "error")


def test_xargs_ssh(fleet: Fleet, plain: dict[str, Result]) -> None:
    marks = fleet.audit_marks()
    done = xargs_ssh(fleet, "ls", parallel=HOSTS)
    assert done.returncode == 0, done.stderr
    assert sorted(lines(done.stdout)) == sorted(r.stdout.strip() for r in plain.values())
    assert_audited(fleet, marks, "ls", "ok")
    done = xargs_ssh(fleet, "ls ..", parallel=HOSTS)
    assert done.returncode == 123  # xargs: some invocation exited with 1-125
    assert lines(done.stderr) == [OUTSIDE] * HOSTS


# -- Ansible ----------------------------------------------------------------------

@pytest.mark.parametrize("tty", [False, True], ids=["no-tty", "tty"])
def test_ansible_adhoc_raw(fleet: Fleet, tools: Path, plain: dict[str, Result],
                           plain_tty: dict[str, Result], tty: bool) -> None:
    marks = fleet.audit_marks()
    results, done = ansible_adhoc(fleet, tools, "ls", tty)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_output(results, plain_tty if tty else plain)
    assert_audited(fleet, marks, "ls", "ok")

    marks = fleet.audit_marks()
    results, done = ansible_adhoc(fleet, tools, "ls ..", tty)
    assert done.returncode == 2, done.stdout + done.stderr  # ansible: some host failed
    assert_failed_everywhere(results, 1, OUTSIDE, tty)
    assert_audited(fleet, marks, "ls", "error")


@pytest.mark.parametrize("tty", [False, True], ids=["no-tty", "tty"])
def test_ansible_playbook_raw(fleet: Fleet, tools: Path, plain: dict[str, Result],
                              plain_tty: dict[str, Result], tty: bool) -> None:
    playbook = fleet.workdir / "diagnose.yml"
    playbook.write_text(PLAYBOOK)
    marks = fleet.audit_marks()
    rows, done = ansible_playbook(fleet, tools, playbook, tty)
    assert done.returncode == 0, done.stdout + done.stderr  # the failure is ignored
    listing = {r["host"]: Result(r["stdout"], r["stderr"], r["rc"])
               for r in rows if r["task"] == "listing"}
    outside = {r["host"]: Result(r["stdout"], r["stderr"], r["rc"])
               for r in rows if r["task"] == "outside"}
    assert_same_output(listing, plain_tty if tty else plain)
    assert {r["status"] for r in rows if r["task"] == "listing"} == {"ok"}  # not "changed"
    assert_failed_everywhere(outside, 1, OUTSIDE, tty)
    new = fleet.new_commands(marks, 2)
    assert {name: [(r["command"], r["outcome"]) for r in rows] for name, rows in new.items()
            } == {h.name: [("ls", "ok"), ("ls", "error")] for h in fleet.hosts}


def test_ansible_rows_parse_the_callback_lines() -> None:
    out = ('junk\n{"host": "h1", "task": "t", "status": "ok", "stdout": "a\\n", '
           '"stderr": "", "rc": 0, "msg": ""}\n')
    assert ansible_rows(out) == [{"host": "h1", "task": "t", "status": "ok", "stdout": "a\n",
                                  "stderr": "", "rc": 0, "msg": ""}]


# -- parallel-ssh and Fabric ------------------------------------------------------

MODULES = {"pssh": "pssh.clients", "pssh-libssh": "pssh.clients.ssh", "fabric": "fabric"}
PYTHON_TOOLS = [
    pytest.param("pssh", "pssh.clients", id="pssh-libssh2"),
    pytest.param("pssh-libssh", "pssh.clients.ssh", id="pssh-libssh"),
    pytest.param("fabric", "fabric", id="fabric"),
]


@pytest.mark.parametrize("pty", [False, True], ids=["no-pty", "pty"])
@pytest.mark.parametrize("tool, module", PYTHON_TOOLS)
def test_python_tool(fleet: Fleet, tools: Path, plain: dict[str, Result],
                     plain_tty: dict[str, Result], tool: str, module: str, pty: bool) -> None:
    problem = python_can_import(tools, module)
    if problem is not None:
        pytest.skip(f"{tool} is not installed here: {problem}")
    exact = tool == "fabric"  # parallel-ssh hands out lines, without their ends
    marks = fleet.audit_marks()
    assert_same_output(drive(fleet, tools, tool, "ls", pty=pty),
                       plain_tty if pty else plain, exact=exact)
    assert_audited(fleet, marks, "ls", "ok")
    marks = fleet.audit_marks()
    assert_failed_everywhere(drive(fleet, tools, tool, "ls ..", pty=pty), 1, OUTSIDE, pty)
    assert_audited(fleet, marks, "ls", "error")


# -- a command past its deadline: 124 from every tool ------------------------------

@pytest.mark.parametrize("tool", ["ssh", "ansible", "pssh", "pssh-libssh", "fabric"])
def test_deadline_exit_status(fleet: Fleet, tools: Path, tool: str) -> None:
    marks = fleet.audit_marks()
    if tool == "ssh":
        results = ssh_all(fleet, "nap")
    elif tool == "ansible":
        results, _ = ansible_adhoc(fleet, tools, "nap", tty=False)
    else:
        problem = python_can_import(tools, MODULES[tool])
        if problem is not None:
            pytest.skip(f"{tool} is not installed here: {problem}")
        results = drive(fleet, tools, tool, "nap")
    assert_failed_everywhere(results, 124, DEADLINE, tty=False)
    assert_audited(fleet, marks, "nap", "deadline")


# -- cmdserver fleet over the PB doors ----------------------------------------------

def test_cmdserver_fleet_over_pb(fleet: Fleet, plain: dict[str, Result]) -> None:
    marks = fleet.audit_marks()
    done = cmdserver_fleet(fleet, ["ls"])
    assert done.returncode == 0, done.stderr
    answers = [json.loads(row) for row in done.stdout.splitlines()]
    assert sorted(a["host"] for a in answers) == sorted(plain)
    assert {a["status"] for a in answers} == {"ok"}
    for a in answers:  # what ssh prints: the streamed lines, then the reply's
        assert a["output"] + a["text"] == lines(plain[a["host"]].stdout), a
    assert_audited(fleet, marks, "ls", "ok", door="pb")

    marks = fleet.audit_marks()
    done = cmdserver_fleet(fleet, ["ls", ".."])
    assert done.returncode == 1, done.stderr  # the command failed somewhere
    answers = [json.loads(row) for row in done.stdout.splitlines()]
    assert len(answers) == HOSTS
    assert {(a["status"], a["error"]) for a in answers} == {("failed", OUTSIDE)}
    assert_audited(fleet, marks, "ls", "error", door="pb")


def test_cmdserver_fleet_with_an_api_token(fleet: Fleet, plain: dict[str, Result]) -> None:
    """One token, made once and its tokens file deployed with the users file, logs in
    on every host: no bcrypt check, and each host audits a login by token."""
    logins_before = {h.name: sum(r.get("event") == "login" for r in h.audit())
                     for h in fleet.hosts}
    marks = fleet.audit_marks()
    done = cmdserver_fleet(fleet, ["ls"], token=True)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(row) for row in done.stdout.splitlines()]
    assert {a["status"] for a in answers} == {"ok"} and len(answers) == HOSTS
    for a in answers:
        assert a["output"] + a["text"] == lines(plain[a["host"]].stdout), a
    assert_audited(fleet, marks, "ls", "ok", door="pb")
    for host in fleet.hosts:
        logins = [r for r in host.audit() if r.get("event") == "login"]
        new = logins[logins_before[host.name]:]
        assert [(r["outcome"], r["args"]["method"]) for r in new] == [("ok", "token")], new


def test_cmdserver_fleet_table(fleet: Fleet) -> None:
    done = cmdserver_fleet(fleet, ["ls"], json_lines=False)
    assert done.returncode == 0, done.stderr
    assert lines(done.stdout)[-1] == f"{HOSTS} hosts: {HOSTS} ok, 0 failed, 0 unreachable"
