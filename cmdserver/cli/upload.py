"""``cmdserver upload FILE`` and ``cmdserver hmac-key``: the upload client and the key printer.

The client is a small blocking socket program: it sends ``upload NAME SIZE -``,
waits for ``Ready for SIZE bytes``, streams the file (``sendfile`` where it
can) while a thread computes its MAC, sends the MAC in the trailer line
``MAC <hex>`` and prints the server's answer: one pass over the file.  It
exits 0 only on ``Upload OK``.  ``--mac-first`` uses the older form (the MAC
in the command line, computed in a first pass) for servers without the trailer.

It imports only the standard library (and the stdlib-only key and MAC
modules): its start-up is part of every upload's time.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
import threading
import time
from collections.abc import Callable
from io import BufferedIOBase
from typing import IO, Any, NamedTuple

from cmdserver.cli.login import NoPassword, add_password_argument, read_password
from cmdserver.commands.upload.key import BadKeyError, parse_key, read_key_file
from cmdserver.commands.upload.mac import ALGORITHMS, HMAC_SHA256, new_mac, trailer_line

CHUNK = 1 << 20
SEND_STEP = 8 << 20  # bytes per sendfile call between progress updates
DEFAULT_PORT = 9999
KEY_ENV = "CMDSERVER_HMAC_KEY"
MAX_PREAMBLE_LINES = 20  # lines tolerated before "Ready" or an error (a greeting, a login's)


class UploadFailed(Exception):  # noqa: N818  (a client outcome, printed as is)
    """The upload did not succeed; the message is what the user sees."""


class Timings(NamedTuple):
    """How long each phase took (for ``--verbose`` and the benchmark): hashing
    before sending (only with ``--mac-first``), sending (hashing meanwhile)
    and waiting for the answer."""

    hashing: float
    sending: float
    answer: float


class Progress:
    """A one-line progress bar with rate and ETA, drawn only on a terminal."""

    def __init__(self, label: str, total: int, stream: IO[str] | None) -> None:
        self.label = label
        self.total = total
        self.stream = stream if stream is not None and stream.isatty() else None
        self.start = time.monotonic()
        self.last = 0.0

    def update(self, done: int, final: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if not final and now - self.last < 0.1:
            return
        self.last = now
        self.stream.write("\r" + self.render(done, now - self.start))
        if final:
            self.stream.write("\n")
        self.stream.flush()

    def render(self, done: int, elapsed: float) -> str:
        fraction = done / self.total if self.total else 1.0
        width = 24
        bar = "#" * int(fraction * width)
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        return (f"{self.label:<8} [{bar:<{width}}] {fraction:4.0%} {human(done)}/"
                f"{human(self.total)} {human(rate)}/s ETA {format_eta(eta)}")


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def format_eta(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    return f"{seconds // 60}:{seconds % 60:02d}"


def file_hmac(f: BufferedIOBase, key: bytes, size: int,
              progress: Callable[[int], None] = lambda n: None,
              algorithm: str = HMAC_SHA256) -> str:
    """The hex MAC (HMAC-SHA256 unless ``algorithm`` says otherwise) of the first
    ``size`` bytes of ``f``, read in 1 MiB chunks."""
    mac = new_mac(algorithm, key)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    done = 0
    while done < size:
        n = f.readinto(view[:min(CHUNK, size - done)])
        if not n:
            raise UploadFailed("Error: the file shrank while it was read")
        mac.update(view[:n])
        done += n
        progress(done)
    return mac.hexdigest()


def upload(path: str, name: str, key: bytes, host: str = "127.0.0.1",
           port: int = DEFAULT_PORT, tls: bool = False, ca_file: str | None = None,
           timeout: float = 300.0, stderr: IO[str] | None = None,
           login: tuple[str, str] | None = None, algorithm: str = HMAC_SHA256,
           sha256: bool = False, mac_first: bool = False) -> tuple[str, Timings]:
    """Upload ``path`` as ``name``; returns the server's ``Upload OK`` line.

    The MAC (``algorithm``) is computed while the file is sent and follows it
    in the trailer line; with ``mac_first`` it is computed first and sent in
    the command line (the older form: two reads of the file).  ``sha256`` asks
    the server for the content's SHA-256 in its answer.  ``login`` is (user,
    password) for a door that requires ``login`` first.  Raises
    :class:`UploadFailed` with the server's error line (or a local one).
    """
    if any(c in name for c in "\r\n\0") or not name:
        raise UploadFailed("Error: the name must be one line of text")
    try:
        mac = new_mac(algorithm, key)
    except ValueError as e:
        raise UploadFailed(f"Error: {e}") from None
    try:
        f = open(path, "rb")  # noqa: SIM115  (closed below, used by sendfile)
    except OSError as e:
        raise UploadFailed(f"Error: {path}: {e.strerror}") from None
    with f:
        size = os.fstat(f.fileno()).st_size
        t0 = time.monotonic()
        given = "-"
        if mac_first:
            bar = Progress("hashing", size, stderr)
            given = file_hmac(f, key, size, bar.update, algorithm)
            bar.update(size, final=True)
        t1 = time.monotonic()
        options = "" if algorithm == HMAC_SHA256 else f" --mac {algorithm}"
        options += " --sha256" if sha256 else ""
        sock = connect(host, port, tls, ca_file, timeout)
        with sock, sock.makefile("rb") as reader:
            if login is not None:  # pipelined: the upload line waits for the login
                sock.sendall(f"login {shlex.join(login)}\n".encode())
            sock.sendall(f"upload {shlex.quote(name)} {size} {given}{options}\n".encode())
            wait_ready(reader, size)
            t2 = time.monotonic()
            bar = Progress("sending", size, stderr)
            if mac_first:
                send_file(sock, f, size, bar, reader)
            else:
                send_hashing(sock, f, size, mac, bar, reader)
                send_trailer(sock, trailer_line(mac.digest()), reader)
            t3 = time.monotonic()
            answer = read_answer(reader)
            t4 = time.monotonic()
    if not answer.startswith("Upload OK "):
        raise UploadFailed(answer)
    return answer, Timings(t1 - t0, t3 - t2, t4 - t3)


def connect(host: str, port: int, tls: bool, ca_file: str | None,
            timeout: float) -> socket.socket:
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise UploadFailed(f"Error: cannot connect to {host}:{port}: "
                           f"{e.strerror or e}") from None
    if not tls:
        return sock
    import ssl  # only here: plain uploads do not pay for it

    context = ssl.create_default_context(cafile=ca_file)
    try:
        return context.wrap_socket(sock, server_hostname=host)
    except (ssl.SSLError, OSError) as e:
        sock.close()
        raise UploadFailed(f"Error: TLS with {host}:{port} failed: {e}") from None


def read_line(reader: IO[bytes]) -> str:
    try:
        raw = reader.readline(65536)
    except OSError as e:
        raise UploadFailed(f"Error: connection lost: {e.strerror or e}") from None
    if not raw:
        raise UploadFailed("Error: the server closed the connection")
    return raw.decode("utf-8", "replace").rstrip("\r\n")


def wait_ready(reader: IO[bytes], size: int) -> None:
    """Skip what comes first (the door's greeting if it sends one, the login's answer);
    stop at ``Ready for SIZE bytes`` or fail with the server's error."""
    ready = f"Ready for {size} bytes"
    for _ in range(MAX_PREAMBLE_LINES):
        line = read_line(reader)
        if line == ready:
            return
        if line.startswith("Error") or line == "Command not found.":
            raise UploadFailed(line)
    raise UploadFailed("Error: the server did not answer the upload command")


