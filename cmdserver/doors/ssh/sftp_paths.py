"""The jail as an SFTP client sees it, the way OpenSSH's ``ChrootDirectory`` shows it.

With one root, the root is ``/``.  With several, ``/`` is a read-only directory
that lists them as ``root1``, ``root2`` … (in the order of the policy, the names
the audit log gives them: ``rootN:PATH``), and the session starts in ``/root1``.
A relative path is relative to where the session starts; ``..`` is folded by
name, as a shell's ``cd`` does, and ``..`` at ``/`` stays at ``/``.  So every
path a client can write names a place in the jail or in the virtual ``/``;
symlinks are still resolved by the jail (:mod:`cmdserver.jail`), inside it only.

Nothing here touches the disk: :meth:`ClientView.place` maps a client's path to
the path the jail takes (a root's real path and the path below it), and
:meth:`ClientView.client_path` maps a real path the jail resolved back to the
client's view.  No server path reaches a client: messages are written with the
client's own path, and :meth:`ClientView.scrub` rewrites any root's real path
left in a message of the server's into the client's view.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cmdserver.text import escaped


def path_in_text(path: str) -> re.Pattern[str]:
    """``path`` where a message names it whole: followed by ``/``, its end or a
    character that is no part of a name (``/srv/a`` is not in ``/srv/ab/x``).
    Also as an escaped message writes it (:func:`cmdserver.text.escaped`), as
    every message of the jail's is."""
    forms = sorted({path, escaped(path)}, key=len, reverse=True)
    return re.compile(f"(?:{'|'.join(map(re.escape, forms))})" + r"(?=/|$|[^\w.@+-])")


@dataclass(frozen=True)
class Place:
    """Where a client's path leads.

    ``root`` is the index of the root it lies in and ``rel`` the path below that
    root (``""`` for the root itself); ``jail`` is the path to hand to the jail.
    ``root`` is None for the virtual ``/`` of several roots (``rel`` empty) or
    a name in it that is no root (``rel`` that name and what follows).
    ``shown`` is the path as the client wrote it, for messages; ``virtual`` the
    path in the client's view, folded.
    """

    shown: str
    virtual: str
    root: int | None
    rel: str
    jail: str

    @property
    def in_virtual_root(self) -> bool:
        """True for the virtual ``/`` of several roots and anything named in it
        that is no root."""
        return self.root is None


class ClientView:
    """The mapping between the paths a client writes and the jail's roots."""

    def __init__(self, roots: Sequence[str]) -> None:
        self.roots = list(roots)
        self.several = len(self.roots) > 1
        self.names = [f"root{n}" for n in range(1, len(self.roots) + 1)] if self.several else []
        self.home = f"/{self.names[0]}" if self.several else "/"
        # Longest first, so that a nested root's paths are rewritten by its own prefix.
        order = sorted(range(len(self.roots)), key=lambda i: -len(self.roots[i]))
        self._scrubbers = [(path_in_text(self.roots[i]), self._prefix(i))
                           for i in order if self.roots[i] != "/"]

    def _prefix(self, index: int) -> str:
        """The client's path of a root: ``/`` or ``/rootN``."""
        return f"/{self.names[index]}" if self.several else "/"

    @staticmethod
    def fold(path: str, home: str = "/") -> list[str]:
        """The components of ``path`` (relative ones from ``home``), ``.`` and ``..``
        folded by name; ``..`` at ``/`` stays there."""
        parts: list[str] = []
        for part in (path if path.startswith("/") else f"{home}/{path}").split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                if parts:
                    parts.pop()
                continue
            parts.append(part)
        return parts

    def place(self, path: str) -> Place:
        """Where the client's ``path`` leads (never raises; a NUL byte is left for
        the jail to refuse)."""
        parts = self.fold(path, self.home)
        virtual = "/" + "/".join(parts)
        if not self.several:
            return self._in_root(path, virtual, 0, parts)
        if parts and parts[0] in self.names:
            return self._in_root(path, virtual, self.names.index(parts[0]), parts[1:])
        return Place(path, virtual, None, "/".join(parts), "")

    def _in_root(self, shown: str, virtual: str, index: int, parts: list[str]) -> Place:
        rel = "/".join(parts)
        root = self.roots[index]
        return Place(shown, virtual, index, rel, posixpath.join(root, rel) if rel else root)

    def client_path(self, real: str, prefer: int | None = None) -> str | None:
        """The client's path of a real path inside a root (``prefer`` that root if it
        lies in it), None if it lies in none."""
        order = list(range(len(self.roots)))
        if prefer is not None:
            order.remove(prefer)
            order.insert(0, prefer)
        for index in order:
            root = self.roots[index]
            if real == root:
                return self._prefix(index)
            inside = root.rstrip("/") + "/"
            if real.startswith(inside):
                return posixpath.join(self._prefix(index), real[len(inside):])
        return None

    def scrub(self, text: str) -> str:
        """``text`` with every root's real path written as the client sees it."""
        for pattern, prefix in self._scrubbers:
            def replace(m: re.Match[str], prefix: str = prefix) -> str:
                # The one root is "/": ROOT/x is /x, ROOT alone is /.
                followed = m.string[m.end():m.end() + 1] == "/"
                return "" if prefix == "/" and followed else prefix

            text = pattern.sub(replace, text)
        return text

    def link_target(self, target: str, link: Place) -> str | None:
        """A symlink's target as the client may see it, or None if it leads outside.

        An absolute target is shown in the client's view when it lies in a root
        (the jail follows it there), a relative one as it is when, folded by name
        from the link's directory, it stays in the link's root.
        """
        if target.startswith("/"):
            real = posixpath.normpath(target)
            if real.startswith("//"):
                real = real[1:]
            return self.client_path(real)
        if link.root is None:
            return None
        depth = len([p for p in link.rel.split("/") if p]) - 1  # the link's directory
        for part in target.split("/"):
            if part == "..":
                depth -= 1
                if depth < 0:
                    return None
            elif part not in ("", "."):
                depth += 1
        return target
