"""A fleet of cmdserver daemons on loopback, and the fleet tools that drive them.

Shared by the fleet suite (tests/fleet) and bench/fleet.  Each daemon is a real
``twistd -n cmdserver`` with its own data directory, its SSH and PB doors on
ephemeral 127.0.0.1 ports (read back from its log) and no line or HTTP door.  The user
is made once the deployed way (``cmdserver useradd``, ``cmdserver addkey``) and
its users file and key copied into every data directory, as configuration
management would; each daemon makes its own host keys on its first start.

The tools (Ansible, parallel-ssh, Fabric) live in their own virtualenv
(:mod:`tests.fleet.toolenv`); the Python ones run in a child process of it
(``tests/fleet/drivers.py``), so nothing of theirs is imported here.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
TWISTD = str(Path(sys.executable).with_name("twistd"))
CLI = str(Path(sys.executable).with_name("cmdserver"))
USER, PASSWORD = "ops", "fleet-password"
LISTENING = re.compile(r"(ssh|pb) door listening on 127\.0\.0\.1:(\d+)")
ANY_PORT = "tcp:0:interface=127.0.0.1"
SSH_OPTIONS = ["-F", "/dev/null", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
               "-o", "UserKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes",
               "-o", "LogLevel=ERROR"]


@dataclass
class Result:
    """What one tool got from one host."""

    stdout: str
    stderr: str
    rc: int | None


@dataclass
class Host:
    """One daemon: ``name`` (host01 …), its directory, its ports once started."""

    name: str
    workdir: Path
    proc: subprocess.Popen | None = None
    ssh_port: int = 0
    pb_port: int = 0

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def root(self) -> Path:
        return self.data_dir / "files"

    @property
    def log_path(self) -> Path:
        return self.workdir / "twistd.log"

    @property
    def audit_path(self) -> Path:
        return self.data_dir / "audit.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def audit(self) -> list[dict[str, Any]]:
        """Every record of DATA-DIR/audit.log, parsed."""
        try:
            text = self.audit_path.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(row) for row in text.splitlines() if row.strip()]

    def commands(self) -> list[dict[str, Any]]:
        return [r for r in self.audit() if r.get("event") == "command"]


@dataclass
class Fleet:
    """``count`` daemons under ``workdir``; ``start()`` them, ``stop()`` them."""

    workdir: Path
    count: int
    cost: int = 4  # bcrypt cost of the user's password, and the daemons' --bcrypt-cost
    args: list[str] = field(default_factory=list)  # more twistd cmdserver options
    hosts: list[Host] = field(default_factory=list)
    token: str = ""  # an API token of the user's, valid on every host (made by prepare)

    @property
    def key(self) -> Path:
        return self.workdir / "id_ed25519"

    @property
    def inventory_path(self) -> Path:
        return self.workdir / "inventory.ini"

    def prepare(self) -> None:
        """The key pair, the user (made once, the deployed way), each host's directory."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "fleet",
                            "-f", str(self.key)], check=True, timeout=30)
        template = self.workdir / "template"
        if not (template / "users").exists():
            subprocess.run([CLI, "useradd", USER, "--password-stdin", "--cost",
                            str(self.cost), "--data-dir", str(template)],
                           input=PASSWORD + "\n", text=True, check=True, timeout=60,
                           stdout=subprocess.DEVNULL)
            subprocess.run([CLI, "addkey", USER, f"{self.key}.pub", "--data-dir",
                            str(template)], check=True, timeout=60, stdout=subprocess.DEVNULL)
            made = subprocess.run([CLI, "token", "add", USER, "--name", "fleet",
                                   "--data-dir", str(template)], check=True, timeout=60,
                                  capture_output=True, text=True)
            (template / "fleet-token").write_text(made.stdout.split()[-1])
        self.token = (template / "fleet-token").read_text()
        self.hosts = []
        for i in range(1, self.count + 1):
            host = Host(f"host{i:02d}", self.workdir / f"host{i:02d}")
            host.root.mkdir(parents=True, exist_ok=True)
            os.chmod(host.data_dir, 0o700)
            shutil.copy2(template / "users", host.data_dir / "users")
            shutil.copytree(template / "keys", host.data_dir / "keys", dirs_exist_ok=True)
            shutil.copy2(template / "tokens", host.data_dir / "tokens")
            # A file of its own, so that `ls` tells which host answered.
            (host.root / f"{host.name}.txt").write_text(f"{host.name}\n")
            self.hosts.append(host)

    def start(self, timeout: float = 120.0) -> None:
        """Start every daemon and wait until each listens on both doors."""
        if not self.hosts:
            self.prepare()
        for host in self.hosts:
            host.log_path.unlink(missing_ok=True)  # the ports are read back from it
            cmd = [TWISTD, "-n", "--pidfile=", "-l", str(host.log_path), "cmdserver",
                   "--data-dir", str(host.data_dir), "--line", "none", "--http", "none",
                   "--ssh", ANY_PORT, "--pb", ANY_PORT, "--bcrypt-cost", str(self.cost),
                   *self.args]
            host.proc = subprocess.Popen(cmd, cwd=host.workdir, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        waiting = list(self.hosts)
        while waiting:
            for host in list(waiting):
                assert host.proc is not None
                if host.proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"{host.name} exited:\n{host.log()}")
                ports = dict(LISTENING.findall(host.log()))
                if {"ssh", "pb"} <= set(ports):
                    host.ssh_port, host.pb_port = int(ports["ssh"]), int(ports["pb"])
                    waiting.remove(host)
            if waiting and time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{len(waiting)} daemons did not listen in {timeout:g} s")
            time.sleep(0.05)
        self.write_inventory()

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every daemon this fleet started (by its pid), then wait for it."""
        for host in self.hosts:
            if host.proc is not None and host.proc.poll() is None:
                host.proc.send_signal(signal.SIGTERM)
        for host in self.hosts:
            if host.proc is None:
                continue
            try:
                host.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                host.proc.kill()
                host.proc.wait(timeout)

    def write_inventory(self) -> Path:
        """The Ansible INI inventory of the fleet (read by `cmdserver fleet` too)."""
        rows = ["[fleet]"]
        for h in self.hosts:
            rows.append(f"{h.name} ansible_host=127.0.0.1 ansible_port={h.ssh_port} "
                        f"cmdserver_pb_port={h.pb_port}")
        rows += ["", "[fleet:vars]", f"ansible_user={USER}",
                 f"ansible_ssh_private_key_file={self.key}", f"cmdserver_user={USER}", ""]
        self.inventory_path.write_text("\n".join(rows))
        return self.inventory_path

    def audit_marks(self, settle: float = 0.3, timeout: float = 10.0) -> dict[str, int]:
        """How many command records each host has, once no audit log has grown for
        ``settle`` seconds (records are written in batches); see :meth:`new_commands`."""
        def sizes() -> list[int]:
            return [h.audit_path.stat().st_size if h.audit_path.exists() else 0
                    for h in self.hosts]

        deadline = time.monotonic() + timeout
        before = sizes()
        while time.monotonic() < deadline:
            time.sleep(settle)
            now = sizes()
            if now == before:
                break
            before = now
        return {h.name: len(h.commands()) for h in self.hosts}

    def new_commands(self, marks: dict[str, int], expected: int = 1,
                     timeout: float = 10.0) -> dict[str, list[dict[str, Any]]]:
        """The command records each host wrote since ``marks``; waits (the audit log is
        written in batches) until every host has at least ``expected`` of them."""
        deadline = time.monotonic() + timeout
        while True:
            new = {h.name: h.commands()[marks[h.name]:] for h in self.hosts}
            if all(len(rows) >= expected for rows in new.values()) or \
                    time.monotonic() > deadline:
                return new
            time.sleep(0.05)


# -- the tools ----------------------------------------------------------------

def tool_env(tools: Path | None) -> dict[str, str]:
    """The environment the tools run in: the tools' venv first on PATH, UTF-8."""
    env = dict(os.environ, LC_ALL="C.UTF-8", LANG="C.UTF-8")
    if tools is not None:
        env["PATH"] = f"{tools / 'bin'}{os.pathsep}{env.get('PATH', os.defpath)}"
    return env


