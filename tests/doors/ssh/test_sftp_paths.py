"""The jail as SFTP clients see it, as under OpenSSH's ChrootDirectory: one root is
/, several are listed in a read-only / as root1, root2 …; no server path reaches
a client, in names or in messages."""

from __future__ import annotations

import os
import stat
from typing import Any, cast

from twisted.conch.ssh.filetransfer import (
    FX_FAILURE,
    FX_NO_SUCH_FILE,
    FX_PERMISSION_DENIED,
    FXF_READ,
    FXF_WRITE,
    SFTPError,
)
from twisted.internet import defer, task
from twisted.trial import unittest

from cmdserver.commands.base import Registry
from cmdserver.commands.upload.spool import temp_name
from cmdserver.core import CommandCore
from cmdserver.doors.ssh.door import SSHAvatar
from cmdserver.doors.ssh.sftp import VIRTUAL_ROOT_READ_ONLY, JailedSFTPServer
from cmdserver.doors.ssh.sftp_paths import ClientView
from cmdserver.policy import Policy
from cmdserver.text import escaped
from tests.doors.ssh.test_sftp_jail import PUT, FakeAvatar, SFTPServerTestBase
from tests.helpers import OutsideTreeTempMixin, capture_audit


class ClientViewTest(unittest.TestCase):
    """The mapping alone: no disk."""

    one = ClientView(["/srv/data/files"])
    two = ClientView(["/srv/data/files", "/var/log/app"])

    def where(self, view: ClientView, path: str) -> tuple[int | None, str, str, str]:
        place = view.place(path)
        return place.root, place.rel, place.jail, place.virtual

    def test_one_root_is_slash(self) -> None:
        for path, rel in ((".", ""), ("/", ""), ("", ""), ("..", ""), ("/../..", ""),
                          ("a/b", "a/b"), ("/a/b/", "a/b"), ("//a/./b", "a/b"),
                          ("a/../../b", "b"), ("/a/b/../..", ""), ("../a", "a"),
                          ("/srv/data/files/x", "srv/data/files/x")):
            jail = "/srv/data/files" + (f"/{rel}" if rel else "")
            self.assertEqual(self.where(self.one, path), (0, rel, jail, f"/{rel}"), path)
        self.assertEqual(self.one.home, "/")
        self.assertEqual(self.one.names, [])

    def test_several_roots_under_a_virtual_slash(self) -> None:
        view = self.two
        self.assertEqual(view.names, ["root1", "root2"])
        self.assertEqual(view.home, "/root1")
        self.assertEqual(self.where(view, "."), (0, "", "/srv/data/files", "/root1"))
        self.assertEqual(self.where(view, "a"), (0, "a", "/srv/data/files/a", "/root1/a"))
        self.assertEqual(self.where(view, ".."), (None, "", "", "/"))
        self.assertEqual(self.where(view, "/"), (None, "", "", "/"))
        self.assertEqual(self.where(view, "../root2/x"),
                         (1, "x", "/var/log/app/x", "/root2/x"))
        self.assertEqual(self.where(view, "/root2/../../root1/.."), (None, "", "", "/"))
        self.assertEqual(self.where(view, "/root3/x"), (None, "root3/x", "", "/root3/x"))
        self.assertEqual(self.where(view, "/var/log/app"),
                         (None, "var/log/app", "", "/var/log/app"))
        self.assertTrue(view.place("/x").in_virtual_root)
        self.assertFalse(view.place("/root1").in_virtual_root)

    def test_real_paths_back_to_the_clients_view(self) -> None:
        self.assertEqual(self.one.client_path("/srv/data/files"), "/")
        self.assertEqual(self.one.client_path("/srv/data/files/a/b"), "/a/b")
        self.assertIsNone(self.one.client_path("/srv/data/filesx"))
        self.assertIsNone(self.one.client_path("/srv/data"))
        self.assertEqual(self.two.client_path("/var/log/app/x"), "/root2/x")
        self.assertEqual(self.two.client_path("/var/log/app"), "/root2")
        nested = ClientView(["/srv", "/srv/inner"])
        self.assertEqual(nested.client_path("/srv/inner/x"), "/root1/inner/x")
        self.assertEqual(nested.client_path("/srv/inner/x", prefer=1), "/root2/x")

    def test_scrub_leaves_no_root_path(self) -> None:
        self.assertEqual(self.one.scrub("not a regular file: /srv/data/files/a/p"),
                         "not a regular file: /a/p")
        self.assertEqual(self.one.scrub("'/srv/data/files' and /srv/data/files"),
                         "'/' and /")
        self.assertEqual(self.one.scrub("/srv/data/files2 stays"), "/srv/data/files2 stays")
        self.assertEqual(self.two.scrub("x: /var/log/app/y, /srv/data/files/z"),
                         "x: /root2/y, /root1/z")
        # A root's name as an escaped message writes it (the jail's messages are).
        odd = ClientView(["/srv/caf\udce9\x1b"])
        self.assertEqual(odd.scrub(escaped("x: /srv/caf\udce9\x1b/y")), "x: /y")

    def test_link_targets(self) -> None:
        link = self.one.place("/a/b/link")
        for target, shown in (("x", "x"), ("../x", "../x"), ("../../x", "../../x"),
                              ("../../../x", None), ("c/../../../../x", None),
                              ("/srv/data/files/a/x", "/a/x"), ("/srv/data/files", "/"),
                              ("/etc/passwd", None), ("/srv/data/../data/files/x", "/x")):
            self.assertEqual(self.one.link_target(target, link), shown, target)
        self.assertEqual(self.two.link_target("/var/log/app/x", self.two.place("l")),
                         "/root2/x")
        self.assertIsNone(self.two.link_target("../root2/x", self.two.place("l")))


