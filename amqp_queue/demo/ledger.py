"""What the demo's producer issued and its devices received, and the judge of the two.

The judge does not take the store's word for what should have arrived. It knows from the
issued commands alone what must be delivered (every long-lived plain command, and the last
set-point and the last unlock of each device, which nothing could replace), counts what the
devices actually received, and only then compares with the store's final statuses.
"""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime

from amqp_queue.state.model import CommandStatus


class Kind(enum.StrEnum):
    """What the producer issued."""

    JOB = "job"
    """Plain, long TTL: must be delivered."""
    BLINK = "blink"
    """Plain, TTL under a second: expires while the device sleeps."""
    SETPOINT = "setpoint"
    """Latest wins: a newer set-point replaces one not yet delivered."""
    UNLOCK = "unlock"
    """Needs an operator's confirmation through the HTTP API."""


@dataclass(frozen=True, slots=True)
class Issued:
    id: str
    device: str
    kind: Kind
    seq: int
    asked_at: datetime
    """When the producer called enqueue (before the command existed)."""
    returned_at: datetime
    """When enqueue returned (the command, and any replacement it made, were durable)."""


@dataclass(frozen=True, slots=True)
class Receipt:
    device: str
    id: str
    at: datetime
    via: str


@dataclass(slots=True)
class Ledger:
    """Everything the demo did, in the order it did it."""

    issued: dict[str, Issued] = field(default_factory=dict)
    receipts: list[Receipt] = field(default_factory=list)
    confirm_sent: dict[str, datetime] = field(default_factory=dict)
    confirmed: set[str] = field(default_factory=set)

    def issue(self, command: Issued) -> None:
        self.issued[command.id] = command

    def receive(self, receipt: Receipt) -> None:
        self.receipts.append(receipt)

    @property
    def distinct_received(self) -> int:
        return len({receipt.id for receipt in self.receipts})


@dataclass(frozen=True, slots=True)
class Summary:
    """The demo's result; ``ok`` when nothing was lost, repeated or against the rules."""

    devices: int
    seconds: float
    enqueued: int
    replaced: int
    expired: int
    confirmed: int
    delivered: int
    lost: int
    duplicates: int
    violations: list[str]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and not self.violations

    def rows(self) -> list[tuple[str, int]]:
        return [
            ("enqueued", self.enqueued),
            ("replaced (latest wins)", self.replaced),
            ("expired (TTL)", self.expired),
            ("confirmed over HTTP", self.confirmed),
            ("delivered", self.delivered),
            ("lost", self.lost),
            ("delivered twice", self.duplicates),
            ("rule violations", len(self.violations)),
        ]


def judge(
    ledger: Ledger, statuses: dict[str, CommandStatus], *, devices: int, seconds: float
) -> Summary:
    """Compares what should have arrived with what did, then with the store's statuses."""
    received = Counter(receipt.id for receipt in ledger.receipts)
    violations: list[str] = []
    last_of: dict[tuple[str, Kind], Issued] = {}
    for command in ledger.issued.values():
        if command.kind in (Kind.SETPOINT, Kind.UNLOCK):
            key = (command.device, command.kind)
            if key not in last_of or last_of[key].seq < command.seq:
                last_of[key] = command
    must = {c.id for c in ledger.issued.values() if c.kind is Kind.JOB}
    must |= {command.id for command in last_of.values()}
    missing = {command_id for command_id in must if not received[command_id]}
    # The index says delivered but no device has it: lost just the same.
    missing |= {
        command_id
        for command_id, status in statuses.items()
        if status is CommandStatus.DELIVERED and not received[command_id]
    }
    violations += _check_receipts(ledger, statuses)
    # Each command ends one way: received, or else replaced or expired.
    unreceived = [status for command_id, status in statuses.items() if not received[command_id]]
    replaced = unreceived.count(CommandStatus.SUPERSEDED)
    expired = unreceived.count(CommandStatus.EXPIRED)
    unaccounted = len(ledger.issued) - len(received) - replaced - expired
    if unaccounted:
        violations.append(f"{unaccounted} commands were neither received, replaced nor expired")
    return Summary(
        devices=devices,
        seconds=seconds,
        enqueued=len(ledger.issued),
        replaced=replaced,
        expired=expired,
        confirmed=len(ledger.confirmed),
        delivered=len(received),
        lost=len(missing),
        duplicates=sum(count > 1 for count in received.values()),
        violations=violations,
    )


def _check_receipts(ledger: Ledger, statuses: dict[str, CommandStatus]) -> list[str]:
    """Receipts that break a rule: unknown or misrouted, out of date, unconfirmed."""
    violations: list[str] = []
    latest: dict[tuple[str, Kind], int] = {}
    successor = _successors(ledger)
    seen: set[str] = set()
    for receipt in ledger.receipts:
        if receipt.id in seen:
            continue  # a repeat, counted as delivered twice
        seen.add(receipt.id)
        command = ledger.issued.get(receipt.id)
        if command is None or command.device != receipt.device:
            violations.append(f"{receipt.device} got command {receipt.id} not meant for it")
            continue
        status = statuses.get(receipt.id)
        newer = successor.get(receipt.id)
        # consume marks a command delivered once the device asks for the next one, so a
        # replacement enqueued while the device holds it supersedes it in the index. That is
        # within the rules when the replacement was not yet durable at hand-out (concurrent
        # operations may take effect in either order); after that, it is a violation.
        replaced_in_hand = (
            status is CommandStatus.SUPERSEDED
            and newer is not None
            and receipt.at < newer.returned_at
        )
        if status is not CommandStatus.DELIVERED and not replaced_in_hand:
            violations.append(f"{receipt.id} reached {receipt.device} but the index says {status}")
        if command.kind in (Kind.SETPOINT, Kind.UNLOCK):
            key = (command.device, command.kind)
            if latest.get(key, -1) >= command.seq:
                violations.append(
                    f"{receipt.device} got {command.kind} {command.seq} after a newer one"
                )
            latest[key] = max(latest.get(key, -1), command.seq)
        if command.kind is Kind.UNLOCK:
            sent = ledger.confirm_sent.get(receipt.id)
            if sent is None or receipt.at < sent:
                violations.append(
                    f"{receipt.device} got unlock {command.seq} before its confirmation"
                )
    return violations


def _successors(ledger: Ledger) -> dict[str, Issued]:
    """For each set-point or unlock, the next one of its device and kind."""
    last: dict[tuple[str, Kind], Issued] = {}
    successor: dict[str, Issued] = {}
    for command in sorted(ledger.issued.values(), key=lambda c: c.seq):
        if command.kind in (Kind.SETPOINT, Kind.UNLOCK):
            key = (command.device, command.kind)
            if key in last:
                successor[last[key].id] = command
            last[key] = command
    return successor
