"""API tokens: the store keeps only a digest, a token checks in constant time and only for
its user, expired and revoked tokens fail, and the CLI prints a token once."""

from __future__ import annotations

import io
import json
import os
import stat
import tempfile

import pytest

from cmdserver.auth.tokens import (
    TokenStore,
    check,
    digest,
    looks_like_token,
    parse_duration,
)
from cmdserver.auth.users import CredentialError
from cmdserver.cli import main


@pytest.fixture
def store():
    with tempfile.TemporaryDirectory() as tmp:
        yield TokenStore(tmp)


def test_the_file_keeps_only_a_digest(store: TokenStore) -> None:
    token_id, token = store.add("ops", "fleet")
    assert looks_like_token(token) and token_id in token
    text = open(store.path).read()
    assert token not in text and token.split("_")[-1] not in text
    [record] = json.loads(text)["tokens"]
    assert record["sha256"] == digest(token)
    assert stat.S_IMODE(os.stat(store.path).st_mode) == 0o600


def test_check(store: TokenStore) -> None:
    _, token = store.add("ops")
    records = store.load()
    assert check(records, "ops", token) is not None
    assert check(records, "ops", token.encode()) is not None
    assert check(records, "admin", token) is None  # another user's
    assert check(records, "ops", token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert check(records, "ops", "cmdserver_00000000_" + "x" * 43) is None  # unknown id
    assert check(records, "ops", "not a token") is None


def test_expiry_and_revocation(store: TokenStore) -> None:
    token_id, token = store.add("ops", lifetime=60)
    record = store.load()[token_id]
    assert check(store.load(), "ops", token, now=record.created + 30) is not None
    assert check(store.load(), "ops", token, now=record.created + 61) is None
    other_id, other = store.add("ops")
    store.add("admin")
    assert [r.id for r in store.revoke(token_id)] == [token_id]
    assert check(store.load(), "ops", token) is None
    assert check(store.load(), "ops", other) is not None
    with pytest.raises(CredentialError, match="no such token"):
        store.revoke(token_id)
    with pytest.raises(CredentialError, match="no such token"):
        store.revoke(other_id, user="admin")  # not admin's
    assert [r.user for r in store.revoke("all", user="ops")] == ["ops"]
    assert [r.user for r in store.load().values()] == ["admin"]


def test_bad_input() -> None:
    assert parse_duration("90d") == 90 * 86400
    assert parse_duration("30") == 30
    for bad in ("", "-1d", "1y", "0"):
        with pytest.raises(CredentialError):
            parse_duration(bad)
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "tokens"), "w") as f:
            f.write("{not json")
        with pytest.raises(CredentialError, match="not a tokens file"):
            TokenStore(tmp).load()
        with pytest.raises(CredentialError, match="bad token name"):
            TokenStore(tmp).add("ops", "a b")


def test_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        monkeypatch.setattr("sys.stdin", io.StringIO("a-good-password\n"))
        assert main(["useradd", "ops", "--password-stdin", "--cost", "4", "-d", tmp]) == 0
        capsys.readouterr()
        assert main(["token", "add", "ops", "--name", "ci", "--expires", "1d", "-d", tmp]) == 0
        out, err = capsys.readouterr()
        token = out.strip()
        assert looks_like_token(token) and "shown once" in err
        assert check(TokenStore(tmp).load(), "ops", token) is not None
        assert main(["token", "list", "-d", tmp]) == 0
        listing = capsys.readouterr().out
        assert "ops\tci\t" in listing and token not in listing
        assert main(["token", "add", "nobody", "-d", tmp]) == 1
        assert capsys.readouterr().err == "Error: no such user: nobody\n"
        token_id = listing.split("\t")[0]
        assert main(["token", "revoke", token_id, "-d", tmp]) == 0
        assert check(TokenStore(tmp).load(), "ops", token) is None