class SeveralRootsTest(OutsideTreeTempMixin, unittest.TestCase):
    """A session with two roots: / lists them, read-only."""

    def setUp(self) -> None:
        base = os.path.realpath(self.mktemp())
        self.roots = [os.path.join(base, "first"), os.path.join(base, "second")]
        for n, root in enumerate(self.roots):
            os.makedirs(os.path.join(root, "sub"))
            with open(os.path.join(root, f"f{n + 1}.txt"), "w") as f:
                f.write(f"file {n + 1}")
        policy = Policy(self.roots)
        core = CommandCore(Registry(), policy, task.Clock(),
                           run_in_thread=lambda f, *a, **kw: defer.maybeDeferred(f, *a, **kw))
        self.server = JailedSFTPServer(cast(SSHAvatar, FakeAvatar(core, policy)))
        self.audit = capture_audit(self)

    def error(self, d: defer.Deferred) -> SFTPError:
        return self.failureResultOf(d, SFTPError).value

    def names(self, path: bytes) -> list[bytes]:
        return [name for name, _, _ in self.successResultOf(self.server.openDirectory(path))]

    def test_the_session_starts_in_the_first_root(self) -> None:
        realpath = self.server.realPath
        self.assertEqual(self.successResultOf(realpath(b".")), b"/root1")
        self.assertEqual(self.successResultOf(realpath(b"sub/..")), b"/root1")
        self.assertEqual(self.successResultOf(realpath(b"..")), b"/")
        self.assertEqual(self.successResultOf(realpath(b"/root2/../..")), b"/")
        self.assertEqual(self.successResultOf(realpath(b"../root2/sub")), b"/root2/sub")
        self.assertEqual(self.names(b"."), [b"f1.txt", b"sub"])
        handle = self.successResultOf(self.server.openFile(b"../root2/f2.txt", FXF_READ, {}))
        self.assertEqual(self.successResultOf(handle.readChunk(0, 100)), b"file 2")
        self.successResultOf(handle.close())

    def test_slash_lists_the_roots_read_only(self) -> None:
        listing = list(self.successResultOf(self.server.openDirectory(b"/")))
        self.assertEqual([name for name, _, _ in listing], [b"root1", b"root2"])
        for _, longname, attrs in listing:
            self.assertTrue(longname.startswith(b"d"), longname)
            self.assertTrue(stat.S_ISDIR(attrs["permissions"]))
        attrs = self.successResultOf(self.server.getAttrs(b"/", True))
        self.assertEqual(stat.S_IMODE(attrs["permissions"]), 0o555)
        self.assertTrue(stat.S_ISDIR(attrs["permissions"]))
        self.assertEqual(self.error(self.server.getAttrs(b"/nosuch", True)).code,
                         FX_NO_SUCH_FILE)
        self.assertEqual(self.error(self.server.openDirectory(b"/nosuch/x")).code,
                         FX_NO_SUCH_FILE)
        self.assertEqual(self.error(self.server.openFile(b"/", FXF_READ, {})).code, FX_FAILURE)

    def test_slash_itself_cannot_be_changed(self) -> None:
        attempts = {
            "mkdir /x": self.server.makeDirectory(b"/x", {}),
            "put /x": self.server.openFile(b"/x", PUT, {}),
            "put ../x": self.server.openFile(b"../x", PUT, {}),
            "rm /x": self.server.removeFile(b"/x"),
            "rename into /": self.server.renameFile(b"f1.txt", b"/f1.txt"),
            "rename out of /": self.server.renameFile(b"/x", b"y"),
            "chmod /": self.server.setAttrs(b"/", {"permissions": 0o700}),
        }
        for what, d in attempts.items():
            error = self.error(d)
            self.assertEqual((error.code, error.message),
                             (FX_PERMISSION_DENIED, VIRTUAL_ROOT_READ_ONLY), what)
        # The roots themselves: not removed, renamed or replaced.
        for d in (self.server.removeFile(b"/root1"), self.server.removeDirectory(b"/root2"),
                  self.server.renameFile(b"/root2", b"/root1/moved"),
                  self.server.posix_rename(b"/root1/sub", b"/root2"),
                  self.server.makeDirectory(b"/root1", {})):
            error = self.error(d)
            self.assertEqual(error.code, FX_PERMISSION_DENIED)
            self.assertIn("a root cannot be", error.message)
        self.assertEqual(self.names(b"/"), [b"root1", b"root2"])
        self.assertEqual(sorted(os.listdir(self.roots[1])), ["f2.txt", "sub"])
        refused = [(e["command"], e["args"], e["outcome"]) for e in self.audit][:3]
        self.assertEqual(refused, [("mkdir", {"path": "/x"}, "refused"),
                                   ("put", {"path": "/x"}, "refused"),
                                   ("put", {"path": "/x"}, "refused")])

    def test_between_roots(self) -> None:
        self.successResultOf(self.server.renameFile(b"/root1/f1.txt", b"/root2/sub/f1.txt"))
        self.assertTrue(os.path.exists(os.path.join(self.roots[1], "sub", "f1.txt")))
        self.successResultOf(self.server.makeDirectory(b"/root2/new", {}))
        records = [(e["command"], e["args"]) for e in self.audit]
        self.assertEqual(records, [("rename", {"path": "f1.txt", "to": "root2:sub/f1.txt"}),
                                   ("mkdir", {"path": "root2:new"})])

    def test_a_symlink_to_another_root_reads_in_the_clients_view(self) -> None:
        os.symlink(os.path.join(self.roots[1], "sub"), os.path.join(self.roots[0], "other"))
        self.assertEqual(self.successResultOf(self.server.readLink(b"other")), b"/root2/sub")
        self.assertEqual(self.successResultOf(self.server.realPath(b"other")), b"/root2/sub")
        self.assertEqual(self.error(self.server.readLink(b"/")).message, "not a symlink: /")
        self.assertEqual(self.error(self.server.readLink(b"/root2")).message,
                         "not a symlink: /root2")


