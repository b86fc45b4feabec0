"""What producers did and devices got, and the judge that turns both into a tally.

Times are ``time.monotonic()`` readings, which are system-wide on Linux, so a child process's
log and the parent's observations share one time line. An operation that never returned (its
process was killed) is *in flight*: it may or may not have reached the index. Operations on
one device are sequential, so a device has at most one in flight; the judge tries both
worlds (it took effect, it did not) and keeps the one that explains the deliveries and the
final statuses best. A world in which an in-flight enqueue took effect must find its command.

The seam trials (``seams.py``) add what only a fault-free run can demand: per hand-out stream,
the plain commands of one producer in the order it enqueued them (:func:`out_of_order`), each
within a few seconds (:func:`late_hand_outs`), and every command published once.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields

from amqp_queue.state import CommandStatus
from amqp_queue.state.model import OUTCOMES

ENQUEUES = ("plain", "update", "confirmable")
"""Kinds of operation that create a command: enqueue, enqueue_or_update, ..._with_confirmation."""

_ANSWERS = ("CommandNotFound", "CommandExpired")

CUT_SHORT = "CancelledError"
"""The error of a call its caller cancelled (or timed out) before it returned: not a failure of
the store; whether it reached the index is found out afterwards, by its payload."""

EXPIRY_MARGIN = 0.01
"""Seconds a hand-out may come after the latest moment its command can have expired before it
counts as stale: the index's wall clock and the harness's monotonic clock tick apart a little."""


@dataclass(slots=True)
class Op:
    """One call a producer made. ``key`` is the payload of the command it made or targets."""

    device: str
    kind: str  # one of ENQUEUES, or "confirm" / "cancel"
    key: str
    command_type: str | None
    started: float
    returned: float | None = None  # None: in flight when the process died
    command_id: str | None = None
    error: str | None = None
    producer: str = ""  # who made the call: a producer's calls are sequential, one at a time
    ttl: float | None = None  # a short time to live (None: long enough never to expire)

    @property
    def took_effect(self) -> bool:
        return self.returned is not None and self.error is None


@dataclass(slots=True)
class Delivery:
    """A command handed to a device: asked for at ``asked``, in the device's hands at
    ``handed``, done with (the loop body ended) at ``finished``. ``stream`` names the
    ``consume()`` stream or drain call that handed it out, where a trial tells them apart."""

    device: str
    key: str
    command_id: str
    asked: float
    handed: float
    finished: float
    stream: str = ""


def to_line(record: Op | Delivery) -> str:
    return json.dumps({"record": type(record).__name__, **asdict(record)})


def from_lines(lines: Iterable[str]) -> tuple[list[Op], list[Delivery]]:
    """Parses a child's stdout; a line cut short by SIGKILL, or any other line, is skipped."""
    ops: dict[tuple[str, float], Op] = {}
    deliveries: list[Delivery] = []
    for line in lines:
        try:
            data = json.loads(line)
        except json.JSONDecodeError:
            continue
        kind = data.pop("record", None) if isinstance(data, dict) else None
        if kind == "Op":
            op = Op(**data)
            ops[(op.key + op.kind, op.started)] = op  # a finished op overrides its start
        elif kind == "Delivery":
            deliveries.append(Delivery(**data))
    return list(ops.values()), deliveries


@dataclass(slots=True)
class Tally:
    """Totals of one or more trials."""

    trials: int = 0
    accepted: int = 0  # enqueues that returned an id
    delivered: int = 0  # hand-outs to devices, repeats included
    lost: int = 0  # should have reached a device and never did
    duplicates: int = 0  # hand-outs of a command beyond its first (same id)
    stale: int = 0  # handed out after it was cancelled, superseded or while unconfirmed
    wrong_status: int = 0  # get_status disagreed with what happened
    raced: int = 0  # cancelled/superseded while in the device's hands (status says so)
    late_mark: int = 0  # ... just after the device finished, before its mark was written
    drain_unseen: int = 0  # claimed by a drain whose caller was killed before it returned
    outbox_left: int = 0  # ready commands still unpublished after recovery
    reported: int = 0  # delivered commands whose outcome the device reported (or timed out)
    phantom_outcomes: int = 0  # an outcome recorded for a command no device took (rule 9)
    out_of_order: int = 0  # handed out, in its stream, after a later command of its producer
    late: int = 0  # handed out first more than the trial's few seconds after its enqueue
    dup_publishes: int = 0  # publishes of a command beyond its first (seen on the exchange)
    cut_short: int = 0  # enqueue calls cancelled by their caller (reached the index or not)
    slow_calls: int = 0  # short-lived stores' calls (open, one call, close) over a few seconds
    errors: int = 0  # calls that failed (reported, not judged)
    unclear_errors: int = 0  # failed with another error than the fault calls for, or repeated
    orphans: int = 0  # unpublished commands a killed sidecar left to the others' relays

    def __add__(self, other: Tally) -> Tally:
        return Tally(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(Tally)))

    @property
    def failures(self) -> int:
        """What no trial tolerates. Repeats (``duplicates``) are at-least-once delivery across
        a crash; a trial without faults counts them as failures itself."""
        return (
            self.lost
            + self.stale
            + self.wrong_status
            + self.outbox_left
            + self.phantom_outcomes
            + self.out_of_order
            + self.late
            + self.dup_publishes
            + self.unclear_errors
        )

    def lines(self) -> list[str]:
        return [f"{f.name:>14}: {getattr(self, f.name)}" for f in fields(Tally)]


