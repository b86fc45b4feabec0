"""The judge of the fault trials: it must catch what it claims to catch."""

from __future__ import annotations

from amqp_queue.state import CommandStatus
from tests.faults.ledger import (
    CUT_SHORT,
    Delivery,
    Op,
    Tally,
    judge,
    late_hand_outs,
    out_of_order,
)

DELIVERED = CommandStatus.DELIVERED


def _enqueue(key: str, at: float, kind: str = "plain", returned: float | None = 0.5) -> Op:
    command_type = {"plain": None, "update": "setpoint", "confirmable": "unlock"}[kind]
    done = None if returned is None else at + returned
    return Op("d", kind, key, command_type, at, done, f"id-{key}" if done else None)


def _got(key: str, at: float) -> Delivery:
    return Delivery("d", key, f"id-{key}", at, at, at + 0.1)


def test_an_accepted_command_never_delivered_is_lost() -> None:
    tally = judge([_enqueue("a", 1)], [], {"id-a": CommandStatus.PENDING})

    assert (tally.accepted, tally.lost) == (1, 1)


def test_a_repeat_of_the_same_command_is_a_duplicate_not_a_loss() -> None:
    tally = judge([_enqueue("a", 1)], [_got("a", 5), _got("a", 6)], {"id-a": DELIVERED})

    assert (tally.lost, tally.duplicates, tally.stale, tally.wrong_status) == (0, 1, 0, 0)


def test_a_superseded_command_delivered_after_its_replacement_returned_is_stale() -> None:
    ops = [_enqueue("v1", 1, "update"), _enqueue("v2", 2, "update")]
    statuses = {"id-v1": CommandStatus.SUPERSEDED, "id-v2": DELIVERED}

    tally = judge(ops, [_got("v1", 5), _got("v2", 6)], statuses)

    assert tally.stale == 1


def test_a_command_delivered_before_its_replacement_was_enqueued_is_fine() -> None:
    ops = [_enqueue("v1", 1, "update"), _enqueue("v2", 9, "update")]
    statuses = {"id-v1": DELIVERED, "id-v2": DELIVERED}

    tally = judge(ops, [_got("v1", 5), _got("v2", 10)], statuses)

    assert (tally.stale, tally.lost, tally.wrong_status) == (0, 0, 0)


def test_an_unconfirmed_command_delivered_is_stale_and_one_left_waiting_is_fine() -> None:
    ops = [_enqueue("u1", 1, "confirmable"), _enqueue("p", 2)]
    statuses = {"id-u1": CommandStatus.AWAITING_CONFIRMATION, "id-p": DELIVERED}

    assert judge(ops, [_got("p", 5)], statuses).stale == 0
    assert judge(ops, [_got("p", 5), _got("u1", 6)], statuses).stale == 1


def test_an_enqueue_in_flight_at_the_kill_may_or_may_not_have_replaced_the_last_one() -> None:
    ops = [_enqueue("v1", 1, "update"), _enqueue("v2", 2, "update", returned=None)]
    replaced = {"id-v1": CommandStatus.SUPERSEDED}

    assert judge(ops, [_got("v2", 5)], replaced).failures == 0
    assert judge(ops, [_got("v1", 5)], {"id-v1": DELIVERED}).failures == 0
    assert judge(ops, [], replaced).lost == 1  # one of the two had to arrive
    assert judge(ops, [_got("v1", 5), _got("v2", 6)], replaced).stale == 1


def test_a_status_that_says_delivered_for_a_command_no_device_got_is_wrong() -> None:
    tally = judge([_enqueue("a", 1)], [], {"id-a": DELIVERED})

    assert tally.wrong_status == 1
    assert judge([_enqueue("a", 1)], [], {"id-a": DELIVERED}, drained=True).drain_unseen == 1


def test_a_replacement_during_the_loop_body_is_a_race_and_after_it_a_late_mark() -> None:
    superseded = {"id-v1": CommandStatus.SUPERSEDED, "id-v2": DELIVERED}
    seen = [_got("v1", 5), _got("v2", 9)]  # v1 in the device's hands from 5 to 5.1

    def judged(replaced_at: float) -> Tally:
        ops = [_enqueue("v1", 1, "update"), _enqueue("v2", replaced_at, "update")]
        return judge(ops, seen, superseded)

    assert (judged(5.05).raced, judged(5.05).late_mark) == (1, 0)
    assert (judged(5.3).raced, judged(5.3).late_mark) == (0, 1)
    assert judged(7).wrong_status == 1  # long after: the mark should have been there


