"""Hosts from an Ansible inventory (INI or YAML) or a list, and Ansible's host patterns.

Operators who drive a fleet with Ansible already have an inventory; ``cmdserver
fleet`` reads the same file.  What is read:

- groups, nested groups (``[prod:children]`` / ``children:``), group and host
  variables (``[web:vars]`` / ``vars:``, ``host var=value``), numeric and
  alphabetic ranges (``db-[01:03].example.com``);
- per host: ``ansible_host`` (the address to connect to), ``cmdserver_host`` (an
  address for cmdserver alone), ``cmdserver_pb_port`` (the PB door's port,
  default 9876) and ``cmdserver_user``.  ``ansible_port`` is SSH's port and is
  not used for PB.

Host patterns are Ansible's: ``all`` or ``*``, group and host names, shell
globs (``web*``), unions with ``:`` or ``,``, ``&group`` (intersection) and
``!group`` (exclusion).
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

DEFAULT_PB_PORT = 9876


class InventoryError(Exception):
    """An inventory or a pattern that cannot be read; ``str()`` is one line."""


@dataclass(frozen=True)
class Host:
    """One daemon to reach: its inventory name, address, PB port and user (if set)."""

    name: str
    address: str
    port: int = DEFAULT_PB_PORT
    user: str | None = None


@dataclass
class Inventory:
    """Hosts in inventory order, and the groups (names to host names)."""

    hosts: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> vars
    groups: dict[str, list[str]] = field(default_factory=dict)  # group -> direct hosts
    children: dict[str, list[str]] = field(default_factory=dict)
    group_vars: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add_host(self, name: str, group: str, hostvars: dict[str, Any]) -> None:
        self.hosts.setdefault(name, {}).update(hostvars)
        members = self.groups.setdefault(group, [])
        if name not in members:
            members.append(name)

    def members(self, group: str, seen: frozenset[str] = frozenset()) -> list[str]:
        """Every host of ``group`` and of its children, in inventory order."""
        if group in ("all", "*"):
            return list(self.hosts)
        if group in seen:
            raise InventoryError(f"group {group} is its own child")
        names = set(self.groups.get(group, ()))
        for child in self.children.get(group, ()):
            names.update(self.members(child, seen | {group}))
        return [h for h in self.hosts if h in names]

    def host_vars(self, name: str) -> dict[str, Any]:
        """A host's variables: ``all``'s, then each group's (parents before
        children), then the host's own."""
        merged = dict(self.group_vars.get("all", {}))
        for group in self._groups_of(name):
            merged.update(self.group_vars.get(group, {}))
        merged.update(self.hosts.get(name, {}))
        return merged

    def _groups_of(self, name: str) -> list[str]:
        """The groups a host is in, outermost first."""
        return [g for g in self._ordered_groups() if name in self.members(g)]

    def _ordered_groups(self) -> list[str]:
        """Groups, parents before their children."""
        order: list[str] = []

        def place(group: str, seen: frozenset[str]) -> None:
            if group in order or group in seen:
                return
            for parent, kids in self.children.items():
                if group in kids:
                    place(parent, seen | {group})
            order.append(group)

        for group in [*self.groups, *self.children, *self.group_vars]:
            if group != "all":
                place(group, frozenset())
        return order

    def host(self, name: str) -> Host:
        variables = self.host_vars(name)
        address = str(variables.get("cmdserver_host") or variables.get("ansible_host") or name)
        port = variables.get("cmdserver_pb_port", DEFAULT_PB_PORT)
        try:
            port = int(port)
        except (TypeError, ValueError):
            raise InventoryError(f"{name}: cmdserver_pb_port is not a number: {port!r}") from None
        if not 0 < port < 65536:
            raise InventoryError(f"{name}: cmdserver_pb_port out of range: {port}")
        user = variables.get("cmdserver_user")
        return Host(name, address, port, str(user) if user is not None else None)

    def select(self, pattern: str = "all") -> list[Host]:
        """The hosts a pattern selects, in inventory order (Ansible's pattern rules)."""
        chosen: list[str] = []
        included = False
        terms = [t for t in re.split(r"[:,]", pattern) if t.strip()]
        if not terms:
            raise InventoryError("empty host pattern")
        for term in terms:
            term = term.strip()
            if term.startswith("!"):
                drop = set(self._match(term[1:]))
                chosen = [h for h in chosen if h not in drop]
            elif term.startswith("&"):
                keep = set(self._match(term[1:]))
                chosen = [h for h in chosen if h in keep]
            else:
                included = True
                for h in self._match(term):
                    if h not in chosen:
                        chosen.append(h)
        if not included:  # "!web" alone: everything but web, as Ansible does
            drop = set(chosen)
            chosen = [h for h in self.hosts if h not in drop]
            for term in terms:
                term = term.strip()
                if term.startswith("!"):
                    excluded = set(self._match(term[1:]))
                    chosen = [h for h in chosen if h not in excluded]
        order = list(self.hosts)
        chosen.sort(key=order.index)
        return [self.host(h) for h in chosen]

    def _match(self, term: str) -> list[str]:
        if term in ("all", "*"):
            return list(self.hosts)
        if term in self.groups or term in self.children:
            return self.members(term)
        if term in self.hosts:
            return [term]
        if any(c in term for c in "*?["):
            names = [h for h in self.hosts if fnmatch.fnmatchcase(h, term)]
            for group in [*self.groups, *self.children]:
                if fnmatch.fnmatchcase(group, term):
                    names += [h for h in self.members(group) if h not in names]
            return names
        raise InventoryError(f"no host or group matches {term!r}")


