"""Login attackers for test_attacks_login.py, each run as a process of its own.

    python login_attackers.py pb-pipeline PORT USER CALLS
    python login_attackers.py ssh-pipeline PORT USER REQUESTS
    python login_attackers.py parallel LINE SSH PB USER SECONDS

``pb-pipeline`` sends CALLS ``authenticate`` calls on one PB connection
without waiting for any answer; ``ssh-pipeline`` sends REQUESTS password
requests on one SSH connection (paramiko for the key exchange, then raw
``SSH_MSG_USERAUTH_REQUEST`` packets, all at once, until the server hangs
up); ``parallel`` keeps up to ten connections from one address (four line,
three SSH, three PB) guessing passwords for SECONDS seconds.  Each prints one
JSON object of what it saw.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections import Counter
from typing import Any

GUESS = "guess-{}"


def ssh_pipeline(port: int, user: str, requests: int) -> dict[str, Any]:
    import paramiko
    from paramiko.common import cMSG_SERVICE_REQUEST, cMSG_USERAUTH_REQUEST
    from paramiko.message import Message

    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    t = paramiko.Transport(sock)
    t.start_client(timeout=30)
    m = Message()
    m.add_byte(cMSG_SERVICE_REQUEST)
    m.add_string("ssh-userauth")
    t._send_message(m)  # type: ignore[attr-defined]  # paramiko's private sender
    sent = 0
    started = time.monotonic()
    try:
        for i in range(requests):  # none waits for an answer
            m = Message()
            m.add_byte(cMSG_USERAUTH_REQUEST)
            m.add_string(user)
            m.add_string("ssh-connection")
            m.add_string("password")
            m.add_boolean(False)
            m.add_string(GUESS.format(i))
            t._send_message(m)  # type: ignore[attr-defined]  # paramiko's private sender
            sent += 1
    except (OSError, EOFError, paramiko.SSHException):
        pass  # the server hung up before the last ones were written
    while t.is_active() and time.monotonic() - started < 30:
        time.sleep(0.05)
    closed = not t.is_active()
    t.close()
    return {"sent": sent, "closed by the server": closed,
            "seconds": round(time.monotonic() - started, 2)}


def parallel(line: int, ssh: int, pb_port: int, user: str, seconds: float) -> dict[str, Any]:
    seen: Counter[str] = Counter()
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def count(what: str) -> None:
        with lock:
            seen[what] += 1

    def line_attacker(n: int) -> None:
        i = 0
        while time.monotonic() < stop:
            try:
                with socket.create_connection(("127.0.0.1", line), timeout=60) as s:
                    f = s.makefile("rwb")
                    while time.monotonic() < stop:
                        i += 1
                        f.write(f"login {user} {GUESS.format(i)}\n".encode())
                        f.flush()
                        reply = f.readline()
                        if reply.endswith(b". bye !\r\n"):  # refused, then closed
                            count("line: connection refused")
                            time.sleep(0.05)
                            break
                        if not reply:
                            break
                        count("line: " + reply.decode().strip()[:40])
            except OSError:
                count("line: reset")
                time.sleep(0.05)

    def ssh_attacker(n: int) -> None:
        import logging

        import paramiko

        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
        i = 0
        while time.monotonic() < stop:
            i += 1
            client = paramiko.SSHClient()
            client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
            try:
                client.connect("127.0.0.1", ssh, username=user, password=GUESS.format(i),
                               allow_agent=False, look_for_keys=False, timeout=30,
                               banner_timeout=30, auth_timeout=60)
                count("ssh: logged in")
            except paramiko.AuthenticationException:
                count("ssh: login failed")
            except (paramiko.SSHException, OSError, EOFError):
                count("ssh: connection refused")
                time.sleep(0.05)
            finally:
                client.close()

    def pb_attacker(n: int) -> None:
        from cmdserver.client import LoginError, connect_blocking

        i = 0
        while time.monotonic() < stop:
            i += 1
            try:
                connect_blocking("127.0.0.1", pb_port, user, GUESS.format(i)).close()
                count("pb: logged in")
            except LoginError as e:
                count("pb: " + e.message[:40])
            except Exception:
                count("pb: connection refused")
                time.sleep(0.05)

    threads = [threading.Thread(target=f, args=(n,)) for f, k in
               ((line_attacker, 4), (ssh_attacker, 3), (pb_attacker, 3)) for n in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return dict(seen)


def main() -> None:
    mode, *args = sys.argv[1:]
    if mode == "pb-pipeline":
        from twisted.internet import defer, task
        from twisted.spread import pb

        port, user, calls = int(args[0]), args[1], int(args[2])
        seen: Counter[str] = Counter()

        async def attack(reactor: Any) -> None:
            factory = pb.PBClientFactory()
            reactor.connectTCP("127.0.0.1", port, factory)
            root = await factory.getRootObject()
            made = [root.callRemote("authenticate", user, GUESS.format(i))
                    for i in range(calls)]  # all written before any answer is read

            def answer(failure: Any) -> str:
                if failure.check(pb.PBConnectionLost, pb.DeadReferenceError):
                    return "connection lost"
                return failure.getErrorMessage()  # a pb.Error's message (a CopiedFailure)

            answers = await defer.gatherResults(
                [d.addCallbacks(lambda _: "logged in", answer) for d in made])
            seen.update(answers)
            print(json.dumps(dict(seen)), flush=True)

        task.react(lambda reactor: defer.ensureDeferred(attack(reactor)))
    elif mode == "ssh-pipeline":
        print(json.dumps(ssh_pipeline(int(args[0]), args[1], int(args[2]))), flush=True)
    elif mode == "parallel":
        print(json.dumps(parallel(int(args[0]), int(args[1]), int(args[2]), args[3],
                                  float(args[4]))), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