class NoServerPathTest(SFTPServerTestBase):
    """Whatever fails, what the client gets names its own paths, never the server's."""

    def leaks(self, text: Any) -> bool:
        text = os.fsdecode(text) if isinstance(text, bytes) else str(text)
        return os.path.dirname(self.root) in text

    def test_no_server_path_in_names_or_messages(self) -> None:
        os.makedirs(self.path("sub"))
        os.mkfifo(self.path("sub", "pipe"))
        os.symlink(self.outside, self.path("out"))
        os.symlink(self.path("sub"), self.path("abs"))  # absolute, inside
        reserved = temp_name("x", "deadbeef")
        server = self.server
        attempts = [
            server.openFile(b"sub/pipe", FXF_READ, {}),
            server.openFile(b"/sub/pipe", FXF_WRITE, {}),  # written into
            server.openFile(f"sub/{reserved}".encode(), PUT, {}),
            server.getAttrs(f"/sub/{reserved}".encode(), True),
            server.realPath(f"sub/{reserved}".encode()),
            server.renameFile(b"a.txt", f"sub/{reserved}".encode()),
            server.openFile(b"out/secret", FXF_READ, {}),
            server.openDirectory(b"/out"),
            server.realPath(b"out"),
            server.readLink(b"out"),
            server.readLink(b"a.txt"),
            server.removeDirectory(b"/"),
            server.removeDirectory(b"sub"),
            server.makeDirectory(b"sub", {}),
            server.getAttrs(b"/nosuch/x", True),
            server.setAttrs(b"/", {"permissions": 0o700}),
            server.statvfs(b"/out"),
        ]
        messages = [self.error(d).message for d in attempts]
        for message in messages:
            self.assertFalse(self.leaks(message), message)
        self.assertIn("not a regular file: sub/pipe", messages[0])
        self.assertIn("not a regular file: /sub/pipe", messages[1])
        self.assertIn(f"reserved name (upload temporary files look like it): sub/{reserved}",
                      messages[2])
        self.assertIn(f"/sub/{reserved}", messages[3])
        # What succeeds names places in the client's view only.
        answers = [
            self.successResultOf(server.realPath(b"abs")),
            self.successResultOf(server.readLink(b"abs")),
            self.successResultOf(server.realPath(b"sub/new")),
            *(name + longname for name, longname, _ in
              self.successResultOf(server.openDirectory(b"/"))),
        ]
        self.assertEqual(answers[:3], [b"/sub", b"/sub", b"/sub/new"])
        for answer in answers:
            self.assertFalse(self.leaks(answer), answer)
        for record in self.audit:
            self.assertFalse(self.leaks(record), record)
        # The server's real path is no way in: it lies under / like any other name.
        error = self.error(server.openFile(os.fsencode(self.path("a.txt")), FXF_READ, {}))
        self.assertEqual(error.code, FX_NO_SUCH_FILE)

    def setUp(self) -> None:
        super().setUp()
        self.audit = capture_audit(self)


    def test_a_message_names_whole_paths_only(self) -> None:
        # The client's a is not found in its sibling ab: that one stays a path of
        # the client's view, not "a" followed by "b/x".
        root = self.root
        places = (self.server.place(b"a"), self.server.place(b"/ab/../a/b"))
        message = escaped(f"{root}/a, {root}/ab/x, {root}/a/b, {root}/a/bc, {root}/a.b")
        self.assertEqual(self.server._message(message, places),
                         "a, /ab/x, /ab/../a/b, a/bc, /a.b")


