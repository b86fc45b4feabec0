"""Bearer tokens of the operator API: parsed from configuration, checked in constant time.

Tokens are configured as ``name:token,name2:token2`` (``AMQP_QUEUE_TOKENS``). The name is
what the audit log shows; a token's value never appears in a message, a log line or a
``repr``.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping


class TokenConfigError(ValueError):
    """The token configuration is malformed; the message never contains a token."""


class Tokens:
    """The operator API's bearer tokens, by name.

    Args:
        tokens: token value by name.
    """

    __slots__ = ("_tokens",)

    def __init__(self, tokens: Mapping[str, str] | None = None) -> None:
        self._tokens = {name: token.encode() for name, token in (tokens or {}).items()}

    @classmethod
    def parse(cls, spec: str | None) -> Tokens:
        """Reads ``name:token,name2:token2``; an empty or missing spec means no tokens.

        Raises:
            TokenConfigError: an entry has no name or no token, or a name repeats.
        """
        tokens: dict[str, str] = {}
        for position, entry in enumerate((spec or "").split(","), start=1):
            entry = entry.strip()
            if not entry:
                continue
            name, sep, token = entry.partition(":")
            name, token = name.strip(), token.strip()
            if not sep or not name or not token:
                raise TokenConfigError(
                    f"token entry {position} is not of the form name:token"
                    + (f" (name {name!r})" if name and sep else "")
                )
            if name in tokens:
                raise TokenConfigError(f"token name {name!r} is configured twice")
            tokens[name] = token
        return cls(tokens)

    @property
    def names(self) -> list[str]:
        """The configured token names (for start-up logs)."""
        return sorted(self._tokens)

    def __bool__(self) -> bool:
        return bool(self._tokens)

    def __repr__(self) -> str:
        return f"Tokens(names={self.names!r})"

    def identify(self, authorization: str | None) -> str | None:
        """The name of the token an ``Authorization: Bearer`` header carries, or None.

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
        return matched
