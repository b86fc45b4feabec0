"""Operator API tokens: parsing the configuration and telling which token a request carries."""

from __future__ import annotations

import pytest

from amqp_queue.auth import TokenConfigError, Tokens


def test_parse_reads_names_and_tokens_and_ignores_blank_entries() -> None:
    tokens = Tokens.parse(" ops:abc , ,ci:d:e:f,")

    assert tokens.names == ["ci", "ops"]
    assert tokens.identify("Bearer abc") == "ops"
    assert tokens.identify("bearer d:e:f") == "ci"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("ops", "token entry 1 is not of the form name:token"),
        ("ops:a,:hidden-secret", "token entry 2"),
        ("ops:", "(name 'ops')"),
        ("ops:a,ops:b", "'ops' is configured twice"),
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