class ReadLinkTest(SFTPServerTestBase):
    """readlink shows a target in the client's view, or refuses one that leads out."""

    def link(self, target: str, *where: str) -> None:
        os.symlink(target, self.path(*where))

    def read(self, path: bytes) -> bytes:
        return self.successResultOf(self.server.readLink(path))

    def test_targets(self) -> None:
        os.makedirs(self.path("d", "e"))
        self.link("a.txt", "rel")
        self.link("../../a.txt", "d", "e", "up")
        self.link(self.path("d", "e"), "abs")
        self.link(self.root, "top")
        self.assertEqual(self.read(b"rel"), b"a.txt")
        self.assertEqual(self.read(b"/d/e/up"), b"../../a.txt")
        self.assertEqual(self.read(b"abs"), b"/d/e")
        self.assertEqual(self.read(b"top"), b"/")

    def test_targets_that_lead_out_are_not_shown(self) -> None:
        self.link(self.outside, "out")
        self.link("../outside/secret", "up")
        self.link("/etc/passwd", "etc")
        for path in (b"out", b"up", b"etc"):
            error = self.failureResultOf(self.server.readLink(path), SFTPError).value
            self.assertEqual((error.code, error.message),
                             (FX_PERMISSION_DENIED,
                              f"the symlink leads outside the jail: {path.decode()}"))

    def test_not_a_link(self) -> None:
        for path, message in ((b"a.txt", "not a symlink: a.txt"), (b"/", "not a symlink: /"),
                              (b"missing", "no such file or directory: missing")):
            error = self.failureResultOf(self.server.readLink(path), SFTPError).value
            self.assertEqual(error.message, message)

    def test_a_symlinks_size_is_that_of_the_target_shown(self) -> None:
        # A symlink's size is its target's length: not a server path's length either.
        os.makedirs(self.path("d"))
        self.link(self.path("d"), "abs")
        self.link(self.outside, "out")
        self.link("a.txt", "rel")
        listing = self.successResultOf(self.server.openDirectory(b"/"))
        sizes = {name.decode(): attrs["size"] for name, _, attrs in listing}
        self.assertEqual(sizes, {"a.txt": 5, "abs": len("/d"), "out": 0, "rel": len("a.txt"),
                                 "d": os.stat(self.path("d")).st_size})
        for name, size in (("abs", 2), ("out", 0), ("rel", 5)):
            attrs = self.successResultOf(self.server.getAttrs(name.encode(), False))
            self.assertEqual(attrs["size"], size, name)
        self.assertEqual(self.successResultOf(self.server.getAttrs(b"abs", True))["size"],
                         os.stat(self.path("d")).st_size)

    def test_a_listing_reads_links_through_the_directory_it_scans(self) -> None:
        # Not by resolving the directory again for each link: that is one lookup
        # for the listing, however many links and however deep.
        deep = self.path("a", "b", "c", "d")
        os.makedirs(deep)
        for n in range(20):
            self.link(f"../x{n}", "a", "b", "c", "d", f"rel{n}")
        self.link(self.path("a"), "a", "b", "c", "d", "abs")
        self.link(self.outside, "a", "b", "c", "d", "out")
        self.link("../../../../../outside", "a", "b", "c", "d", "up")
        resolved: list[list[str]] = []
        jail = self.server.jail
        resolve = jail._resolve

        def counted(index: int, parts: list[str], follow: bool = True) -> int:
            resolved.append(parts)
            return resolve(index, parts, follow)

        self.patch(jail, "_resolve", counted)
        listing = self.successResultOf(self.server.openDirectory(b"/a/b/c/d"))
        sizes = {name.decode(): attrs["size"] for name, _, attrs in listing}
        self.assertEqual(sizes, {**{f"rel{n}": len(f"../x{n}") for n in range(20)},
                                 "abs": len("/a"), "out": 0, "up": 0})
        self.assertEqual(len(resolved), 1)
