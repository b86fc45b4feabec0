"""Bearer tokens of the operator API: parsed from configuration, checked in constant time.

Tokens are configured as ``name:token,name2:token2:role`` (``AMQP_QUEUE_TOKENS``). The name
is what the audit log shows; a token's value never appears in a message, a log line or a
``repr``. An entry without a role keeps every right (as before roles existed); a role limits
it (see :data:`ROLE_RIGHTS`). With a role, the role follows the last ``:``, so a token holding
a ``:`` still works when the entry names its role.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Mapping
from dataclasses import dataclass


class TokenConfigError(ValueError):
    """The token configuration is malformed; the message never contains a token."""


class Right(enum.Enum):
    """What a call to the API does; each route needs one."""

    READ = "read"
    OPERATE = "operate"
    """Enqueue, cancel, cleanup."""
    CONFIRM = "confirm"


class Role(enum.Enum):
    """What a token may do."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    APPROVER = "approver"
    FULL = "full"
    """An entry that names no role: every right (configurations from before roles)."""


ROLE_RIGHTS: Mapping[Role, frozenset[Right]] = {
    Role.VIEWER: frozenset({Right.READ}),
    Role.OPERATOR: frozenset({Right.READ, Right.OPERATE}),
    # Confirming implies operating: an approver can also cancel what it will not approve.
    Role.APPROVER: frozenset({Right.READ, Right.OPERATE, Right.CONFIRM}),
    Role.FULL: frozenset(Right),
}

CONFIGURABLE_ROLES = (Role.VIEWER, Role.OPERATOR, Role.APPROVER)
"""The roles an entry may name; :attr:`Role.FULL` is what naming none means."""


@dataclass(frozen=True, slots=True)
class Caller:
    """Who a request comes from: the token's name and its role."""

    name: str
    role: Role

    def may(self, right: Right) -> bool:
        """Whether the caller's role carries ``right``."""
        return right in ROLE_RIGHTS[self.role]


def _parse_role(position: int, name: str, text: str) -> Role:
    role = next((r for r in CONFIGURABLE_ROLES if r.value == text), None)
    if role is None:
        # The text is not echoed: a token holding ':' would show its tail here.
        raise TokenConfigError(
            f"token entry {position} (name {name!r}) ends in an unknown role; the role after "
            f"the last ':' must be one of {', '.join(r.value for r in CONFIGURABLE_ROLES)}"
        )
    return role


class Tokens:
    """The operator API's bearer tokens, by name.

    Args:
        tokens: token value by name.
        roles: the role of a name; a name not in it has :attr:`Role.FULL`.
    """

    __slots__ = ("_roles", "_tokens")

    def __init__(
        self, tokens: Mapping[str, str] | None = None, roles: Mapping[str, Role] | None = None
    ) -> None:
        self._tokens = {name: token.encode() for name, token in (tokens or {}).items()}
        unknown = sorted(set(roles or {}) - set(self._tokens))
        if unknown:
            raise TokenConfigError(f"role given for unknown token name(s) {', '.join(unknown)}")
        self._roles = {name: (roles or {}).get(name, Role.FULL) for name in self._tokens}

    @classmethod
    def parse(cls, spec: str | None) -> Tokens:
        """Reads ``name:token,name2:token2:role``; an empty or missing spec means no tokens.

        Raises:
            TokenConfigError: an entry has no name or no token, a name repeats, or a role is
                not one of viewer, operator, approver.
        """
        tokens: dict[str, str] = {}
        roles: dict[str, Role] = {}
        for position, entry in enumerate((spec or "").split(","), start=1):
            entry = entry.strip()
            if not entry:
                continue
            name, sep, rest = entry.partition(":")
            name = name.strip()
            token, role_sep, role_text = rest.rpartition(":")
            if not role_sep:
                token, role_text = rest, ""
            token = token.strip()
            if not sep or not name or not token:
                raise TokenConfigError(
                    f"token entry {position} is not of the form name:token or name:token:role"
                    + (f" (name {name!r})" if name and sep else "")
                )
            if name in tokens:
                raise TokenConfigError(f"token name {name!r} is configured twice")
            tokens[name] = token
            if role_sep:
                roles[name] = _parse_role(position, name, role_text.strip())
        return cls(tokens, roles)

    @property
    def names(self) -> list[str]:
        """The configured token names (for start-up logs)."""
        return sorted(self._tokens)

    def describe(self) -> str:
        """The names with their roles, for start-up logs: ``alice, val (viewer)``."""
        return ", ".join(
            name if self._roles[name] is Role.FULL else f"{name} ({self._roles[name].value})"
            for name in self.names
        )

    def role(self, name: str) -> Role:
        """The role of a configured token name."""
        return self._roles[name]

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def __repr__(self) -> str:
        return f"Tokens(names={self.names!r})"

    def identify(self, authorization: str | None) -> str | None:
        """The name of the token an ``Authorization: Bearer`` header carries, or None."""
        caller = self.caller(authorization)
        return None if caller is None else caller.name

    def caller(self, authorization: str | None) -> Caller | None:
        """Who an ``Authorization: Bearer`` header identifies, or None.

        Every configured token is compared, each with :func:`hmac.compare_digest`, so the
        time taken tells nothing about which token, or how much of one, matched.
        """
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer":
            return None
        candidate = presented.strip().encode()
        matched: str | None = None
        for name, token in self._tokens.items():
            if hmac.compare_digest(candidate, token) and matched is None:
                matched = name
        return None if matched is None else Caller(matched, self._roles[matched])