def is_tls(sock: socket.socket) -> bool:
    return "ssl" in sys.modules and isinstance(sock, sys.modules["ssl"].SSLSocket)


def send_file(sock: socket.socket, f: BufferedIOBase, size: int, bar: Progress,
              reader: IO[bytes], mac: Any = None) -> None:
    """Stream the first ``size`` bytes of ``f``: ``sendfile`` on plain TCP (no copy
    through user space), 1 MiB reads and ``sendall`` through TLS (each read
    also hashed into ``mac``, if given)."""
    sent = 0
    f.seek(0)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    tls = is_tls(sock)
    try:
        while sent < size:
            step = min(SEND_STEP, size - sent)
            if tls:
                n = f.readinto(view[:min(CHUNK, step)])
                if n:
                    if mac is not None:
                        mac.update(view[:n])
                    sock.sendall(view[:n])
            else:
                n = sock.sendfile(f, offset=sent, count=step)
            if not n:
                raise UploadFailed("Error: the file shrank while it was sent")
            sent += n
            bar.update(sent)
    except OSError as e:
        raise UploadFailed(lost_while_sending(e, reader)) from None
    bar.update(sent, final=True)


def lost_while_sending(e: OSError, reader: IO[bytes]) -> str:
    """The server may have said why before it hung up (an idle timeout, a shutdown)."""
    try:
        return read_line(reader)
    except UploadFailed:
        return f"Error: connection lost while sending: {e.strerror or e}"