def ssh_one(fleet: Fleet, host: Host, command: str, tty: bool = False,
            timeout: float = 60) -> Result:
    """``ssh -p PORT ops@127.0.0.1 COMMAND`` (``-tt`` for a terminal), OpenSSH's client."""
    argv = ["ssh", *SSH_OPTIONS, "-i", str(fleet.key), "-p", str(host.ssh_port),
            *(["-tt"] if tty else []), f"{USER}@127.0.0.1", command]
    done = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    return Result(done.stdout.decode(), done.stderr.decode(), done.returncode)


def ssh_all(fleet: Fleet, command: str, tty: bool = False, workers: int = 20
            ) -> dict[str, Result]:
    """``ssh host COMMAND`` on every host, ``workers`` at a time."""
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {h.name: pool.submit(ssh_one, fleet, h, command, tty) for h in fleet.hosts}
        return {name: f.result() for name, f in futures.items()}


def xargs_ssh(fleet: Fleet, command: str, parallel: int, timeout: float = 300
              ) -> subprocess.CompletedProcess:
    """The shell recipe: ports on stdin, ``xargs -P N -I{} ssh -p {} … COMMAND``."""
    options = " ".join([*SSH_OPTIONS, "-i", str(fleet.key)])
    script = (f"xargs -P {parallel} -I{{}} ssh {options} -p {{}} {USER}@127.0.0.1 "
              f"{command}")
    ports = "".join(f"{h.ssh_port}\n" for h in fleet.hosts)
    return subprocess.run(["sh", "-c", script], input=ports, capture_output=True, text=True,
                          timeout=timeout)


