"""The recipes of docs/fleet.md, run as written against the 20 daemons.

Each fenced block after a ``<!-- recipe: NAME -->`` line is taken from the
document; only the example hosts (``web01.example.com`` …, port 2222) and the
key path (``~/.ssh/cmdserver_ops``) are swapped for the fleet's.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fleet.cluster import (
    PASSWORD,
    USER,
    Fleet,
    Result,
    ansible_env,
    ansible_rows,
    tool_env,
)
from tests.fleet.conftest import HOSTS, python_can_import

DOC = Path(__file__).resolve().parents[2] / "docs" / "fleet.md"
RECIPE = re.compile(r"<!-- recipe: (\w+) -->\n```\w*\n(.*?)```", re.S)
KEY = "~/.ssh/cmdserver_ops"
EXAMPLE_HOST = re.compile(r"^web\d+\.example\.com$", re.M)
EXAMPLE_HOSTS = re.compile(r"^hosts = \[.*\]$", re.M)


def recipes() -> dict[str, str]:
    return dict(RECIPE.findall(DOC.read_text()))


def test_every_recipe_is_there() -> None:
    assert set(recipes()) == {"inventory", "adhoc", "playbook", "pssh", "fabric",
                              "ssh_config", "xargs", "xargs_labelled"}


# -- Ansible ----------------------------------------------------------------------

def recipe_inventory(fleet: Fleet) -> Path:
    """The recipe's inventory with the fleet's hosts in place of the example's."""
    text = recipes()["inventory"].replace(KEY, str(fleet.key))
    first, *_ = EXAMPLE_HOST.findall(text)
    rows = "\n".join(f"{h.name} ansible_host=127.0.0.1 ansible_port={h.ssh_port} "
                     f"cmdserver_pb_port={h.pb_port}" for h in fleet.hosts)
    text = EXAMPLE_HOST.sub("", text).replace("[web]\n", f"[web]\n{rows}\n", 1)
    path = fleet.workdir / "inventory.ini"
    path.with_name("recipe-inventory.ini").write_text(text)
    return path.with_name("recipe-inventory.ini")


def recipe_ansible_env(fleet: Fleet, tools: Path, own_output: bool) -> dict[str, str]:
    env = ansible_env(fleet, tools, tty=False)
    del env["ANSIBLE_SSH_USETTY"]  # the recipe's inventory says it
    if own_output:  # Ansible's own output, as the recipe shows it
        del env["ANSIBLE_STDOUT_CALLBACK"], env["ANSIBLE_CALLBACK_PLUGINS"]
    return env


