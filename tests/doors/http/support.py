"""A real daemon (makeService) with its HTTP door on a loopback port, and blocking clients."""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
from typing import Any, cast

from twisted.internet import defer
from twisted.internet.address import IPv4Address

from cmdserver.auth.tokens import TokenStore
from tests.end_to_end.support import RunningService, in_thread


class Answer:
    def __init__(self, response: http.client.HTTPResponse) -> None:
        self.status = response.status
        self.headers = response.headers
        self.body = response.read()

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<{self.status} {self.body[:200]!r}>"


class HTTPServer(RunningService):
    """makeService with the HTTP door only (plus what ``argv`` adds)."""

    def __init__(self, tmp: str, *argv: str) -> None:
        os.makedirs(tmp, exist_ok=True)
        self.log_file = os.path.join(tmp, "syslog")
        with open(self.log_file, "w") as f:
            f.write("".join(f"log line {i}\n" for i in range(20)))
        args = list(argv)
        if "--line" not in args:
            args += ["--line", "none"]
        if "--http" not in args:
            args += ["--http", "tcp:0:interface=127.0.0.1"]
        if "--login-penalty" not in args:  # tests log in wrongly on purpose, many times
            args += ["--login-penalty", "0.01", "--login-penalty-max", "0.05"]
        super().__init__(tmp, *args, "--bcrypt-cost", "4", "--log-source", self.log_file)
        with open(os.path.join(self.data_dir, "initial-admin-password")) as f:
            self.password = f.read().strip()
        self.token = ""

    @defer.inlineCallbacks
    def start(self) -> Any:
        yield super().start()
        _, self.token = TokenStore(self.data_dir).add("admin")
        yield self.credentials.reload()
        return self

    @property
    def credentials(self) -> Any:
        return self.service.getServiceNamed("credentials-reload").credentials

    @property
    def port(self) -> int:
        [door] = [d for d in self.service.doors if d.door == "http"]
        assert door.port is not None
        return cast(IPv4Address, door.port.getHost()).port

    def basic(self, user: str = "admin", password: str | None = None) -> dict[str, str]:
        secret = f"{user}:{self.password if password is None else password}".encode()
        return {"Authorization": "Basic " + base64.b64encode(secret).decode()}

    def bearer(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token if token is None else token}"}

    def connection(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)

    def call(self, method: str, path: str, body: Any = None, headers: dict | None = None,
             connection: http.client.HTTPConnection | None = None) -> defer.Deferred:
        """One request in a thread (the reactor serves it meanwhile): its Answer."""
        return in_thread(self.blocking, method, path, body, headers, connection)

    def blocking(self, method: str, path: str, body: Any = None, headers: dict | None = None,
                 connection: http.client.HTTPConnection | None = None) -> Answer:
        own = connection is None
        conn = connection or self.connection()
        headers = dict(self.bearer() if headers is None else headers)
        if isinstance(body, dict | list):
            body = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body, headers)
            return Answer(conn.getresponse())
        finally:
            if own:
                conn.close()

    def command(self, name: str, body: Any = None, headers: dict | None = None,
                **kwargs: Any) -> defer.Deferred:
        return self.call("POST", f"/v1/commands/{name}", {} if body is None else body,
                         headers, **kwargs)

    def raw(self, data: bytes, read: bool = True, timeout: float = 10) -> defer.Deferred:
        """Send bytes on a fresh socket; everything the server sends until it closes."""
        def run() -> bytes:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
                s.sendall(data)
                got = b""
                while read and (chunk := s.recv(65536)):
                    got += chunk
                return got

        return in_thread(run)