@dataclass(slots=True)
class _Fate:
    """What the operations say about one command in one world."""

    op: Op
    confirmed_from: float | None = None  # when a confirm that took effect started
    ended_at: float | None = None  # when a cancel or a replacement that took effect returned
    ended_by: str | None = None
    ender_started: float | None = None  # when that cancel or replacement was called

    def end(self, at: float, by: str, started: float) -> None:
        self.ended_at, self.ended_by, self.ender_started = at, by, started

    @property
    def must_deliver(self) -> bool:
        # A command with a short time to live may expire before any device asks for it.
        ready = self.op.kind != "confirmable" or self.confirmed_from is not None
        return ready and self.ended_at is None and self.op.ttl is None

    def is_stale(self, delivery: Delivery) -> bool:
        if self.ended_at is not None and self.ended_at < delivery.asked:
            return True
        # Built before its call returned, a command expired by ``returned + ttl`` at the latest.
        op = self.op
        if (
            op.ttl is not None
            and op.returned is not None
            and delivery.asked > op.returned + op.ttl + EXPIRY_MARGIN
        ):
            return True
        if self.op.kind == "confirmable":
            return self.confirmed_from is None or self.confirmed_from > delivery.handed
        return False


def _fates(ops: list[Op], in_flight: Op | None) -> dict[str, _Fate]:
    """Replays one device's operations; ``in_flight`` is taken to have happened at its start."""
    effective = [op for op in ops if op.took_effect or op is in_flight]
    fates: dict[str, _Fate] = {}
    open_by_type: dict[str, str] = {}
    for op in sorted(effective, key=lambda op: op.started):
        at = op.started if op.returned is None else op.returned
        if op.kind in ENQUEUES:
            fates[op.key] = _Fate(op)
            if op.command_type is not None:
                previous = open_by_type.get(op.command_type)
                if previous is not None and fates[previous].ended_at is None:
                    fates[previous].end(at, "superseded", op.started)
                open_by_type[op.command_type] = op.key
        elif op.key in fates and op.kind == "confirm":
            fate = fates[op.key]
            if fate.confirmed_from is None:
                fate.confirmed_from = op.started
        elif op.key in fates and op.kind == "cancel" and fates[op.key].ended_at is None:
            fates[op.key].end(at, "cancelled", op.started)
    return fates


def _judge_world(fates: dict[str, _Fate], deliveries: list[Delivery]) -> Tally:
    tally = Tally()
    counts = Counter(delivery.key for delivery in deliveries)
    for delivery in deliveries:
        fate = fates.get(delivery.key)
        # Payloads are unique per command: one under another id than its enqueue returned
        # would be a copy a device could not recognise as a repeat.
        if (
            fate is None
            or fate.is_stale(delivery)
            or fate.op.command_id
            not in (
                None,
                delivery.command_id,
            )
        ):
            tally.stale += 1
    tally.lost = sum(1 for key, fate in fates.items() if fate.must_deliver and not counts[key])
    tally.duplicates = sum(count - 1 for count in counts.values())
    return tally


MARK_WITHIN = 1.0
"""Seconds within which a finished command must be marked delivered: consume posts the mark as
the next command is asked for, and a cancel or replacement starting later must find it
delivered. The margin is the mark's own write under contention (SQLite serialises writers,
unfairly: a cancel that started a few hundred milliseconds later may commit first)."""


def _check_status(
    fate: _Fate, first: Delivery | None, status: CommandStatus, drained: bool, tally: Tally
) -> None:
    if first is not None:
        ending = {"cancelled": CommandStatus.CANCELLED, "superseded": CommandStatus.SUPERSEDED}
        if status in OUTCOMES:
            tally.reported += 1
            return
        if status is CommandStatus.DELIVERED:
            return
        ended_by = ending.get(fate.ended_by or "")
        ender_started = fate.ender_started if fate.ender_started is not None else math.inf
        if status is ended_by and ender_started < first.finished:
            tally.raced += 1  # cancelled or replaced while the device was still on it
        elif status is ended_by and ender_started < first.finished + MARK_WITHIN:
            tally.late_mark += 1
        else:
            tally.wrong_status += 1
        return
    if status in OUTCOMES:
        # Only a device's gateway reports, after taking the command: no device took this one.
        tally.phantom_outcomes += 1
        return
    if status is CommandStatus.DELIVERED:
        if drained:
            tally.drain_unseen += 1
        else:
            tally.wrong_status += 1
        return
    if fate.ended_by == "cancelled":
        expected = CommandStatus.CANCELLED
    elif fate.ended_by == "superseded":
        expected = CommandStatus.SUPERSEDED
    elif fate.op.kind == "confirmable" and fate.confirmed_from is None:
        expected = CommandStatus.AWAITING_CONFIRMATION
    else:
        return  # a command that should have been delivered and was not: counted as lost
    tally.wrong_status += status is not expected