def run_shell(line: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", line], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_ansible_adhoc_recipe(fleet: Fleet, tools: Path) -> None:
    inventory = recipe_inventory(fleet)
    line = recipes()["adhoc"].strip().replace("inventory.ini", inventory.name)
    done = run_shell(line, recipe_ansible_env(fleet, tools, own_output=True), fleet.workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("| CHANGED | rc=0 >>\nuptime: ") == HOSTS, done.stdout
    # ansible_ssh_use_tty=false: no terminal, so LF line ends and stderr apart.
    env = recipe_ansible_env(fleet, tools, own_output=False)
    done = run_shell(line.replace("-a stats", "-a 'ls ..'"), env, fleet.workdir)
    rows = ansible_rows(done.stdout)
    assert len(rows) == HOSTS, done.stdout + done.stderr
    assert {(r["rc"], r["stdout"], r["stderr"]) for r in rows} == {
        (1, "", "Error: path outside allowed roots\n")}


def test_ansible_playbook_recipe(fleet: Fleet, tools: Path) -> None:
    inventory = recipe_inventory(fleet)
    playbook = fleet.workdir / "diagnose.yml"
    playbook.write_text(recipes()["playbook"])
    env = recipe_ansible_env(fleet, tools, own_output=False)
    done = run_shell(f"ansible-playbook -i {inventory.name} -f 50 diagnose.yml", env,
                     fleet.workdir)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = ansible_rows(done.stdout)
    stats = [r for r in rows if r["task"] == "stats"]
    assert len(stats) == HOSTS
    assert {(r["status"], r["rc"]) for r in stats} == {("ok", 0)}  # ok, not changed
    assert all(r["stdout"].startswith("uptime: ") for r in stats)
    assert len([r for r in rows if r["task"] == "show"]) == HOSTS


def test_the_inventory_recipe_serves_cmdserver_fleet_too(fleet: Fleet) -> None:
    from tests.fleet.cluster import CLI

    inventory = recipe_inventory(fleet)
    done = subprocess.run([CLI, "fleet", "-i", str(inventory), "-l", "web", "--json", "ls"],
                          env=tool_env(None) | {"CMDSERVER_PASSWORD": PASSWORD},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    answers = {a["host"]: a for a in map(json.loads, done.stdout.splitlines())}
    assert {name: a["text"] for name, a in answers.items()} == {
        h.name: [f"{h.name}.txt"] for h in fleet.hosts}


# -- parallel-ssh and Fabric ------------------------------------------------------

def python_recipe(fleet: Fleet, name: str) -> str:
    hosts = [("127.0.0.1", h.ssh_port) for h in fleet.hosts]
    text = recipes()[name].replace(KEY, str(fleet.key))
    assert EXAMPLE_HOSTS.search(text), f"the {name} recipe has no hosts line"
    return EXAMPLE_HOSTS.sub(f"hosts = {hosts!r}", text)


def run_python(tools: Path, code: str) -> Result:
    done = subprocess.run([str(tools / "bin" / "python"), "-c", code], env=tool_env(tools),
                          capture_output=True, text=True, timeout=300)
    return Result(done.stdout, done.stderr, done.returncode)


@pytest.mark.parametrize("client", ["pssh.clients", "pssh.clients.ssh"])
def test_pssh_recipe(fleet: Fleet, tools: Path, client: str) -> None:
    problem = python_can_import(tools, client)
    if problem is not None:
        pytest.skip(f"{client} is not installed here: {problem}")
    code = python_recipe(fleet, "pssh").replace("from pssh.clients import",
                                                f"from {client} import")
    done = run_python(tools, code)
    assert done.rc == 0, done.stderr
    assert done.stdout.count("127.0.0.1 0\n    uptime: ") == HOSTS, done.stdout


def test_fabric_recipe(fleet: Fleet, tools: Path) -> None:
    done = run_python(tools, python_recipe(fleet, "fabric"))
    assert done.rc == 0, done.stderr
    assert done.stdout.count("127.0.0.1 0\nuptime: ") == HOSTS, done.stdout
    done = run_python(tools, python_recipe(fleet, "fabric").replace('"stats"', '"ls .."'))
    assert done.rc == 0, done.stderr  # warn=True: a failed command is a result
    assert done.stdout.count("127.0.0.1 1\n") == HOSTS, done.stdout


# -- xargs and ssh ----------------------------------------------------------------

@pytest.fixture
def ssh_home(fleet: Fleet, tmp_path: Path) -> Path:
    """A home whose ~/.ssh/config is the recipe's, plus an entry per test host (its
    port, as on a real fleet its name), hosts.txt, and bin/ssh (see below)."""
    ssh = tmp_path / ".ssh"
    ssh.mkdir(mode=0o700)
    entries = [f"Host {h.name}\n    HostName 127.0.0.1\n    Port {h.ssh_port}\n"
               "    StrictHostKeyChecking no\n    UserKnownHostsFile /dev/null\n"
               "    LogLevel ERROR\n" for h in fleet.hosts]
    recipe = recipes()["ssh_config"].replace("web*.example.com", "host*")
    (ssh / "config").write_text("".join(entries) + recipe.replace(KEY, str(fleet.key)))
    (tmp_path / "hosts.txt").write_text("".join(f"{h.name}\n" for h in fleet.hosts))
    assert f"User {USER}" in recipe
    # ssh reads the config of the passwd entry's home, not $HOME's: a shim on PATH
    # points it at this one, and the recipe runs as written.
    shim = tmp_path / "bin" / "ssh"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {ssh / "config"} "$@"\n')
    shim.chmod(0o755)
    return tmp_path


def shell_env(home: Path) -> dict[str, str]:
    env = tool_env(None)
    return env | {"HOME": str(home), "PATH": f"{home / 'bin'}:{env['PATH']}"}


def test_xargs_recipe(fleet: Fleet, ssh_home: Path) -> None:
    env = shell_env(ssh_home)
    done = run_shell(recipes()["xargs"].strip().replace("stats", "ls"), env, ssh_home)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [f"{h.name}.txt" for h in fleet.hosts]


def test_xargs_labelled_recipe(fleet: Fleet, ssh_home: Path) -> None:
    env = shell_env(ssh_home)
    line = recipes()["xargs_labelled"].strip()
    done = run_shell(line.replace(" stats ", " ls "), env, ssh_home)
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()) == [f"{h.name}: {h.name}.txt"
                                                for h in fleet.hosts]
    done = run_shell(line.replace(" stats ", ' "ls .." '), env, ssh_home)
    assert done.returncode == 123, done.stderr  # failed somewhere
    assert sorted(done.stdout.splitlines()) == [
        f"{h.name}: Error: path outside allowed roots" for h in fleet.hosts]