def from_list(words: Iterable[str]) -> Inventory:
    """An inventory of ``HOST[:PORT]`` words (``[::1]:9876`` for IPv6), all in ``all``."""
    inventory = Inventory()
    for word in words:
        for item in (w for w in word.split(",") if w):
            name, port = _split_port(item)
            hostvars: dict[str, Any] = {"cmdserver_host": name}
            if port is not None:
                hostvars["cmdserver_pb_port"] = port
            inventory.add_host(item, "ungrouped", hostvars)
    if not inventory.hosts:
        raise InventoryError("no hosts given")
    return inventory


def _split_port(item: str) -> tuple[str, int | None]:
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif item.count(":") == 1:
        host, port = item.split(":")
    else:
        host, port = item, None
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise InventoryError(f"bad port in {item!r}")
    return host, int(port)


def load(path: str) -> Inventory:
    """Read an INI or YAML inventory file (told apart by its content)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise InventoryError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InventoryError(f"{path}: not UTF-8 text") from None
    stripped = [line.strip() for line in text.splitlines()]
    first = next((line for line in stripped if line and not line.startswith(("#", ";"))), "")
    if path.endswith((".yml", ".yaml")) or (first.endswith(":") and not first.startswith("[")):
        return parse_yaml(text, path)
    return parse_ini(text, path)


def parse_ini(text: str, where: str = "inventory") -> Inventory:
    inventory = Inventory()
    section, kind = "ungrouped", "hosts"
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            if not line.endswith("]"):
                raise InventoryError(f"{where}:{number}: bad section {line!r}")
            name, _, kind = line[1:-1].partition(":")
            kind = kind or "hosts"
            if kind not in ("hosts", "vars", "children") or not name:
                raise InventoryError(f"{where}:{number}: bad section {line!r}")
            section = name
            if kind == "children":
                inventory.children.setdefault(section, [])
            elif kind == "vars":
                inventory.group_vars.setdefault(section, {})
            else:
                inventory.groups.setdefault(section, [])
            continue
        if kind == "vars":
            key, equals, value = line.partition("=")
            if not equals:
                raise InventoryError(f"{where}:{number}: expected NAME=VALUE, got {line!r}")
            inventory.group_vars[section][key.strip()] = _value(value.strip())
        elif kind == "children":
            inventory.children[section].append(line.split()[0])
        else:
            try:
                words = shlex.split(line, comments=True)
            except ValueError as e:
                raise InventoryError(f"{where}:{number}: {e}") from None
            hostvars = {}
            for word in words[1:]:
                key, equals, value = word.partition("=")
                if not equals:
                    raise InventoryError(f"{where}:{number}: expected NAME=VALUE, got {word!r}")
                hostvars[key] = _value(value)
            for name in expand(words[0]):
                inventory.add_host(name, section, hostvars)
    return inventory


def parse_yaml(text: str, where: str = "inventory") -> Inventory:
    try:
        import yaml
    except ImportError:  # pragma: no cover - PyYAML is a dependency
        raise InventoryError("reading a YAML inventory needs PyYAML") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InventoryError(f"{where}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InventoryError(f"{where}: expected a mapping of groups")
    inventory = Inventory()
    for group, body in data.items():
        _yaml_group(inventory, str(group), body, where)
    return inventory


def _yaml_group(inventory: Inventory, group: str, body: Any, where: str) -> None:
    if body is None:
        body = {}
    if not isinstance(body, dict):
        raise InventoryError(f"{where}: group {group}: expected a mapping")
    unknown = set(body) - {"hosts", "vars", "children"}
    if unknown:
        keys = ", ".join(sorted(map(str, unknown)))
        raise InventoryError(f"{where}: group {group}: unknown key(s) {keys}")
    inventory.groups.setdefault(group, [])
    for name, hostvars in (body.get("hosts") or {}).items():
        if hostvars is not None and not isinstance(hostvars, dict):
            raise InventoryError(f"{where}: host {name}: expected a mapping of variables")
        for expanded in expand(str(name)):
            inventory.add_host(expanded, group, dict(hostvars or {}))
    if body.get("vars"):
        if not isinstance(body["vars"], dict):
            raise InventoryError(f"{where}: group {group}: vars must be a mapping")
        inventory.group_vars.setdefault(group, {}).update(body["vars"])
    for child, child_body in (body.get("children") or {}).items():
        inventory.children.setdefault(group, []).append(str(child))
        _yaml_group(inventory, str(child), child_body, where)


_RANGE = re.compile(r"\[([0-9a-zA-Z]+):([0-9a-zA-Z]+)(?::([0-9]+))?\]")


def expand(pattern: str) -> list[str]:
    """Ansible's host ranges: ``web[1:3]``, ``db-[01:10:2]``, ``[a:c].example.com``."""
    m = _RANGE.search(pattern)
    if m is None:
        return [pattern]
    start, end, step = m.group(1), m.group(2), int(m.group(3) or 1)
    head, tail = pattern[:m.start()], pattern[m.end():]
    if start.isdigit() and end.isdigit():
        width = len(start) if start.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(start), int(end) + 1, step)]
    elif len(start) == len(end) == 1 and start in string.ascii_letters:
        letters = string.ascii_letters
        items = list(letters[letters.index(start):letters.index(end) + 1:step])
    else:
        raise InventoryError(f"bad host range in {pattern!r}")
    return [name for item in items for name in expand(head + item + tail)]


def _value(text: str) -> Any:
    """An INI variable's value: a number if it reads as one, unquoted text else."""
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    if text.isdigit():
        return int(text)
    return text
