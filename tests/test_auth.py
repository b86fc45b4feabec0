"""Operator API tokens: parsing the configuration and telling which token a request carries."""

from __future__ import annotations

import pytest

from amqp_queue.auth import Caller, Right, Role, TokenConfigError, Tokens


def test_parse_reads_names_and_tokens_and_ignores_blank_entries() -> None:
    tokens = Tokens.parse(" ops:abc , ,ci:d:e:f:operator,")

    assert tokens.names == ["ci", "ops"]
    assert tokens.identify("Bearer abc") == "ops"
    # The role follows the last ':', so a token holding ':' works when its entry names one.
    assert tokens.identify("bearer d:e:f") == "ci"


def test_an_entry_without_a_role_keeps_every_right_and_a_role_limits_them() -> None:
    tokens = Tokens.parse("root:t0,v:t1:viewer,o:t2:operator,a:t3:approver")

    assert tokens.caller("Bearer t0") == Caller("root", Role.FULL)
    assert tokens.caller("Bearer t1") == Caller("v", Role.VIEWER)
    assert tokens.caller("Bearer t2") == Caller("o", Role.OPERATOR)
    assert tokens.caller("Bearer t3") == Caller("a", Role.APPROVER)
    assert tokens.describe() == "a (approver), o (operator), root, v (viewer)"
    rights = {
        token: {r for r in Right if (c := tokens.caller(f"Bearer {token}")) and c.may(r)}
        for token in ("t0", "t1", "t2", "t3")
    }
    assert rights == {
        "t0": {Right.READ, Right.OPERATE, Right.CONFIRM},
        "t1": {Right.READ},
        "t2": {Right.READ, Right.OPERATE},
        "t3": {Right.READ, Right.OPERATE, Right.CONFIRM},
    }


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ops", "token entry 1 is not of the form name:token"),
        ("ops:a,:hidden-secret", "token entry 2"),
        ("ops:", "(name 'ops')"),
        ("ops:a,ops:b", "'ops' is configured twice"),
        ("ops:hidden-secret:admin", "token entry 1 (name 'ops') ends in an unknown role"),
        ("ops:hidden:secret", "one of viewer, operator, approver"),
        ("ops:hidden-secret:", "ends in an unknown role"),
        ("ops::viewer", "(name 'ops')"),
    ],
)
def test_a_malformed_spec_is_refused_without_showing_a_token(spec: str, message: str) -> None:
    with pytest.raises(TokenConfigError) as raised:
        Tokens.parse(spec)

    assert message in str(raised.value)
    assert "hidden-secret" not in str(raised.value)


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Basic abc", "abc", "Bearer ab", "Bearer abcd"]
)
def test_anything_but_a_configured_bearer_token_identifies_nobody(header: str | None) -> None:
    assert Tokens.parse("ops:abc").identify(header) is None


def test_no_tokens_means_nobody_is_let_in_and_repr_hides_values() -> None:
    assert not Tokens.parse("")
    assert Tokens.parse(None).identify("Bearer ") is None
    assert "abc" not in repr(Tokens.parse("ops:abc"))
