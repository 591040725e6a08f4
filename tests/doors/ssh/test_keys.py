"""Host keys: made once with mode 0600, reused afterwards, fingerprints as OpenSSH prints them."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

from twisted.trial import unittest

from cmdserver.doors.ssh.keys import HOST_KEY_FILES, fingerprint, load_host_keys
from tests.helpers import OutsideTreeTempMixin, capture_log


class HostKeyTest(OutsideTreeTempMixin, unittest.TestCase):
    def setUp(self) -> None:
        self.data_dir = self.mktemp()
        os.makedirs(self.data_dir)
        self.keys = load_host_keys(self.data_dir)

    def test_both_types_created_private(self) -> None:
        self.assertEqual(sorted(self.keys), [b"ssh-ed25519", b"ssh-rsa"])
        self.assertEqual(self.keys[b"ssh-rsa"].size(), 3072)
        for name in HOST_KEY_FILES.values():
            mode = os.stat(os.path.join(self.data_dir, name)).st_mode
            self.assertEqual(stat.S_IMODE(mode), 0o600)
        self.assertEqual(sorted(os.listdir(self.data_dir)), sorted(HOST_KEY_FILES.values()))

    def test_reused_on_the_next_start(self) -> None:
        again = load_host_keys(self.data_dir)
        for kind, key in self.keys.items():
            self.assertEqual(fingerprint(again[kind]), fingerprint(key))

    def test_fingerprint_matches_ssh_keygen(self) -> None:
        keygen = shutil.which("ssh-keygen")
        if keygen is None:
            raise unittest.SkipTest("ssh-keygen not installed")
        path = os.path.join(self.data_dir, HOST_KEY_FILES["ed25519"])
        out = subprocess.run([keygen, "-lf", path], capture_output=True, text=True,
                             check=True).stdout
        self.assertEqual(out.split()[1], fingerprint(self.keys[b"ssh-ed25519"]))

    def test_make_service_logs_both_fingerprints(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from cmdserver.tap import Options, makeService

        events = capture_log(self)
        options = Options()
        options.parseOptions(["--data-dir", self.data_dir, "--line", "none", "--pb", "none",
                              "--http", "none", "--bcrypt-cost", "4"])
        makeService(options, MemoryReactorClock())
        logged = {e["key_type"]: e["fingerprint"] for e in events if "fingerprint" in e}
        self.assertEqual(logged, {"ssh-ed25519": fingerprint(self.keys[b"ssh-ed25519"]),
                                  "ssh-rsa": fingerprint(self.keys[b"ssh-rsa"])})
