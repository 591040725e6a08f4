"""Uploads against a real service on loopback port 0: raw sockets and the CLI client."""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import threading

from twisted.internet import reactor, task, threads
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from cmdserver.commands.upload.engine import BATCH, HIGH_WATER
from cmdserver.commands.upload.key import read_key_file
from cmdserver.commands.upload.spool import DIRECT_MIN, temp_name
from cmdserver.tap import Options, makeService
from tests.helpers.upload import leftovers, listing, mac_of, temp_dir, wait_until

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


class Client:
    """A blocking line-door client (run it in a thread)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = self.sock.makefile("rb")

    def readline(self) -> str:
        return self.reader.readline().decode().rstrip("\r\n")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def close(self) -> None:
        self.reader.close()
        self.sock.close()


class ServiceTests(unittest.TestCase):
    @inlineCallbacks
    def setUp(self):  # type: ignore[override]  # trial waits on a returned Deferred
        self.base = temp_dir(self)
        self.root = os.path.join(self.base, "root")
        os.mkdir(self.root)
        self.data = os.path.join(self.base, "data")
        stale = os.path.join(self.root, temp_name("crashed", "0badf00d"))
        with open(stale, "wb") as f:
            f.write(b"partial bytes from a dead run")
        options = Options()
        options.parseOptions(["--line", "tcp:0:interface=127.0.0.1", "--data-dir", self.data,
                              "--root", self.root, "--audit-log", "none",
                              "--max-upload", "64M", "--ssh", "none", "--pb", "none",
                              "--http", "none"])
        self.service = makeService(options, reactor)
        self.service.startService()
        self.addCleanup(lambda: self.service.running and self.service.stopService())
        port = yield self.service.doors[0].listening
        self.port = port.getHost().port
        self.uploads = self.service.getServiceNamed("uploads").uploads
        yield self.service.getServiceNamed("uploads").cleaned
        self.key = read_key_file(os.path.join(self.data, "hmac.key"))

    def settled(self):
        return wait_until(lambda: not self.uploads.active
                          and not self.service.core.stats.connections["line"])

    def test_stale_files_were_removed_at_start(self):
        self.assertEqual(listing(self.root), [])

    def test_key_file_is_private(self):
        self.assertEqual(os.stat(os.path.join(self.data, "hmac.key")).st_mode & 0o777, 0o600)
        self.assertEqual(len(self.key), 32)

    @inlineCallbacks
    def cli(self, *args: str, env: dict | None = None):
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "cmdserver.cli", *args], env=env or ENV)
        return out.decode(), err.decode(), code

    @inlineCallbacks
    def test_cli_upload_good(self):
        src = os.path.join(self.base, "source.bin")
        data = os.urandom(3 << 20)
        with open(src, "wb") as f:
            f.write(data)
        out, err, code = yield self.cli("upload", src, "--as", "copy.bin", "--port",
                                        str(self.port), "--key-file",
                                        os.path.join(self.data, "hmac.key"))
        self.assertEqual((code, err), (0, ""))
        # One pass over the file: the MAC after the content, and the answer names it.
        self.assertEqual(out, f"Upload OK copy.bin {len(data)} "
                              f"mac=hmac-sha256:{mac_of(data, self.key)}\n")
        with open(os.path.join(self.root, "copy.bin"), "rb") as f:
            self.assertEqual(f.read(), data)
        # Again: the target exists now, and the client says so and fails.
        out, err, code = yield self.cli("upload", src, "--as", "copy.bin", "--port",
                                        str(self.port), "--key-file",
                                        os.path.join(self.data, "hmac.key"))
        self.assertEqual((code, out, err), (1, "", "Error: target exists: copy.bin\n"))

    @inlineCallbacks
    def test_cli_upload_wrong_key(self):
        src = os.path.join(self.base, "f.txt")
        with open(src, "wb") as f:
            f.write(b"some content\n")
        env = {**ENV, "WRONG_KEY": "11" * 32}
        out, err, code = yield self.cli("upload", src, "--port", str(self.port),
                                        "--key-env", "WRONG_KEY", env=env)
        self.assertEqual((code, out), (1, ""))
        self.assertEqual(err, "Error: HMAC mismatch, upload discarded\n")
        yield self.settled()
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_cli_upload_key_from_environment_and_name_with_space(self):
        src = os.path.join(self.base, "f.txt")
        with open(src, "wb") as f:
            f.write(b"x" * 1000)
        env = {**ENV, "CMDSERVER_HMAC_KEY": self.key.hex()}
        out, err, code = yield self.cli("upload", src, "--as", "with space.txt", "--port",
                                        str(self.port), env=env)
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("Upload OK with space.txt 1000 mac=hmac-sha256:"))
        self.assertEqual(listing(self.root), ["with space.txt"])

    @inlineCallbacks
    def test_cli_upload_options(self):
        """--mac blake2b and --sha256 on the trailer form; --mac-first, the older form."""
        src = os.path.join(self.base, "source.bin")
        data = os.urandom(DIRECT_MIN + 12345)  # large: the server hashes in its own thread
        with open(src, "wb") as f:
            f.write(data)
        key = ["--port", str(self.port), "--key-file", os.path.join(self.data, "hmac.key")]
        sha = hashlib.sha256(data).hexdigest()
        b2 = hashlib.blake2b(data, key=self.key, digest_size=32).hexdigest()
        for name, options, answer in [
                ("b2.bin", ["--mac", "blake2b"], f"mac=blake2b:{b2}"),
                ("sha.bin", ["--sha256"], f"mac=hmac-sha256:{mac_of(data, self.key)} "
                                          f"sha256={sha}"),
                ("first.bin", ["--mac-first"], f"sha256={sha}"),
                ("b2first.bin", ["--mac-first", "--mac", "blake2b"], f"sha256={sha}")]:
            out, err, code = yield self.cli("upload", src, "--as", name, *key, *options)
            self.assertEqual((code, err, out), (0, "", f"Upload OK {name} {len(data)} "
                                                       f"{answer}\n"))
            with open(os.path.join(self.root, name), "rb") as f:
                self.assertEqual(f.read(), data)

    @inlineCallbacks
    def test_cli_mac_the_server_does_not_take_is_refused_never_replaced(self):
        from dataclasses import replace

        self.assertEqual(self.uploads.settings.macs, ("hmac-sha256", "blake2b"))
        self.uploads.settings = replace(self.uploads.settings, macs=("hmac-sha256",))
        src = os.path.join(self.base, "f.txt")
        with open(src, "wb") as f:
            f.write(b"some content\n")
        out, err, code = yield self.cli("upload", src, "--mac", "blake2b", "--port",
                                        str(self.port), "--key-file",
                                        os.path.join(self.data, "hmac.key"))
        self.assertEqual((code, out, err), (1, "", "Error: MAC blake2b is not accepted here "
                                                   "(this server accepts: hmac-sha256)\n"))
        self.assertEqual(listing(self.root), [])

    @inlineCallbacks
    def test_cli_refused_outside_the_jail(self):
        src = os.path.join(self.base, "f.txt")
        with open(src, "wb") as f:
            f.write(b"x")
        out, err, code = yield self.cli("upload", src, "--as", "../escape", "--port",
                                        str(self.port), "--key-file",
                                        os.path.join(self.data, "hmac.key"))
        self.assertEqual((code, err), (1, "Error: path outside allowed roots\n"))
        self.assertFalse(os.path.exists(os.path.join(self.base, "escape")))

    @inlineCallbacks
    def test_cli_without_server(self):
        src = os.path.join(self.base, "f.txt")
        with open(src, "wb") as f:
            f.write(b"x")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        out, err, code = yield self.cli("upload", src, "--port", str(free), "--key-file",
                                        os.path.join(self.data, "hmac.key"))
        self.assertEqual(code, 1)
        self.assertTrue(err.startswith(f"Error: cannot connect to 127.0.0.1:{free}"), err)

    @inlineCallbacks
    def test_hmac_key_subcommand_prints_the_servers_key(self):
        out, err, code = yield self.cli("hmac-key", "--data-dir", self.data)
        self.assertEqual((code, out), (0, self.key.hex() + "\n"))

    @inlineCallbacks
    def upload_then_ping(self, name: str, data: bytes):
        """Send the upload and a ``ping`` right behind its bytes, in one send."""

        def talk():
            c = Client(self.port)
            c.send(f"upload {name} {len(data)} {mac_of(data, self.key)}\n".encode())
            ready = c.readline()
            c.send(data + b"ping\n")
            answers = [ready, c.readline(), c.readline()]
            c.close()
            return answers

        answers = yield threads.deferToThread(talk)
        self.assertEqual(answers, [
            f"Ready for {len(data)} bytes",
            f"Upload OK {name} {len(data)} sha256={hashlib.sha256(data).hexdigest()}",
            "pong"])

    @inlineCallbacks
    def test_socket_upload_with_extra_bytes_after_size(self):
        data = os.urandom(100_000)

        yield self.upload_then_ping("sock.bin", data)

    @inlineCallbacks
    def test_large_socket_upload_reads_into_blocks_then_lines_again(self):
        """Past the first reads, the socket is read straight into the upload's blocks,
        never past SIZE: the next command in the same send is still a command."""
        from cmdserver.commands.upload.engine import Upload

        data = os.urandom(DIRECT_MIN + 3 * BATCH + 12345)
        copied: list[int] = []
        write = Upload.write

        def counted_write(upload: Upload, chunk: bytes) -> None:
            copied.append(len(chunk))
            write(upload, chunk)

        self.patch(Upload, "write", counted_write)

        yield self.upload_then_ping("big.bin", data)
        self.assertLess(sum(copied), BATCH)  # at most what came with the command line
        with open(os.path.join(self.root, "big.bin"), "rb") as f:
            self.assertEqual(f.read(), data)

    @inlineCallbacks
    def test_slow_disk_stops_socket_reads_until_it_catches_up(self):
        gate = threading.Event()
        self.uploads.writer = lambda fd, buffers: (gate.wait(), os.writev(fd, buffers))[1]
        data = os.urandom(HIGH_WATER + 4 * BATCH)

        def talk():
            c = Client(self.port)
            c.send(f"upload slow.bin {len(data)} {mac_of(data, self.key)}\n".encode())
            ready = c.readline()
            c.send(data)
            answer = c.readline()
            c.close()
            return [ready, answer]

        talking = threads.deferToThread(talk)
        yield wait_until(lambda: any(u._paused for u in self.uploads.active))
        [upload] = self.uploads.active
        self.assertLessEqual(upload._in_flight, HIGH_WATER)
        received = upload.size - upload.remaining
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(upload.size - upload.remaining, received)  # not reading
        gate.set()
        answers = yield talking
        self.assertEqual(answers[1], f"Upload OK slow.bin {len(data)} "
                                     f"sha256={hashlib.sha256(data).hexdigest()}")
        with open(os.path.join(self.root, "slow.bin"), "rb") as f:
            self.assertEqual(f.read(), data)

    @inlineCallbacks
    def test_trailer_form_then_the_next_command_in_one_send(self):
        """Large (direct reads into the blocks, O_DIRECT): the content, the trailer and
        the next command in one send; the trailer is never taken for a command."""
        data = os.urandom(DIRECT_MIN + 3 * BATCH + 12345)
        mac = mac_of(data, self.key)

        def talk():
            c = Client(self.port)
            c.send(f"upload t.bin {len(data)} -\n".encode())
            ready = c.readline()
            c.send(data + f"MAC {mac}\r\nping\n".encode())
            answers = [ready, c.readline(), c.readline()]
            c.close()
            return answers

        answers = yield threads.deferToThread(talk)
        self.assertEqual(answers, [f"Ready for {len(data)} bytes",
                                   f"Upload OK t.bin {len(data)} mac=hmac-sha256:{mac}",
                                   "pong"])
        with open(os.path.join(self.root, "t.bin"), "rb") as f:
            self.assertEqual(f.read(), data)

    @inlineCallbacks
    def test_trailer_form_bad_endings_leave_nothing(self):
        data = os.urandom(DIRECT_MIN + 5)
        mac = mac_of(data, self.key)

        def talk(ending: bytes, close: bool = False) -> list[str]:
            c = Client(self.port)
            c.send(f"upload bad.bin {len(data)} -\n".encode())
            answers = [c.readline()]
            c.send(data + ending)
            if close:
                c.sock.shutdown(socket.SHUT_WR)
            else:
                c.send(b"ping\n")
            answers.append(c.readline())
            answers.append(c.readline())
            c.close()
            return answers

        ready = f"Ready for {len(data)} bytes"
        for ending, close, lines in [
                (f"MAC {'0' * 64}\n".encode(), False,
                 ["Error: HMAC mismatch, upload discarded", "pong"]),
                # A line that is not a trailer: the stream is out of step, so the
                # connection closes after the error and the `ping` never runs.
                (b"ping\n", False, ["Error: expected the trailer line 'MAC <64 hex digits>' "
                                    "after the content, upload discarded", ""]),
                (f"MAC {mac[:-2]}\n".encode(), False,
                 ["Error: the MAC must be 64 hex digits, upload discarded", ""]),
                (f"MAC {mac} x\n".encode(), False,
                 ["Error: extra bytes after the MAC in the trailer line, upload discarded",
                  ""]),
                (f"xMAC {mac}\n".encode(), False,  # one byte more than SIZE
                 ["Error: expected the trailer line 'MAC <64 hex digits>' after the "
                  "content, upload discarded", ""]),
                (b"", True, ["Error: upload incomplete: the client closed the stream "
                             "before the MAC trailer", ""])]:
            answers = yield threads.deferToThread(talk, ending, close)
            self.assertEqual(answers, [ready, *lines], ending)
            yield self.settled()
            self.assertEqual(listing(self.root), [], ending)
        # A trailer without its newline still counts when the stream ends there.
        answers = yield threads.deferToThread(talk, f"MAC {mac}".encode(), True)
        self.assertEqual(answers, [ready, f"Upload OK bad.bin {len(data)} mac=hmac-sha256:{mac}",
                                   ""])

    @inlineCallbacks
    def test_truncated_stream_then_disconnect(self):
        data = os.urandom(1 << 20)

        def talk():
            c = Client(self.port)
            c.send(f"upload cut.bin {len(data)} {mac_of(data, self.key)}\n".encode())
            ready = c.readline()
            c.send(data[: len(data) // 2])
            c.close()
            return ready

        ready = yield threads.deferToThread(talk)
        self.assertEqual(ready, f"Ready for {len(data)} bytes")
        yield self.settled()
        self.assertEqual(listing(self.root), [])
        self.assertEqual(leftovers(self.root), [])

    @inlineCallbacks
    def test_two_at_once_to_one_name(self):
        a, b = os.urandom(2 << 20), os.urandom(2 << 20)
        clients = []

        def start(data):
            c = Client(self.port)
            clients.append(c)
            c.send(f"upload same {len(data)} {mac_of(data, self.key)}\n".encode())
            return c.readline()

        def finish(c, data):
            c.send(data)
            answer = c.readline()
            c.close()
            return answer

        ready = yield threads.deferToThread(start, a)
        ready2 = yield threads.deferToThread(start, b)
        self.assertEqual((ready, ready2), ("Ready for 2097152 bytes",) * 2)
        answers = yield threads.deferToThread(
            lambda: [finish(clients[0], a), finish(clients[1], b)])
        self.assertEqual(sorted(x.split(" sha256=")[0] for x in answers),
                         ["Error: target exists: same, upload discarded",
                          "Upload OK same 2097152"])
        with open(os.path.join(self.root, "same"), "rb") as f:
            self.assertEqual(f.read(), a if answers[0].startswith("Upload OK") else b)
        yield self.settled()
        self.assertEqual(listing(self.root), ["same"])

    @inlineCallbacks
    def test_stop_service_during_an_upload_discards_it(self):
        data = os.urandom(1 << 20)

        def talk():
            c = Client(self.port)
            c.send(f"upload stop.bin {len(data)} {mac_of(data, self.key)}\n".encode())
            ready = c.readline()
            c.send(data[:1000])
            return c, ready

        c, ready = yield threads.deferToThread(talk)
        self.assertEqual(ready, f"Ready for {len(data)} bytes")
        yield wait_until(lambda: self.uploads.active
                         and next(iter(self.uploads.active)).remaining < len(data))
        yield self.service.stopService()
        c.close()
        self.assertEqual(listing(self.root), [])


def self_signed(directory: str) -> tuple[str, str]:
    """A throwaway key and certificate for 127.0.0.1 (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    key_path, cert_path = os.path.join(directory, "key.pem"), os.path.join(directory, "cert.pem")
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


class TlsTests(unittest.TestCase):
    @inlineCallbacks
    def test_cli_upload_over_tls(self):
        """The client reads past a greeting (here over TLS); without one (the other
        tests) it reads the ``Ready`` line first."""
        base = temp_dir(self)
        root, data = os.path.join(base, "root"), os.path.join(base, "data")
        os.mkdir(root)
        key_pem, cert_pem = self_signed(base)
        options = Options()
        options.parseOptions([
            "--line", f"ssl:0:privateKey={key_pem}:certKey={cert_pem}:interface=127.0.0.1",
            "--data-dir", data, "--root", root, "--audit-log", "none", "--ssh", "none",
            "--pb", "none", "--http", "none",
            "--greeting", "cmdserver ready; type 'help' for the commands."])  # read past
        service = makeService(options, reactor)
        service.startService()
        self.addCleanup(service.stopService)
        port = (yield service.doors[0].listening).getHost().port
        src = os.path.join(base, "src.bin")
        content = os.urandom(DIRECT_MIN + (1 << 20) + 7)
        with open(src, "wb") as f:
            f.write(content)
        from cmdserver.commands.upload.engine import Upload

        copied: list[int] = []  # under TLS the decrypted bytes are copied into the blocks
        write = Upload.write

        def counted_write(upload: Upload, chunk: bytes) -> None:
            copied.append(len(chunk))
            write(upload, chunk)

        self.patch(Upload, "write", counted_write)
        out, err, code = yield getProcessOutputAndValue(
            sys.executable, ["-m", "cmdserver.cli", "upload", src, "--port", str(port),
                             "--tls", "--ca-file", cert_pem, "--key-file",
                             os.path.join(data, "hmac.key")], env=ENV)
        self.assertEqual(code, 0, err)
        service_key = read_key_file(os.path.join(data, "hmac.key"))
        self.assertEqual(out.decode(), f"Upload OK src.bin {len(content)} "
                                       f"mac=hmac-sha256:{mac_of(content, service_key)}\n")
        with open(os.path.join(root, "src.bin"), "rb") as got:
            self.assertEqual(got.read(), content)
        self.assertEqual(sum(copied), len(content))
