"""Authentication: one ``twisted.cred`` portal and realm for every door.

The realm hands out one account per authenticated user; each door registers
how to turn that account into its own avatar (the line door's session user,
an SSH ``IConchUser``, a PB perspective), so all doors share one portal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from zope.interface import Interface, implementer

from cmdserver.policy import Policy

ANONYMOUS = "anonymous"


class IAccount(Interface):
    """The avatar interface of the line door: the account itself."""


@dataclass(frozen=True)
class Account:
    """An authenticated user; ``roots`` overrides the daemon's jail roots if set."""

    name: str
    roots: tuple[str, ...] | None = None


AvatarFactory = Callable[[Account, Any], tuple[Any, Callable[[], None]]]


@implementer(IRealm)
class Realm:
    """Maps an avatar ID to an :class:`Account`, then to the avatar a door asked for."""

    def __init__(self, lookup: Callable[[str], Account] | None = None) -> None:
        self.lookup = lookup or Account
        self._factories: dict[Any, AvatarFactory] = {
            IAccount: lambda account, mind: (account, lambda: None),
        }

    def register(self, interface: Any, factory: AvatarFactory) -> None:
        """Tell the realm how to build ``interface``'s avatar from an account.

        ``factory(account, mind)`` returns ``(avatar, logout)``.
        """
        self._factories[interface] = factory

    def requestAvatar(self, avatarId: bytes | str | tuple[()], mind: Any,
                      *interfaces: Any) -> tuple:
        name = avatarId.decode("utf-8") if isinstance(avatarId, bytes) else avatarId
        # No checker of ours gives cred's anonymous ``()``: every avatar ID names a user.
        account = self.lookup(cast(str, name))
        for interface in interfaces:
            factory = self._factories.get(interface)
            if factory is not None:
                avatar, logout = factory(account, mind)
                return interface, avatar, logout
        raise NotImplementedError(f"no avatar for {interfaces!r}")


def build_portal(realm: Realm, checkers: Sequence[ICredentialsChecker] = ()) -> Portal:
    return Portal(realm, list(checkers))


def policy_for(account: Account, default: Policy) -> Policy:
    """The policy a user's commands run under: their own roots if they have any."""
    return Policy(account.roots) if account.roots else default