def send_hashing(sock: socket.socket, f: BufferedIOBase, size: int, mac: Any, bar: Progress,
                 reader: IO[bytes]) -> None:
    """Stream the first ``size`` bytes of ``f`` and hash them into ``mac``, in one pass.

    On plain TCP the kernel sends the file (``sendfile``) while a thread hashes
    it from the page cache (``pread`` in 1 MiB steps; hashlib lets go of the
    GIL meanwhile): the two run side by side.  Through TLS each 1 MiB read is
    hashed, then sent.
    """
    if is_tls(sock):
        send_file(sock, f, size, bar, reader, mac)
        return
    hasher = _Hasher(f.fileno(), size, mac)
    hasher.start()
    try:
        send_file(sock, f, size, bar, reader)
    except BaseException:
        hasher.stop.set()
        hasher.join()
        raise
    hasher.join()
    if hasher.error is not None:
        raise UploadFailed(hasher.error)


class _Hasher(threading.Thread):
    """Hashes the first ``size`` bytes of a file into ``mac``, at its own offsets."""

    def __init__(self, fd: int, size: int, mac: Any) -> None:
        super().__init__(name="upload-mac", daemon=True)
        self.fd = fd
        self.size = size
        self.mac = mac
        self.stop = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        done = 0
        try:
            while done < self.size and not self.stop.is_set():
                n = os.preadv(self.fd, [view[:min(CHUNK, self.size - done)]], done)
                if not n:
                    self.error = "Error: the file shrank while it was sent"
                    return
                self.mac.update(view[:n])
                done += n
        except OSError as e:
            self.error = f"Error: cannot read the file: {e.strerror or e}"


def send_trailer(sock: socket.socket, line: bytes, reader: IO[bytes]) -> None:
    try:
        sock.sendall(line)
    except OSError as e:
        raise UploadFailed(lost_while_sending(e, reader)) from None


def read_answer(reader: IO[bytes]) -> str:
    line = read_line(reader)
    while not line:
        line = read_line(reader)
    return line


def load_key(args: argparse.Namespace) -> bytes:
    try:
        if args.key_file:
            return read_key_file(args.key_file)
        var = args.key_env or KEY_ENV
        value = os.environ.get(var)
        if value is None:
            raise UploadFailed(f"Error: no key: give --key-file FILE or --key-env VAR "
                               f"(or set {KEY_ENV})")
        return parse_key(value)
    except OSError as e:
        raise UploadFailed(f"Error: {args.key_file}: {e.strerror}") from None
    except BadKeyError as e:
        raise UploadFailed(f"Error: bad key: {e}") from None


def run_upload(args: argparse.Namespace) -> int:
    try:
        key = load_key(args)
        login = (args.user, login_password(args)) if args.user else None
        answer, timings = upload(args.file, args.name or os.path.basename(args.file), key,
                                 args.host, args.port, args.tls, args.ca_file, args.timeout,
                                 sys.stderr, login, args.mac, args.sha256, args.mac_first)
    except UploadFailed as e:
        print(e, file=sys.stderr)
        return 1
    print(answer)
    if args.verbose:
        print(f"hashing {timings.hashing:.3f} s, sending {timings.sending:.3f} s, "
              f"answer {timings.answer:.3f} s", file=sys.stderr)
    return 0


