"""One command on many cmdserver SSH doors with a Python fleet tool.

Run by the fleet tools' own Python (tests/fleet/toolenv.py), never imported by
the suite: reads a JSON spec on stdin (``tool``, ``command``, ``pty``, ``user``,
``key``, ``hosts``: [[name, port], …], all on 127.0.0.1) and prints, as JSON,
each host's ``stdout``, ``stderr`` and ``rc`` as the tool reports them.  The
calls are the ones docs/fleet.md shows.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def pssh(spec: dict[str, Any], native: bool) -> dict[str, dict[str, Any]]:
    """parallel-ssh: ``pssh.clients`` (libssh2) or ``pssh.clients.ssh`` (libssh)."""
    if native:
        from pssh.clients import ParallelSSHClient
    else:
        from pssh.clients.ssh import ParallelSSHClient
    from pssh.config import HostConfig

    names = [name for name, _ in spec["hosts"]]
    client = ParallelSSHClient(
        ["127.0.0.1"] * len(names), user=spec["user"], pkey=spec["key"],
        host_config=[HostConfig(port=port) for _, port in spec["hosts"]],
        pool_size=len(names), num_retries=1, timeout=60)
    output = client.run_command(spec["command"], use_pty=spec["pty"], stop_on_errors=False)
    client.join(output)
    results = {}
    for name, host_out in zip(names, output, strict=True):
        if host_out.exception is not None:
            results[name] = {"stdout": "", "stderr": repr(host_out.exception), "rc": None}
            continue
        stdout = "".join(line + "\n" for line in host_out.stdout)
        stderr = "".join(line + "\n" for line in host_out.stderr)
        results[name] = {"stdout": stdout, "stderr": stderr, "rc": host_out.exit_code}
    return results


def fabric(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Fabric's ``ThreadingGroup``: one thread a host, paramiko underneath."""
    from fabric import Connection, ThreadingGroup
    from fabric.exceptions import GroupException

    connect = {"key_filename": spec["key"], "look_for_keys": False, "allow_agent": False}
    names = {}
    connections = []
    for name, port in spec["hosts"]:
        c = Connection("127.0.0.1", user=spec["user"], port=port, connect_kwargs=connect)
        names[c] = name
        connections.append(c)
    group = ThreadingGroup.from_connections(connections)
    try:
        results = group.run(spec["command"], hide=True, warn=True, pty=spec["pty"],
                            in_stream=False)
    except GroupException as e:
        results = e.result
    out = {}
    for c, r in results.items():
        if isinstance(r, BaseException):
            out[names[c]] = {"stdout": "", "stderr": repr(r), "rc": None}
        else:
            out[names[c]] = {"stdout": r.stdout, "stderr": r.stderr, "rc": r.exited}
    for c in connections:
        c.close()
    return out


def main() -> None:
    spec = json.load(sys.stdin)
    tool = spec["tool"]
    if tool == "pssh":
        results = pssh(spec, native=True)
    elif tool == "pssh-libssh":
        results = pssh(spec, native=False)
    elif tool == "fabric":
        results = fabric(spec)
    else:
        raise SystemExit(f"unknown tool {tool!r}")
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
