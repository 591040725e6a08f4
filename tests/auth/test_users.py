"""The credential store on disk: names, passwords, the users file, keys, first run."""

from __future__ import annotations

import json
import os
import stat

import pytest
from twisted.conch.ssh import keys

from cmdserver.auth.users import (
    INITIAL_PASSWORD_FILE,
    CredentialError,
    UserRecord,
    UserStore,
    check_name,
    check_password,
    hash_password,
    parse_users,
    verify_password,
    write_atomically,
)
from tests.helpers.creds import TEST_COST


def new_key() -> keys.Key:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    return keys.Key(ed25519.Ed25519PrivateKey.generate())


@pytest.mark.parametrize("name", ["admin", "ops-1", "a.b_c", "X", "9lives"])
def test_good_names(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".hidden", "a/b", "../x", "a b", "a:b", "x" * 65,
                                  "anonymous", "é", "a\n"])
def test_bad_names(name):
    with pytest.raises(CredentialError):
        check_name(name)


@pytest.mark.parametrize("password", ["", "a\tb", "line\n", "x" * 73])
def test_bad_passwords(password):
    with pytest.raises(CredentialError):
        check_password(password)


def test_hash_and_verify():
    hashed = hash_password("s3cret pass", TEST_COST)
    assert hashed.startswith("$2b$04$")
    assert verify_password("s3cret pass", hashed)
    assert verify_password(b"s3cret pass", hashed)
    assert not verify_password("wrong", hashed)
    assert not verify_password("", hashed)
    assert not verify_password("x" * 100, hashed)
    assert not verify_password("s3cret pass", "$2b$garbage")


def test_save_and_load_round_trip(tmp_path):
    store = UserStore(str(tmp_path))
    users = {"ops": UserRecord("ops", hash_password("pw", TEST_COST), ("/srv/a", "/x:y"))}
    store.save(users)
    assert store.load() == users
    mode = stat.S_IMODE(os.stat(store.users_path).st_mode)
    assert mode == 0o600
    assert sorted(os.listdir(tmp_path)) == ["users"]  # no temporary file left


def test_missing_file_is_no_users(tmp_path):
    assert UserStore(str(tmp_path / "nowhere")).load() == {}


@pytest.mark.parametrize("line", [
    "not json",
    "[1, 2]",
    '{"name": "ops"}',
    '{"name": "../x", "hash": "$2b$04$abc"}',
    '{"name": "ops", "hash": "plain"}',
    '{"name": "ops", "hash": "$2b$04$abc", "roots": "/srv"}',
    '{"name": "ops", "hash": "$2b$04$abc", "roots": []}',
    '{"name": "ops", "hash": "$2b$04$abc", "extra": 1}',
])
def test_bad_users_file_lines(line):
    with pytest.raises(CredentialError) as e:
        parse_users("# comment\n\n" + line + "\n", "users")
    assert "users: line 3" in str(e.value)
    assert "$2b$04$abc" not in str(e.value)  # never shows a hash


def test_duplicate_user_refused():
    line = json.dumps({"name": "ops", "hash": "$2b$04$abc"})
    with pytest.raises(CredentialError, match="twice"):
        parse_users(line + "\n" + line + "\n", "users")


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "users")
    write_atomically(path, b"old\n")

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        write_atomically(path, b"new\n")
    monkeypatch.undo()
    assert open(path, "rb").read() == b"old\n"
    assert os.listdir(tmp_path) == ["users"]


def test_locked_update_saves_only_on_success(tmp_path):
    store = UserStore(str(tmp_path))
    with store.locked() as users:
        users["a"] = UserRecord("a", "$2b$04$x")
    with pytest.raises(RuntimeError), store.locked() as users:
        users["b"] = UserRecord("b", "$2b$04$x")
        raise RuntimeError("boom")
    assert set(store.load()) == {"a"}


def test_keys_add_dedupe_and_load(tmp_path):
    store = UserStore(str(tmp_path))
    k1, k2 = new_key(), new_key()
    text = (k1.public().toString("OPENSSH").decode() + " me@laptop\n# comment\n\n"
            + k2.public().toString("OPENSSH").decode() + "\n")
    assert store.add_keys("ops", text) == 2
    assert store.add_keys("ops", text) == 0
    found = store.load_keys({"ops"})
    assert found == {"ops": [k1.public(), k2.public()]}
    assert store.load_keys({"other"}) == {}
    store.remove_keys("ops")
    assert store.load_keys() == {}


@pytest.mark.parametrize("text", ["", "# only a comment\n", "ssh-ed25519 AAAAnotbase64!\n"])
def test_bad_key_text(tmp_path, text):
    with pytest.raises(CredentialError):
        UserStore(str(tmp_path)).add_keys("ops", text)
    assert not os.path.exists(tmp_path / "keys" / "ops.pub")


def test_key_options_refused(tmp_path):
    line = 'from="10.0.0.1" ' + new_key().public().toString("OPENSSH").decode()
    with pytest.raises(CredentialError, match="options"):
        UserStore(str(tmp_path)).add_keys("ops", line)


def test_private_key_refused(tmp_path):
    private = new_key().toString("OPENSSH").decode()
    with pytest.raises(CredentialError):
        UserStore(str(tmp_path)).add_keys("ops", private)


def test_first_run_creates_admin_once(tmp_path):
    store = UserStore(str(tmp_path))
    assert store.is_new()
    assert store.ensure_admin(TEST_COST) is True
    users = store.load()
    assert list(users) == ["admin"]
    initial = tmp_path / INITIAL_PASSWORD_FILE
    password = initial.read_text().removesuffix("\n")
    assert verify_password(password, users["admin"].hash)
    assert stat.S_IMODE(initial.stat().st_mode) == 0o600
    assert not store.is_new()
    assert store.ensure_admin(TEST_COST) is False
    assert store.load() == users


def test_first_run_admin_only_in_a_new_data_directory(tmp_path):
    store = UserStore(str(tmp_path))
    store.ensure_admin(TEST_COST)
    (tmp_path / INITIAL_PASSWORD_FILE).unlink()
    with store.locked() as users:  # every user deleted: an empty users file
        users.clear()
    assert store.ensure_admin(TEST_COST) is False
    (tmp_path / "users").unlink()  # the users file removed by hand: its lock file stays
    assert store.ensure_admin(TEST_COST) is False
    assert store.load() == {}
    assert not (tmp_path / INITIAL_PASSWORD_FILE).exists()


def test_users_added_before_the_first_start_mean_no_admin(tmp_path):
    store = UserStore(str(tmp_path))
    with store.locked() as users:
        users["ops"] = UserRecord("ops", hash_password("pw", TEST_COST))
    assert store.ensure_admin(TEST_COST) is False
    assert list(store.load()) == ["ops"]