def judge(
    ops: list[Op],
    deliveries: list[Delivery],
    statuses: dict[str, CommandStatus],
    *,
    drained: bool = False,
) -> Tally:
    """Judges one trial. ``statuses`` maps command ids to ``get_status`` after the trial.

    With ``drained`` a command the index says was delivered but no device saw counts as
    ``drain_unseen`` (a drain claims before it returns), not as a wrong status.
    """
    total = Tally(trials=1, delivered=len(deliveries))
    total.accepted = sum(
        1 for op in ops if op.kind in ENQUEUES and op.command_id is not None and op.took_effect
    )
    # CommandNotFound is an answer, not a failure: the command was delivered or replaced first.
    total.errors = sum(1 for op in ops if op.error not in (None, CUT_SHORT, *_ANSWERS))
    for device in sorted({op.device for op in ops} | {d.device for d in deliveries}):
        device_ops = [op for op in ops if op.device == device]
        got = [delivery for delivery in deliveries if delivery.device == device]
        in_flight = [op for op in device_ops if op.returned is None]
        # The world (in-flight call took effect or not) that explains deliveries and
        # statuses best; on a tie, the one where it did not.
        worlds = [
            _judge_device(_fates(device_ops, op), got, statuses, drained)
            for op in [None, *in_flight]
        ]
        total += min(worlds, key=lambda tally: tally.failures)
    return total


def _judge_device(
    fates: dict[str, _Fate],
    got: list[Delivery],
    statuses: dict[str, CommandStatus],
    drained: bool,
) -> Tally:
    tally = _judge_world(fates, got)
    first: dict[str, Delivery] = {}
    for delivery in sorted(got, key=lambda delivery: delivery.finished):
        first.setdefault(delivery.key, delivery)
    for key, fate in fates.items():
        op = fate.op
        if op.returned is None and op.command_id is None and key not in first:
            # Taken to have reached the index, yet neither delivered nor found there.
            tally.wrong_status += 1
        status = statuses.get(op.command_id or "")
        if status is None:
            continue
        _check_status(fate, first.get(key), status, drained, tally)
        if drained and fate.must_deliver and key not in first:
            # Claimed by the killed drain: counted as drain_unseen, not again as lost.
            tally.lost -= status is CommandStatus.DELIVERED
    return tally


def required_keys(ops: list[Op]) -> set[str]:
    """Keys every device must end up with when nothing was in flight (storms)."""
    required: set[str] = set()
    for device in {op.device for op in ops}:
        fates = _fates([op for op in ops if op.device == device], None)
        required |= {key for key, fate in fates.items() if fate.must_deliver}
    return required


def _first_hand_outs(deliveries: list[Delivery]) -> list[Delivery]:
    """Each command's first hand-out (the earliest ``handed``), in the order recorded."""
    first: dict[str, Delivery] = {}
    for delivery in sorted(deliveries, key=lambda delivery: delivery.handed):
        first.setdefault(delivery.key, delivery)
    chosen = {id(delivery) for delivery in first.values()}
    return [delivery for delivery in deliveries if id(delivery) in chosen]


def out_of_order(ops: list[Op], deliveries: list[Delivery]) -> int:
    """First hand-outs that came, in their stream, after a later plain command of the same
    producer and device had come in that stream.

    A producer's calls are sequential, so its plain commands for a device are ready in the
    order it started them, and a device queue read by one consumer hands them out in that
    order; competing consumers each see a subsequence of it. ``deliveries`` must be in the
    order each stream handed them out (as recorded). Repeats are counted as duplicates, not
    here.
    """
    sequences: dict[tuple[str, str], list[Op]] = defaultdict(list)
    for op in ops:
        if op.kind == "plain":
            sequences[(op.device, op.producer)].append(op)
    rank: dict[str, tuple[str, str, int]] = {}
    for (device, producer), sequence in sequences.items():
        for position, op in enumerate(sorted(sequence, key=lambda op: op.started)):
            rank[op.key] = (device, producer, position)
    highest: dict[tuple[str, str, str], int] = {}
    count = 0
    for delivery in _first_hand_outs(deliveries):
        if delivery.key not in rank:
            continue
        device, producer, position = rank[delivery.key]
        slot = (delivery.stream, device, producer)
        if position < highest.get(slot, -1):
            count += 1
        else:
            highest[slot] = position
    return count


def late_hand_outs(ops: list[Op], deliveries: list[Delivery], within: float) -> int:
    """Commands first handed out more than ``within`` seconds after their enqueue started."""
    started = {op.key: op.started for op in ops if op.kind in ENQUEUES}
    return sum(
        1
        for delivery in _first_hand_outs(deliveries)
        if delivery.key in started and delivery.handed - started[delivery.key] > within
    )
