"""The HTTP door: ``twisted.web`` in front of the command core.

One :class:`HTTPDoor` per endpoint holds what its connections share (the core,
the portal, the upload engine, the allowed Host names, the metrics registry).
Each connection is an :class:`HTTPChannel` and one session in the core; each
request an :class:`HTTPRequest`, routed by :meth:`Root.render`:

==========================  =======================================================
``POST /v1/commands/NAME``  run a command (:mod:`.api`), JSON or NDJSON stream
``GET /v1/commands``        describe the commands the door serves
``GET /v1/openapi.json``    an OpenAPI 3.1 document built from the registry
``GET|PUT /v1/files/PATH``  download (with Range) or upload a file (:mod:`.files`)
``POST /RPC2``              XML-RPC, a method per command (:mod:`.rpc`)
``GET /metrics``            Prometheus metrics (:mod:`.metrics`)
``GET /healthz``            200 while every door listens, else 503
==========================  =======================================================

Every request's ``Host`` must name the door (stops DNS rebinding: a web page
whose name now resolves to 127.0.0.1 still says its own name).  Request bodies
are bounded before they are read: 1 MiB for a command or an XML-RPC call
(:class:`Body`); an upload's body goes to the upload engine as it arrives, once
its sender is logged in and the upload has begun (:mod:`.files`), never into
memory or a temporary file of its own.  Answers are JSON, errors
``{"error": MESSAGE}`` with the status of :mod:`.errors`; there are no cookies,
no CORS headers and no HTML.
"""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server
from twisted.web.server import NOT_DONE_YET

from cmdserver.auth.tls import parse_description
from cmdserver.core import INTERNAL_ERROR, CommandCore
from cmdserver.doors.http import DOOR
from cmdserver.doors.http.errors import (
    INTERNAL,
    METHOD_NOT_ALLOWED,
    MISDIRECTED,
    NOT_FOUND,
    REASONS,
    TOO_LARGE,
    HTTPError,
    encode,
    failure_answer,
    message_of,
    status_of,
)
from cmdserver.doors.http.login import Login, authenticate
from cmdserver.doors.limits import TOO_MANY_CONNECTIONS, format_peer
from cmdserver.sessions import Session

log = Logger()

DEFAULT_ENDPOINT = "tcp:9898:interface=127.0.0.1"
MAX_BODY = 1 << 20  # bytes of a command's or an XML-RPC call's body
EARLY_CLOSE = 5.0  # seconds a refused upload's sender may go on sending before we hang up
JSON = b"application/json"
COMMON_HEADERS = ((b"Cache-Control", b"no-store"), (b"X-Content-Type-Options", b"nosniff"))


def refusal(reason: str) -> bytes:
    """The whole answer a connection refused in the connection limits reads: 503
    for too many connections, 429 for an address the login gate penalises."""
    status = (b"503 Service Unavailable" if reason == TOO_MANY_CONNECTIONS
              else b"429 Too Many Requests")
    body = encode({"error": reason})
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, len(body), body))
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})


@dataclass(frozen=True)
class HTTPSettings:
    """One endpoint's settings."""

    # The names a request's Host may give (lowercase, without a port); None: any
    # (a UNIX socket, which no web page can reach).
    hosts: frozenset[str] | None = frozenset(LOOPBACK_NAMES)
    any_address: bool = False  # also any IP address literal (a wildcard interface)
    metrics_public: bool = False  # /metrics without a login
    idle_timeout: float | None = 300
    max_body: int = MAX_BODY


def host_names(description: str, extra: list[str] | tuple[str, ...] = ()
               ) -> tuple[frozenset[str] | None, bool]:
    """The Host names an endpoint answers to, and whether any IP literal will do.

    ``localhost`` and the loopback addresses always; the endpoint's interface
    address; the names given with ``--http-host``.  An endpoint on a wildcard
    address (no interface, ``0.0.0.0``, ``::``) takes any IP address literal too:
    no rebinding attack can send one (the browser's Host is the attacker's name).
    A UNIX socket takes any Host: no web page reaches it.
    """
    kind, _, kwargs = parse_description(description)
    if kind == "unix":
        return None, False
    names = set(LOOPBACK_NAMES) | {n.lower().rstrip(".") for n in extra}
    interface = kwargs.get("interface", "")
    wildcard = interface in ("", "0.0.0.0", "::")
    if not wildcard:
        names.add(_bare(interface.lower()))
    return frozenset(names), wildcard


