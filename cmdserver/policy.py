"""What commands may touch: the file jail (and, later, scan targets and sizes)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from cmdserver.errors import CommandError, PathOutsideRoots


class Policy:
    """Limits shared by every command and every door.

    ``roots`` are the directories file commands may touch.  Paths are resolved
    with :func:`os.path.realpath`, so ``..`` and symlinks that lead out of every
    root are refused.  Resolution touches the filesystem: call it from a thread.
    """

    def __init__(self, roots: Sequence[str]) -> None:
        if not roots:
            raise ValueError("at least one root is needed")
        self.roots = [os.path.realpath(r) for r in roots]

    def resolve(self, path: str | None) -> str:
        """The real path for ``path`` if it lies inside a root; else raise.

        Relative paths are relative to the first root; no path means the first root.
        """
        if not path:
            return self.roots[0]
        if "\0" in path:
            raise CommandError("invalid path: NUL byte")
        candidate = os.path.realpath(os.path.join(self.roots[0], path))
        if not self.contains(candidate):
            raise PathOutsideRoots()
        return candidate

    def contains(self, real_path: str) -> bool:
        """True if the (already resolved) path is a root or lies below one."""
        for root in self.roots:
            if real_path == root or real_path.startswith(root.rstrip(os.sep) + os.sep):
                return True
        return False