def login_password(args: argparse.Namespace) -> str:
    """The password for ``--user``: from ``--password-env``, else a prompt on a terminal."""
    try:
        return read_password(args, args.user)
    except NoPassword:
        raise UploadFailed(f"Error: --user needs a password: set {args.password_env}") from None


def run_hmac_key(args: argparse.Namespace) -> int:
    from cmdserver.auth.users import CredentialError, UserStore
    from cmdserver.commands.upload.key import server_key
    from cmdserver.tap import prepare_data_dir

    data_dir = os.path.abspath(args.data_dir)
    try:
        prepare_data_dir(data_dir)
        if args.user:
            key = UserStore(data_dir).ensure_hmac_key(args.user)
        else:
            key = server_key(data_dir)
    except CredentialError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except (OSError, BadKeyError) as e:
        print(f"Error: {data_dir}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    print(key.hex())
    return 0


def register(subparsers: Any) -> None:
    """Add ``upload`` and ``hmac-key`` to the ``cmdserver`` console script."""
    p = subparsers.add_parser(
        "upload", help="send a file to a cmdserver; it appears only if its MAC matches",
        description="Send FILE to the server's line door, hashing it while it is sent "
        "(one read of the file); the MAC follows the content. The server checks the "
        "MAC (HMAC-SHA256 unless --mac says otherwise) under the shared key before the "
        "file appears. Exit status 0 only on 'Upload OK'.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--as", dest="name", metavar="NAME",
                   help="name on the server, inside its jail (default: FILE's base name)")
    p.add_argument("--host", default="127.0.0.1", help="server address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT,
                   help=f"line door port (default: {DEFAULT_PORT})")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--key-file", metavar="F", help="file with the key (hex, as "
                      "'cmdserver hmac-key' prints it)")
    keys.add_argument("--key-env", metavar="VAR",
                      help=f"environment variable with the key in hex (default: {KEY_ENV})")
    p.add_argument("--tls", action="store_true", help="speak TLS (for an ssl: endpoint)")
    p.add_argument("--user", metavar="NAME", help="log in first (for a door that requires "
                   "login); the upload is then checked against NAME's own key if they have one")
    add_password_argument(p, "the password for --user")
    p.add_argument("--ca-file", metavar="F", help="CA certificates to check the server's "
                   "TLS certificate against (default: the system's)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="seconds to wait on the network before giving up (default: 300)")
    p.add_argument("--mac", choices=ALGORITHMS, default=HMAC_SHA256,
                   help="the MAC: hmac-sha256 (default), or blake2b (keyed BLAKE2b, faster "
                   "on CPUs without SHA instructions); a server that does not take it "
                   "refuses the upload, nothing else is used instead")
    p.add_argument("--sha256", action="store_true",
                   help="ask the server for the content's SHA-256 in its answer (it "
                   "then hashes the bytes twice)")
    p.add_argument("--mac-first", action="store_true",
                   help="compute the MAC before sending and put it in the command line "
                   "(for servers without the trailer form; reads the file twice)")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="print how long hashing and sending took, on stderr")
    p.set_defaults(func=run_upload)

    k = subparsers.add_parser(
        "hmac-key", help="print the server's upload HMAC key (hex), creating it if needed",
        description="Print the server's upload HMAC key in hex; give it to the clients "
        "that may upload. It is created (0600) on first use. With --user, print that "
        "user's own key instead (created if needed): uploads by a logged-in user are "
        "checked against their own key when they have one.")
    k.add_argument("--data-dir", "-d", default="cmdserver-data",
                   help="the daemon's data directory (default: ./cmdserver-data)")
    k.add_argument("--user", metavar="NAME", help="a user's own key, not the server's")
    k.set_defaults(func=run_hmac_key)