def _bare(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def split_host(header: bytes) -> str:
    """The name part of a Host header (``[::1]:8080`` → ``::1``), lowercase."""
    text = header.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    name, colon, port = text.rpartition(":")
    if colon and port.isdigit() and ":" not in name:
        text = name
    return text.rstrip(".")


class HTTPDoor:
    """What every connection of one HTTP endpoint shares."""

    def __init__(self, core: CommandCore, portal: Portal, settings: HTTPSettings,
                 uploads: Any = None, service: Any = None) -> None:
        self.core = core
        self.portal = portal
        self.settings = settings
        self.uploads = uploads  # the upload engine (commands.upload.engine.Uploads), if any
        self.service = service  # CmdServerService: its doors (healthz) and audit file
        self.reactor = core.reactor
        self._metrics: Any = None
        self.root = Root(self)

    @property
    def metrics(self) -> Any:
        """The door's Prometheus registry, made on the first scrape."""
        if self._metrics is None:
            from cmdserver.doors.http.metrics import metrics_registry

            self._metrics = metrics_registry(self)
        return self._metrics

    def host_allowed(self, request: Any) -> bool:
        names = self.settings.hosts
        if names is None:
            return True
        header = request.requestHeaders.getRawHeaders(b"host")
        if not header:
            return False
        name = split_host(header[0])
        if name in names:
            return True
        if self.settings.any_address:
            try:
                ipaddress.ip_address(name)
            except ValueError:
                return False
            return True
        return False

    def check_host(self, request: Any) -> None:
        if not self.host_allowed(request):
            header = request.requestHeaders.getRawHeaders(b"host")
            shown = header[0].decode("ascii", "replace")[:64] if header else None
            raise HTTPError(MISDIRECTED, "no Host header" if shown is None else
                            f"Host {shown!r} is not a name of this server "
                            "(--http-host adds one)")


class HTTPChannel(http.HTTPChannel):
    """One HTTP connection: one session in the core, its login, its requests."""

    door: HTTPDoor  # set by the site when it builds the channel
    session: Session
    transport: Any  # set in makeConnection: TCP, TLS or UNIX, under the limits' wrapper

    def __init__(self) -> None:
        super().__init__()
        self.logins: dict[bytes, Login] = {}  # Authorization header -> its login
        self.login_failures = 0

    def connectionMade(self) -> None:
        super().connectionMade()
        self.peer = format_peer(self.transport.getPeer())
        self.session = self.door.core.open_session(DOOR, self.peer, self.transport)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        super().connectionLost(reason)  # the requests' notifyFinish errbacks cancel commands
        self.logins.clear()
        session = getattr(self, "session", None)
        if session is not None:
            self.door.core.close_session(session)

    def remember(self, header: bytes, login: Login) -> None:
        """Credentials that succeeded: later requests with them skip the check."""
        if len(self.logins) >= 4:
            self.logins.clear()
        self.logins[header] = login

    def _send100Continue(self) -> None:
        # Twisted's answer to "Expect: 100-continue", sent as the headers are in; an
        # upload sends it itself once it has begun (so a refusal costs no body).
        request = self.requests[-1] if self.requests else None
        if isinstance(request, HTTPRequest) and request.holds_continue:
            request.continue_wanted = True
            return
        super()._send100Continue()

    # -- what a command may ask of its connection (commands.base.Session) --------

    def end_session(self) -> None:
        """``exit`` is not served here; a program closes its connection itself."""

    def receive_raw(self, size: int, consumer: Any) -> None:
        raise RuntimeError("the HTTP door takes uploads with PUT /v1/files")

    def raw_input_unavailable(self, usage: str) -> str | None:
        return ("upload: over HTTP, PUT the file's bytes to /v1/files/NAME with its "
                "HMAC in the X-Cmdserver-HMAC header")


class Body(io.BytesIO):
    """A request's body in memory, up to a cap: past it the request is answered 413
    and the connection closed, without reading the rest."""

    def __init__(self, request: HTTPRequest, limit: int) -> None:
        super().__init__()
        self.request = request
        self.limit = limit
        self.size = 0

    def write(self, data: Any) -> int:
        self.size += len(data)
        if self.size > self.limit:
            self.request.answer_early(HTTPError(
                TOO_LARGE, f"request body over {self.limit} bytes"))
            return 0
        return super().write(data)


class HTTPRequest(server.Request):
    """A request on the HTTP door: bounded bodies, JSON errors, early answers."""

    defaultContentType = JSON
    channel: HTTPChannel

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gone = False  # the connection was lost
        self.early: HTTPError | None = None  # answered before the body was read
        self.holds_continue = False  # "100 Continue" waits for the upload to begin
        self.continue_wanted = False  # ... and the client asked for it
        self.processing = False  # the whole body is in: the handler runs
        self.target = b""  # the request line's path (request.path is set with the body in)
        self.closing: Any = None  # the hang-up after an early answer

    def gotLength(self, length: int | None) -> None:
        door = self.channel.door
        # The request line is the channel's until the whole body is in; an upload must
        # know where it goes before then.
        method, path = self.channel._command, self.channel._path
        self.target = path.split(b"?", 1)[0]
        if method == b"PUT" and path.startswith(b"/v1/files/") and door.uploads is not None:
            from cmdserver.doors.http.files import UploadBody

            self.holds_continue = True
            self.content = UploadBody(self, length)
            return
        self.content = Body(self, door.settings.max_body)
        if length is not None and length > door.settings.max_body:
            self.answer_early(HTTPError(TOO_LARGE,
                                        f"request body over {door.settings.max_body} bytes"))

    def send_continue(self) -> None:
        """The upload has begun: let a client that waits for it send the body."""
        self.holds_continue = False
        if self.continue_wanted and not self.gone:
            self.continue_wanted = False
            self.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def answer_early(self, error: HTTPError) -> None:
        """Answer before the body is in (too large, not logged in, an upload refused)
        and close the connection: at once if the client waits for ``100 Continue``,
        else once the body is in or after a few seconds (so the client, busy
        sending, reads the answer rather than a reset)."""
        if self.early is not None or self.gone:
            return
        self.early = error
        self.channel.persistent = False
        body = encode({"error": error.message})
        reason = REASONS.get(error.status) or http.RESPONSES.get(error.status, b"")
        head = [b"HTTP/1.1 %d %s" % (error.status, reason),
                b"Content-Type: application/json", b"Content-Length: %d" % len(body),
                b"Connection: close", *(b"%s: %s" % h for h in COMMON_HEADERS),
                *(b"%s: %s" % h for h in error.headers)]
        transport = self.channel.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        if self.continue_wanted:
            transport.loseConnection()
        else:
            self.closing = self.channel.callLater(EARLY_CLOSE, transport.loseConnection)

    def process(self) -> None:
        self.processing = True
        if self.early is not None:  # answered already: the body was only drained
            self.channel.transport.loseConnection()
            return
        super().process()

    def connectionLost(self, reason: Failure) -> None:
        self.gone = True
        if self.closing is not None and self.closing.active():
            self.closing.cancel()
        super().connectionLost(reason)

    def processingFailed(self, reason: Failure) -> None:
        """A bug: log it, answer 500 in JSON (never a traceback)."""
        log.failure("http: {method} {path} failed", reason, method=self.method,
                    path=self.path[:200])
        if self.gone or self.finished:
            return
        if self.startedWriting:  # too late for a status: cut the answer short
            self.channel.transport.loseConnection()
            return
        answer(self, INTERNAL, {"error": INTERNAL_ERROR})

    def accepts_stream(self) -> bool:
        accept = self.requestHeaders.getRawHeaders(b"accept")
        return accept is not None and b"application/x-ndjson" in accept[0].lower()


def prepare(request: Any, status: int, content_type: bytes = JSON) -> None:
    request.setResponseCode(status, REASONS.get(status))
    headers = request.responseHeaders
    headers.setRawHeaders(b"Content-Type", [content_type])
    for name, value in COMMON_HEADERS:
        headers.setRawHeaders(name, [value])


def answer(request: Any, status: int, value: Any,
           headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """Send a whole JSON answer on a request that is still open (from a callback)."""
    if getattr(request, "gone", False) or request.finished:
        return
    body = encode(value)
    prepare(request, status)
    for name, header in headers:
        request.responseHeaders.addRawHeader(name, header)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


def error_body(request: Any, error: BaseException | None) -> bytes:
    """The JSON error answer for ``error`` (as render's return value)."""
    status, message = status_of(error), message_of(error)
    prepare(request, status)
    if isinstance(error, HTTPError):
        for name, value in error.headers:
            request.responseHeaders.addRawHeader(name, value)
        if error.close:
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            request.channel.persistent = False
    elif status == INTERNAL:
        log.failure("http: {path} failed", Failure(error), path=request.path[:200])
    return encode({"error": message})


def fail(request: Any, failure: Failure) -> None:
    """A Deferred's failure as the JSON error answer (from a callback)."""
    if getattr(request, "gone", False) or request.finished:
        return
    body = error_body(request, failure.value)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    request.write(body)
    request.finish()


Handler = Callable[[Any, Login], "bytes | int"]


class Root(resource.Resource):
    """Every path of the door, routed by hand (no resource tree to walk)."""

    isLeaf = True

    def __init__(self, door: HTTPDoor) -> None:
        super().__init__()
        self.door = door
        from cmdserver.doors.http import api, files, metrics, rpc

        self.api = api.CommandAPI(door)
        self.files = files.Files(door)
        self.rpc = rpc.CommandRPC(door)
        self.monitoring = metrics.Monitoring(door)

    def render(self, request: Any) -> bytes | int:
        try:
            self.door.check_host(request)
            return self.route(request)
        except HTTPError as e:
            return error_body(request, e)

    def route(self, request: Any) -> bytes | int:
        path, method = request.path, request.method
        if path.startswith(b"/v1/commands/"):
            self.allow(request, (b"POST",))
            return self.logged_in(request, self.api.run)
        if path.startswith(b"/v1/files/"):
            self.allow(request, (b"GET", b"HEAD", b"PUT"))
            if method == b"PUT":
                return self.files.put(request)
            return self.logged_in(request, self.files.get)
        if path == b"/RPC2":
            self.allow(request, (b"POST",))
            return self.logged_in(request, self.rpc.call)
        if path == b"/v1/commands":
            self.allow(request, (b"GET", b"HEAD"))
            return self.logged_in(request, self.api.describe)
        if path == b"/v1/openapi.json":
            self.allow(request, (b"GET", b"HEAD"))
            return self.logged_in(request, self.api.openapi)
        if path == b"/metrics":
            self.allow(request, (b"GET", b"HEAD"))
            if self.door.settings.metrics_public:
                return self.monitoring.metrics(request, None)
            return self.logged_in(request, self.monitoring.metrics)
        if path == b"/healthz":
            self.allow(request, (b"GET", b"HEAD"))
            return self.monitoring.healthz(request)
        raise HTTPError(NOT_FOUND, "not found")

    @staticmethod
    def allow(request: Any, methods: tuple[bytes, ...]) -> None:
        if request.method not in methods:
            raise HTTPError(METHOD_NOT_ALLOWED, f"use {' or '.join(m.decode() for m in methods)}",
                            ((b"Allow", b", ".join(methods)),))

    def logged_in(self, request: Any, handler: Handler) -> bytes | int:
        """Run ``handler(request, login)`` once the request's sender is logged in."""
        login = authenticate(request.channel, request)
        if isinstance(login, Login):
            return handler(request, login)

        def run(login: Login) -> None:
            if request.gone:
                return
            try:
                body = handler(request, login)
            except HTTPError as e:
                body = error_body(request, e)
            if body is not NOT_DONE_YET:
                assert isinstance(body, bytes)
                request.setHeader(b"Content-Length", b"%d" % len(body))
                request.write(body)
                request.finish()

        login.addCallbacks(run, lambda f: fail(request, f))
        login.addErrback(request.processingFailed)
        return NOT_DONE_YET


class HTTPSite(server.Site):
    """The door's factory: :class:`HTTPChannel` connections, no access log (the audit
    log records every command), HTTP/1.1 only."""

    protocol = HTTPChannel  # type: ignore[assignment]  # our channel, not the h2 switch
    requestFactory = HTTPRequest
    noisy = False

    def __init__(self, door: HTTPDoor) -> None:
        super().__init__(door.root, parsePOSTFormSubmission=False,
                         timeout=door.settings.idle_timeout or None, reactor=door.reactor)
        self.door = door
        self.displayTracebacks = False

    def buildProtocol(self, addr: Any) -> Any:
        channel = super().buildProtocol(addr)
        channel.door = self.door
        return channel

    def log(self, request: Any) -> None:
        pass

    def acceptableProtocols(self) -> list[bytes]:
        return [b"http/1.1"]


def build(env: Any, endpoint: str) -> Any:
    """The HTTP door on ``endpoint``."""
    from cmdserver.doors import Door

    options = env.options
    names, any_address = host_names(endpoint, options["http-host"])
    settings = HTTPSettings(hosts=names, any_address=any_address,
                            metrics_public=bool(options["metrics-public"]),
                            idle_timeout=options["idle-timeout"])
    door = HTTPDoor(env.core, env.service.portal, settings, env.uploads, env.service)
    log.info("http door {endpoint}: Host names {names}{public}", endpoint=endpoint,
             names="any" if names is None else ", ".join(sorted(names)) +
             (" and any IP address" if any_address else ""),
             public=", /metrics without login" if settings.metrics_public else "")
    return Door(HTTPSite(door), refusal)


def deferred_answer(request: Any, d: Deferred, on_value: Callable[[Any], tuple[int, Any]],
                    on_error: Callable[[str], Any] = lambda message: {"error": message}
                    ) -> int:
    """Answer ``request`` when ``d`` fires: ``on_value(value)`` gives the status and
    the JSON value; a failure gives its status and ``on_error(message)``.  A client
    that goes away cancels ``d``."""
    request.notifyFinish().addErrback(lambda _: d.cancel())

    def done(value: Any) -> None:
        status, body = on_value(value)
        answer(request, status, body)

    def failed(failure: Failure) -> None:
        if request.gone:
            return
        status, message = failure_answer(failure)  # the core logged a command's bug
        answer(request, status, on_error(message))

    d.addCallbacks(done, failed).addErrback(request.processingFailed)
    return NOT_DONE_YET
