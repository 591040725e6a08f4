"""Ansible inventories (INI and YAML) and host patterns, as cmdserver fleet reads them."""

from __future__ import annotations

import os
import tempfile

import pytest

from cmdserver.fanout.inventory import (
    DEFAULT_PB_PORT,
    Host,
    InventoryError,
    expand,
    from_list,
    load,
    parse_ini,
    parse_yaml,
)

INI = """
# a comment
mail.example.com

[web]
web[1:3].example.com
bastion ansible_host=192.0.2.9 ansible_port=2200 cmdserver_pb_port=9900

[db]
db-[01:02].example.com cmdserver_user=dba

[prod:children]
web
db

[prod:vars]
cmdserver_pb_port=9877

[db:vars]
cmdserver_pb_port=9888
"""

YAML = """
all:
  hosts:
    mail.example.com:
  vars:
    cmdserver_user: ops
  children:
    prod:
      vars:
        cmdserver_pb_port: 9877
      children:
        web:
          hosts:
            web[1:3].example.com:
            bastion:
              ansible_host: 192.0.2.9
              cmdserver_pb_port: 9900
        db:
          vars:
            cmdserver_pb_port: 9888
          hosts:
            db-[01:02].example.com:
              cmdserver_user: dba
"""


def names(hosts: list[Host]) -> list[str]:
    return [h.name for h in hosts]


@pytest.fixture(params=["ini", "yaml"])
def inventory(request):
    return parse_ini(INI) if request.param == "ini" else parse_yaml(YAML)


def test_groups_children_and_ranges(inventory) -> None:
    assert names(inventory.select("web")) == [
        "web1.example.com", "web2.example.com", "web3.example.com", "bastion"]
    assert names(inventory.select("db")) == ["db-01.example.com", "db-02.example.com"]
    assert len(inventory.select("prod")) == 6
    assert len(inventory.select("all")) == 7


def test_variables_from_groups_and_hosts(inventory) -> None:
    [bastion] = inventory.select("bastion")
    assert (bastion.address, bastion.port) == ("192.0.2.9", 9900)  # host var wins
    [db] = inventory.select("db-01.example.com")
    assert (db.address, db.port, db.user) == ("db-01.example.com", 9888, "dba")  # child group
    [web] = inventory.select("web1.example.com")
    assert web.port == 9877  # the parent group's
    [mail] = inventory.select("mail.example.com")
    assert mail.port == DEFAULT_PB_PORT


def test_patterns(inventory) -> None:
    assert names(inventory.select("web*.example.com")) == [
        "web1.example.com", "web2.example.com", "web3.example.com"]
    assert names(inventory.select("db:mail.example.com")) == [
        "mail.example.com", "db-01.example.com", "db-02.example.com"]
    assert names(inventory.select("prod:!web")) == ["db-01.example.com", "db-02.example.com"]
    assert names(inventory.select("web:&prod:!bastion")) == [
        "web1.example.com", "web2.example.com", "web3.example.com"]
    assert len(inventory.select("!db")) == 5
    with pytest.raises(InventoryError, match="no host or group matches 'nosuch'"):
        inventory.select("nosuch")


def test_ranges() -> None:
    assert expand("db-[01:10:4]") == ["db-01", "db-05", "db-09"]
    assert expand("[a:c]-[1:2]") == ["a-1", "a-2", "b-1", "b-2", "c-1", "c-2"]
    with pytest.raises(InventoryError):
        expand("x[1:b]")


def test_host_list() -> None:
    inventory = from_list(["127.0.0.1:9001,127.0.0.2", "[::1]:9003"])
    assert [(h.address, h.port) for h in inventory.select()] == [
        ("127.0.0.1", 9001), ("127.0.0.2", DEFAULT_PB_PORT), ("::1", 9003)]
    with pytest.raises(InventoryError, match="bad port"):
        from_list(["h:99999"])


@pytest.mark.parametrize("text, message", [
    ("[web\nhost\n", "bad section"),
    ("[web:things]\nhost\n", "bad section"),
    ("[web:vars]\nnovalue\n", "expected NAME=VALUE"),
    ("host port\n", "expected NAME=VALUE"),
    ("host cmdserver_pb_port=http\n", "is not a number"),
])
def test_bad_ini_is_one_line(text: str, message: str) -> None:
    with pytest.raises(InventoryError, match=message) as e:
        parse_ini(text).select("all")
    assert "\n" not in str(e.value)


def test_bad_yaml_is_one_line() -> None:
    for text in ("all: [1, 2]", "all:\n  hostz: {}", "- a\n- b", "all:\n  hosts: {h: 3}"):
        with pytest.raises(InventoryError) as e:
            parse_yaml(text)
        assert "\n" not in str(e.value)


def test_load_tells_ini_from_yaml() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("hosts", INI), ("hosts.yml", YAML), ("noext", YAML)):
            path = os.path.join(tmp, name)
            with open(path, "w") as f:
                f.write(text)
            assert len(load(path).select("prod")) == 6
        with pytest.raises(InventoryError, match="No such file"):
            load(os.path.join(tmp, "missing"))
