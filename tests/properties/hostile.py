"""Hypothesis strategies for input every store must reject (docs/design.md rule 7).

Each strategy yields only values that are invalid by construction, written from the rule's
wording rather than from ``state.validation``: a device id names an AMQP queue, so it is
plain ASCII (letters, digits, ``_ . : @ -``), starts with a letter or digit, has no ``..``,
is at most 128 characters and does not start with the reserved ``amq.``.
"""

from __future__ import annotations

import math
import string
from datetime import timedelta
from decimal import Decimal

from hypothesis import strategies as st

DEVICE_ID_CHARS = string.ascii_letters + string.digits + "_.:@-"
COMMAND_TYPE_CHARS = string.ascii_letters + string.digits + "_.:/-"
MAX_NAME = 128
MAX_TTL = timedelta(days=30)

_NOT_TEXT: st.SearchStrategy[object] = st.one_of(
    st.none(),
    st.integers(),
    st.floats(),
    st.booleans(),
    st.binary(min_size=1, max_size=8),
    st.lists(st.text(max_size=3), max_size=2),
)

SQL_INJECTIONS = [
    "dev'; DROP TABLE command_queue;--",
    'dev" OR "1"="1',
    "x' OR '1'='1",
    "dev'1",
    "1; DELETE FROM command_queue",
]


def _name_chars(alphabet: str, *, min_size: int = 0) -> st.SearchStrategy[str]:
    return st.text(alphabet=alphabet, min_size=min_size, max_size=20)


def _with_a_bad_character(alphabet: str) -> st.SearchStrategy[str]:
    """A name with one character outside ``alphabet``: unicode, control, space, quote, ..."""
    return st.builds(
        lambda head, bad, tail: head + bad + tail,
        _name_chars(alphabet),
        st.characters(exclude_characters=alphabet),
        _name_chars(alphabet),
    )


def _hostile_names(alphabet: str) -> list[st.SearchStrategy[object]]:
    """What is wrong with a device id and a command type alike."""
    alnum = string.ascii_letters + string.digits
    return [
        st.just(""),
        _NOT_TEXT,
        # Over the limit; from 256 characters on also over AMQP's 255-byte queue-name limit.
        st.text(alphabet=alnum, min_size=MAX_NAME + 1, max_size=400),
        _with_a_bad_character(alphabet),
        # Few characters, many bytes: 4-byte UTF-8 throughout.
        st.text(alphabet=st.characters(min_codepoint=0x10000), min_size=64, max_size=80),
        st.builds(lambda tail: "../" + tail, _name_chars(alphabet)),
        st.builds(lambda first, tail: first + tail, st.sampled_from("_.:@-/"), _name_chars(alnum)),
        st.sampled_from(SQL_INJECTIONS),
    ]


def hostile_device_ids() -> st.SearchStrategy[object]:
    return st.one_of(
        *_hostile_names(DEVICE_ID_CHARS),
        # AMQP reserves queue names starting with "amq." (in any case).
        st.builds(
            lambda prefix, tail: prefix + tail,
            st.sampled_from(["amq.", "AMQ.", "Amq."]),
            _name_chars(string.ascii_letters + string.digits),
        ),
        st.builds(
            lambda head, tail: f"{head}..{tail}",
            _name_chars(string.ascii_letters, min_size=1),
            _name_chars(string.ascii_letters),
        ),
        st.builds(lambda head: f"{head}/../etc", _name_chars(string.ascii_letters, min_size=1)),
    )


def hostile_command_types() -> st.SearchStrategy[object]:
    return st.one_of(*_hostile_names(COMMAND_TYPE_CHARS))


def non_bytes_payloads() -> st.SearchStrategy[object]:
    return st.one_of(
        st.text(),
        st.none(),
        st.integers(),
        st.floats(),
        st.booleans(),
        st.lists(st.integers(0, 255), max_size=4),
        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    )


def oversized_payloads(limit: int) -> st.SearchStrategy[bytes]:
    return st.integers(limit + 1, limit * 3).map(lambda size: b"\xff" * size)


def hostile_ttls() -> st.SearchStrategy[object]:
    """Not positive, not finite, over the 30-day maximum, under a microsecond, or no number."""
    max_seconds = MAX_TTL.total_seconds()
    return st.one_of(
        st.sampled_from([0, 0.0, -0.0, math.nan, math.inf, -math.inf, 10**400, -(10**400)]),
        st.integers(max_value=0),
        st.floats(max_value=0.0),
        st.integers(min_value=int(max_seconds) + 1),
        st.floats(min_value=max_seconds, exclude_min=True),
        # Positive, yet no whole microsecond: the command would be expired when written.
        st.floats(min_value=0.0, max_value=4.9e-7, exclude_min=True),
        st.timedeltas(max_value=timedelta(0)),
        st.timedeltas(min_value=MAX_TTL + timedelta(microseconds=1)),
        st.sampled_from(["60", None, True, False, Decimal(60), complex(60, 0), [60]]),
    )
