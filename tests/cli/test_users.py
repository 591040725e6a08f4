"""The credential subcommands of the ``cmdserver`` console script, run in-process."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.conch.ssh import keys

from cmdserver.auth.users import UserStore, verify_password
from cmdserver.cli import main


@pytest.fixture
def data(tmp_path):
    return str(tmp_path / "data")


def run(argv, stdin="", monkeypatch=None):
    """main(argv) with ``stdin`` as standard input."""
    if monkeypatch is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return main(argv)


def useradd(monkeypatch, data, name, password="pass word", *extra):
    return run(["useradd", "--data-dir", data, "--password-stdin", "--cost", "4", *extra,
                "--", name], password + "\n", monkeypatch)


def test_useradd_then_users_never_prints_hash(monkeypatch, capsys, data, tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    assert useradd(monkeypatch, data, "ops", "pass word", "--root", str(root)) == 0
    assert useradd(monkeypatch, data, "dev") == 0
    users = UserStore(data).load()
    assert verify_password("pass word", users["ops"].hash)
    assert users["ops"].roots == (str(root),)
    assert stat.S_IMODE(os.stat(os.path.join(data, "users")).st_mode) == 0o600
    capsys.readouterr()
    assert main(["users", "--data-dir", data]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "dev\tkeys: 0\troots: (default roots)",
        f"ops\tkeys: 0\troots: {root}",
    ]
    assert "$2b$" not in out


def test_password_stdin_keeps_inner_spaces_and_drops_crlf(monkeypatch, data):
    assert run(["useradd", "ops", "-d", data, "--password-stdin", "--cost", "4"],
               " spaced  out \r\n", monkeypatch) == 0
    assert verify_password(" spaced  out ", UserStore(data).load()["ops"].hash)


@pytest.mark.parametrize("name", ["../evil", "-rf", "anonymous", "a b", ""])
def test_useradd_bad_name(monkeypatch, capsys, data, name):
    assert useradd(monkeypatch, data, name) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: invalid user name") and err.count("\n") == 1
    assert not os.path.exists(os.path.join(data, "users"))


def test_useradd_empty_password(monkeypatch, capsys, data):
    assert run(["useradd", "ops", "-d", data, "--password-stdin"], "\n", monkeypatch) == 1
    assert capsys.readouterr().err == "Error: empty password\n"
    assert UserStore(data).load() == {}


def test_useradd_no_stdin_at_all(monkeypatch, capsys, data):
    assert run(["useradd", "ops", "-d", data, "--password-stdin"], "", monkeypatch) == 1
    assert capsys.readouterr().err == "Error: empty password\n"


def test_useradd_twice(monkeypatch, capsys, data):
    assert useradd(monkeypatch, data, "ops", "first") == 0
    assert useradd(monkeypatch, data, "ops", "second") == 1
    assert "already exists" in capsys.readouterr().err
    assert verify_password("first", UserStore(data).load()["ops"].hash)


def test_useradd_root_must_exist(monkeypatch, capsys, data, tmp_path):
    assert useradd(monkeypatch, data, "ops", "pw", "--root", str(tmp_path / "nope")) == 1
    assert "not an existing directory" in capsys.readouterr().err


def test_useradd_prompts_twice(monkeypatch, capsys, data):
    answers = iter(["typed pw", "typed pw"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    monkeypatch.setattr(sys, "stdin", _Tty())
    assert main(["useradd", "ops", "-d", data, "--cost", "4"]) == 0
    assert verify_password("typed pw", UserStore(data).load()["ops"].hash)


def test_useradd_prompt_mismatch(monkeypatch, capsys, data):
    answers = iter(["one", "two"])
    monkeypatch.setattr("getpass.getpass", lambda prompt: next(answers))
    monkeypatch.setattr(sys, "stdin", _Tty())
    assert main(["useradd", "ops", "-d", data, "--cost", "4"]) == 1
    assert capsys.readouterr().err == "Error: the passwords do not match\n"
    assert UserStore(data).load() == {}


def test_useradd_without_terminal_or_stdin_flag(monkeypatch, capsys, data):
    assert run(["useradd", "ops", "-d", data], "", monkeypatch) == 1
    assert "--password-stdin" in capsys.readouterr().err


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_passwd(monkeypatch, capsys, data):
    assert useradd(monkeypatch, data, "ops", "old") == 0
    assert run(["passwd", "ops", "-d", data, "--password-stdin", "--cost", "4"], "new\n",
               monkeypatch) == 0
    hashed = UserStore(data).load()["ops"].hash
    assert verify_password("new", hashed) and not verify_password("old", hashed)


def test_passwd_unknown_user_and_empty_password(monkeypatch, capsys, data):
    assert run(["passwd", "ghost", "-d", data, "--password-stdin"], "pw\n", monkeypatch) == 1
    assert capsys.readouterr().err == "Error: no such user: ghost\n"
    assert useradd(monkeypatch, data, "ops", "old") == 0
    before = open(os.path.join(data, "users")).read()
    assert run(["passwd", "ops", "-d", data, "--password-stdin"], "\n", monkeypatch) == 1
    assert open(os.path.join(data, "users")).read() == before


def _pub(tmp_path, *keys_):
    path = tmp_path / "id.pub"
    path.write_text("".join(k.public().toString("OPENSSH").decode() + " c\n" for k in keys_))
    return str(path)


def new_key():
    return keys.Key(ed25519.Ed25519PrivateKey.generate())


def test_addkey_and_userdel(monkeypatch, capsys, data, tmp_path):
    assert useradd(monkeypatch, data, "ops") == 0
    k1, k2 = new_key(), new_key()
    assert main(["addkey", "ops", _pub(tmp_path, k1, k2), "-d", data]) == 0
    assert "2 new key(s) for ops" in capsys.readouterr().out
    assert UserStore(data).load_keys() == {"ops": [k1.public(), k2.public()]}
    assert main(["users", "-d", data]) == 0
    assert "ops\tkeys: 2" in capsys.readouterr().out
    assert main(["userdel", "ops", "-d", data]) == 0
    assert UserStore(data).load() == {}
    assert not os.path.exists(os.path.join(data, "keys", "ops.pub"))


def test_addkey_errors(monkeypatch, capsys, data, tmp_path):
    assert main(["addkey", "ghost", _pub(tmp_path, new_key()), "-d", data]) == 1
    assert capsys.readouterr().err == "Error: no such user: ghost\n"
    assert useradd(monkeypatch, data, "ops") == 0
    assert main(["addkey", "ops", str(tmp_path / "missing.pub"), "-d", data]) == 1
    assert "No such file or directory" in capsys.readouterr().err
    junk = tmp_path / "junk.pub"
    junk.write_text("hello\n")
    assert main(["addkey", "ops", str(junk), "-d", data]) == 1
    assert capsys.readouterr().err == "Error: key file: line 1: not an SSH public key\n"
    assert UserStore(data).load_keys() == {}


def test_userdel_unknown(capsys, data):
    assert main(["userdel", "ghost", "-d", data]) == 1
    assert capsys.readouterr().err == "Error: no such user: ghost\n"


def test_users_with_broken_file(capsys, data):
    os.makedirs(data)
    with open(os.path.join(data, "users"), "w") as f:
        f.write('{"name": "ops", "hash": "$2b$04$secrethash"\n')
    assert main(["users", "-d", data]) == 1
    err = capsys.readouterr().err
    assert "line 1: not a JSON object" in err and "secrethash" not in err


def test_gencert(capsys, data):
    assert main(["gencert", "localhost", "-d", data, "--port", "8443"]) == 0
    out, err = capsys.readouterr()
    key = os.path.join(data, "tls", "localhost.key")
    crt = os.path.join(data, "tls", "localhost.crt")
    assert out == f"ssl:8443:privateKey={key}:certKey={crt}\n"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    cert = x509.load_pem_x509_certificate(open(crt, "rb").read())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    # A second run does not replace the key unless asked to.
    assert main(["gencert", "localhost", "-d", data]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["gencert", "localhost", "-d", data, "--force"]) == 0


def test_gencert_ip_and_bad_host(capsys, data):
    assert main(["gencert", "127.0.0.1", "-d", data]) == 0
    crt = os.path.join(data, "tls", "127.0.0.1.crt")
    cert = x509.load_pem_x509_certificate(open(crt, "rb").read())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    capsys.readouterr()
    for bad in ["../etc", "a b", "-x", "x" * 300]:
        assert main(["gencert", "-d", data, "--", bad]) == 1
        assert capsys.readouterr().err.startswith("Error: invalid host name")


def test_endpoint_escapes_colons(capsys, tmp_path):
    data = str(tmp_path / "a:b")
    assert main(["gencert", "localhost", "-d", data]) == 0
    assert "a\\:b" in capsys.readouterr().out


def test_real_subprocess(tmp_path):
    """The installed console script, as an administrator runs it."""
    data = str(tmp_path / "data")
    script = os.path.join(os.path.dirname(sys.executable), "cmdserver")
    add = subprocess.run([script, "useradd", "ops", "-d", data, "--password-stdin",
                          "--cost", "4"], input="pw\n", capture_output=True, text=True,
                         timeout=60)
    assert (add.returncode, add.stdout, add.stderr) == (0, "added user ops\n", "")
    bad = subprocess.run([script, "userdel", "ghost", "-d", data], capture_output=True,
                         text=True, timeout=60)
    assert (bad.returncode, bad.stderr) == (1, "Error: no such user: ghost\n")
    listed = subprocess.run([script, "users", "-d", data], capture_output=True, text=True,
                            timeout=60)
    assert listed.stdout.startswith("ops\t")


def test_hmac_key_per_user(capsys, data, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("pw-for-ops\n"))
    assert main(["useradd", "ops", "--password-stdin", "--cost", "4", "-d", data]) == 0
    capsys.readouterr()
    assert main(["hmac-key", "--user", "ops", "-d", data]) == 0
    first = capsys.readouterr().out.strip()
    assert len(bytes.fromhex(first)) == 32
    path = os.path.join(data, "keys", "ops.hmac")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert main(["hmac-key", "--user", "ops", "-d", data]) == 0  # the same key again
    assert capsys.readouterr().out.strip() == first
    assert main(["hmac-key", "-d", data]) == 0  # the server's key is another one
    assert capsys.readouterr().out.strip() != first
    assert main(["userdel", "ops", "-d", data]) == 0
    assert not os.path.exists(path)


def test_hmac_key_unknown_user(capsys, data):
    assert main(["hmac-key", "--user", "ghost", "-d", data]) == 1
    assert capsys.readouterr().err == "Error: no such user: ghost\n"
    assert not os.path.exists(os.path.join(data, "keys", "ghost.hmac"))


def test_users_with_a_mistyped_data_dir(capsys, tmp_path):
    assert main(["users", "-d", str(tmp_path / "nope")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: no users file in ") and "--data-dir" in err