def test_a_confirmation_command_in_flight_at_the_kill_may_have_replaced_the_waiting_one() -> None:
    """Nothing is delivered in either world; only the status tells them apart."""
    ops = [_enqueue("u1", 1, "confirmable"), _enqueue("u2", 2, "confirmable", returned=None)]
    waiting = CommandStatus.AWAITING_CONFIRMATION

    assert judge(ops, [], {"id-u1": waiting}).failures == 0
    assert judge(ops, [], {"id-u1": CommandStatus.CANCELLED}).wrong_status == 1
    # Replaced by u2 only if u2 is in the index (the trial finds it by its payload).
    assert judge(ops, [], {"id-u1": CommandStatus.SUPERSEDED}).wrong_status == 1
    ops[1].command_id = "id-u2"
    statuses = {"id-u1": CommandStatus.SUPERSEDED, "id-u2": waiting}
    assert judge(ops, [], statuses).failures == 0


def test_a_delivery_under_another_id_than_the_enqueue_returned_is_stale() -> None:
    copy = Delivery("d", "a", "id-other", 5, 5, 5.1)

    assert judge([_enqueue("a", 1)], [_got("a", 5), copy], {"id-a": DELIVERED}).stale == 1


def _plain(key: str, at: float, producer: str = "p", ttl: float | None = None) -> Op:
    return Op("d", "plain", key, None, at, at + 0.1, f"id-{key}", producer=producer, ttl=ttl)


def _in(stream: str, key: str, at: float) -> Delivery:
    return Delivery("d", key, f"id-{key}", at, at, at + 0.01, stream)


def test_a_command_handed_out_after_a_later_one_in_one_stream_is_out_of_order() -> None:
    ops = [_plain("a", 1), _plain("b", 2), _plain("c", 3)]

    assert out_of_order(ops, [_in("s", "a", 5), _in("s", "b", 6), _in("s", "c", 7)]) == 0
    assert out_of_order(ops, [_in("s", "b", 5), _in("s", "a", 6), _in("s", "c", 7)]) == 1


def test_competing_streams_and_other_producers_do_not_make_an_order() -> None:
    """Two consumers of one queue each see a subsequence of it; two producers' commands
    have no order between them."""
    ops = [_plain("a", 1), _plain("b", 2), _plain("x", 1.5, producer="q")]
    deliveries = [_in("one", "b", 5), _in("two", "a", 6), _in("one", "x", 7)]

    assert out_of_order(ops, deliveries) == 0


def test_a_repeat_is_a_duplicate_not_also_out_of_order() -> None:
    ops = [_plain("a", 1), _plain("b", 2)]
    deliveries = [_in("s", "a", 5), _in("s", "b", 6), _in("s", "a", 7)]

    assert out_of_order(ops, deliveries) == 0
    assert judge(ops, deliveries, {"id-a": DELIVERED, "id-b": DELIVERED}).duplicates == 1


def test_a_command_handed_out_long_after_its_enqueue_is_late() -> None:
    ops = [_plain("a", 1), _plain("b", 2)]

    assert late_hand_outs(ops, [_in("s", "a", 2.5), _in("s", "b", 9)], within=2.0) == 1


def test_a_command_with_a_short_ttl_is_stale_after_it_expired_and_never_required() -> None:
    ops = [_plain("a", 1, ttl=0.5)]  # returned at 1.1: expired by 1.6 at the latest
    pending = {"id-a": CommandStatus.PENDING}

    assert judge(ops, [_in("s", "a", 1.5)], {"id-a": DELIVERED}).stale == 0
    assert judge(ops, [_in("s", "a", 2.0)], {"id-a": DELIVERED}).stale == 1
    assert judge(ops, [], pending).lost == 0


def test_a_call_cut_short_by_its_caller_is_not_an_error() -> None:
    cut = Op("d", "plain", "a", None, 1, 1.01, None, CUT_SHORT)

    tally = judge([cut], [], {})
    assert (tally.errors, tally.accepted, tally.lost) == (0, 0, 0)


def test_an_outcome_for_a_command_no_device_took_is_a_phantom() -> None:
    ops = [_enqueue("a", 1), _enqueue("b", 2)]
    statuses = {"id-a": CommandStatus.SUCCEEDED, "id-b": CommandStatus.FAILED}

    tally = judge(ops, [_got("a", 5)], statuses)

    assert (tally.phantom_outcomes, tally.wrong_status) == (1, 0)
    assert tally.failures == 2  # b: a phantom outcome, and lost