def ansible_env(fleet: Fleet, tools: Path, tty: bool) -> dict[str, str]:
    """Ansible's settings for the fleet, all through its environment variables."""
    env = tool_env(tools)
    control = fleet.workdir / "ansible-cp"
    control.mkdir(exist_ok=True)
    env.update({
        "ANSIBLE_HOST_KEY_CHECKING": "False",
        "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control),
        "ANSIBLE_LOCAL_TEMP": str(fleet.workdir / "ansible-tmp"),
        "ANSIBLE_HOME": str(fleet.workdir / "ansible-home"),
        "ANSIBLE_CALLBACK_PLUGINS": str(HERE / "ansible_plugins"),
        "ANSIBLE_STDOUT_CALLBACK": "fleet_json",  # one JSON line per host result
        "ANSIBLE_LOAD_CALLBACK_PLUGINS": "1",  # for ad hoc runs too
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_SSH_USETTY": "True" if tty else "False",
        "ANSIBLE_SSH_ARGS": "-F /dev/null -C -o ControlMaster=auto -o ControlPersist=60s "
                            "-o UserKnownHostsFile=/dev/null -o IdentitiesOnly=yes "
                            "-o LogLevel=ERROR",
    })
    return env


def ansible_rows(output: str) -> list[dict[str, Any]]:
    """The fleet_json callback's lines: one dict per host and task (``host``,
    ``task``, ``status``, ``stdout``, ``stderr``, ``rc``, ``msg``)."""
    return [json.loads(row) for row in output.splitlines() if row.startswith("{")]


def ansible_adhoc(fleet: Fleet, tools: Path, command: str, tty: bool, forks: int = 20,
                  timeout: float = 300) -> tuple[dict[str, Result], subprocess.CompletedProcess]:
    """``ansible all -i INVENTORY -m raw -a COMMAND -f FORKS``: each host's result (an
    unreachable host's message as its stderr, rc None)."""
    done = subprocess.run([str(tools / "bin" / "ansible"), "all", "-i",
                           str(fleet.inventory_path), "-m", "raw", "-a", command,
                           "-f", str(forks)],
                          env=ansible_env(fleet, tools, tty), capture_output=True, text=True,
                          timeout=timeout, cwd=fleet.workdir)
    results = {r["host"]: Result(r["stdout"], r["stderr"] or r["msg"], r["rc"])
               for r in ansible_rows(done.stdout)}
    return results, done


def ansible_playbook(fleet: Fleet, tools: Path, playbook: Path, tty: bool, forks: int = 20,
                     timeout: float = 300
                     ) -> tuple[list[dict[str, Any]], subprocess.CompletedProcess]:
    """``ansible-playbook -i INVENTORY -f FORKS PLAYBOOK``: the callback's rows."""
    done = subprocess.run([str(tools / "bin" / "ansible-playbook"), "-i",
                           str(fleet.inventory_path), "-f", str(forks), str(playbook)],
                          env=ansible_env(fleet, tools, tty), capture_output=True, text=True,
                          timeout=timeout, cwd=fleet.workdir)
    return ansible_rows(done.stdout), done


def drive(fleet: Fleet, tools: Path, tool: str, command: str, pty: bool = False,
          timeout: float = 300) -> dict[str, Result]:
    """Run ``command`` on every host with a Python tool (``tests/fleet/drivers.py``):
    ``pssh`` (libssh2), ``pssh-libssh`` or ``fabric``."""
    spec = {"tool": tool, "command": command, "pty": pty, "user": USER, "key": str(fleet.key),
            "hosts": [[h.name, h.ssh_port] for h in fleet.hosts]}
    done = subprocess.run([str(tools / "bin" / "python"), str(HERE / "drivers.py")],
                          input=json.dumps(spec), env=tool_env(tools), capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{tool} driver failed ({done.returncode}):\n{done.stderr}")
    return {name: Result(**r) for name, r in json.loads(done.stdout).items()}


def cmdserver_fleet(fleet: Fleet, command: list[str], forks: int = 20, timeout: float = 300,
                    json_lines: bool = True, token: bool = False
                    ) -> subprocess.CompletedProcess:
    """``cmdserver fleet -i INVENTORY --forks N [--json] COMMAND …`` over the PB doors,
    logging in with the user's password (a bcrypt check per host) or its API token."""
    env = dict(os.environ, CMDSERVER_PASSWORD=fleet.token if token else PASSWORD)
    return subprocess.run([CLI, "fleet", "-i", str(fleet.inventory_path), "--forks",
                           str(forks), *(["--json"] if json_lines else []), *command],
                          env=env, capture_output=True, text=True, timeout=timeout)
