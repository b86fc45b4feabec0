"""The shared half of every state backend: the Store contract on top of a few primitives.

A backend subclasses :class:`IndexedStore` and implements only how records are stored and
locked. The rules (validation, replacement, confirmation, expiry, ordering) come from
:mod:`amqp_queue.state.rules`. The delivery layer drives the same primitives
directly, which is why the outbox and batch methods are public.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime, timedelta

from . import rules
from .clock import Clock, advancing, checked, utc_now
from .closing import Closing
from .drain_claims import DrainClaims
from .enqueue_calls import CommandIntake
from .errors import CommandNotFound, OutboxTaken, StateError
from .fleet import Change, FleetCalls, check_command_id
from .give_back import GiveBack
from .model import CommandRecord, CommandStatus, DeviceSummary, PendingCommand, Position, Sweep
from .validation import DEFAULT_LIMITS, Limits, validate_actor

logger = logging.getLogger("amqp_queue.state")

DEFAULT_RETENTION = timedelta(days=7)

__all__ = ["DEFAULT_RETENTION", "Change", "IndexedStore"]


class IndexedStore(CommandIntake, FleetCalls, GiveBack, DrainClaims, Closing):
    """A complete :class:`~state.protocol.Store` built on backend primitives.

    Args:
        limits: what the store accepts (rule 7).
        clock: the time source; inject one to test expiry without sleeping.
        retention: how long finished commands stay queryable by ``get_status`` before
            ``cleanup`` prunes them.
    """

    def __init__(
        self,
        *,
        limits: Limits = DEFAULT_LIMITS,
        clock: Clock = utc_now,
        retention: timedelta = DEFAULT_RETENTION,
    ) -> None:
        if retention < timedelta(0):
            raise ValueError("retention must not be negative")
        self.limits = limits
        self.clock = checked(clock)
        self.retention = retention

    # -- the Store contract ------------------------------------------------------------

    async def _accept(self, record: CommandRecord) -> str:
        await self.add([record])
        return record.id

    async def _accept_many(self, records: Sequence[CommandRecord]) -> None:
        await self.add(records)

    async def get_pending(self, device_id: str) -> list[PendingCommand]:
        device = self._validate_device(device_id)
        return [record.to_pending() for record in await self.open_commands(device)]

    async def get_pending_confirmations(self, device_id: str) -> list[PendingCommand]:
        device = self._validate_device(device_id)
        return [
            record.to_pending()
            for record in await self.open_commands(device)
            if not record.is_ready
        ]

    async def confirm_command(self, command_id: str, *, by: str | None = None) -> None:
        await self.confirm(command_id, by=by)

    async def cancel_command(self, command_id: str, *, by: str | None = None) -> None:
        await self.cancel(command_id, by=by)

    async def cleanup(self) -> int:
        """Ends expired commands, times out overdue outcomes, prunes after the retention.

        Returns:
            How many commands it ended ``EXPIRED`` (as rule 6 says); the commands it ended
            ``TIMED_OUT`` are not counted here: :meth:`sweep` reports both.
        """
        return (await self.sweep()).expired

    async def sweep(self) -> Sweep:
        """What :meth:`cleanup` does, with every count: expired, timed out, pruned."""
        now = self.clock()
        expired = await self.expire(now)
        timed_out = await self.time_out(now)
        pruned = await self.prune(now - self.retention)
        logger.info(
            "cleanup: %d expired, %d timed out, %d finished commands pruned",
            expired,
            timed_out,
            pruned,
        )
        return Sweep(expired=expired, timed_out=timed_out, pruned=pruned)

    async def get_status(self, command_id: str) -> CommandStatus:
        check_command_id(command_id)
        record = await self.get(command_id)
        if record is None:
            raise CommandNotFound(command_id)
        return rules.status_of(record, self.clock())

    async def close(self) -> None:
        """Releases what the store owns; the default owns nothing."""
        return None

    # -- helpers shared with the delivery layer ----------------------------------------

    async def confirm(self, command_id: str, *, by: str | None = None) -> CommandRecord:
        """Confirms a command and returns its record as it now stands."""
        record, _ = await self.confirm_changed(command_id, by=by)
        return record

    async def confirm_changed(
        self, command_id: str, *, by: str | None = None
    ) -> tuple[CommandRecord, bool]:
        """Confirms a command: its record as it now stands, and whether this call confirmed
        it (False when it needed no confirmation, was confirmed already or was delivered).
        ``by`` (who confirms) is kept as ``confirmed_by`` when this call confirms it."""
        by = validate_actor(by)
        confirming = _OwnWriteAware(
            lambda current, now: rules.confirmed(current, now, by),
            lambda current, now: rules.confirmed_by_call(current, now, by),
            advancing(self.clock),
        )
        record = await self.modify(command_id, confirming)
        changed = confirming.wrote
        if changed:
            logger.info("confirmed command %s for device %s", command_id, record.device_id)
        else:
            logger.info(
                "confirming command %s for device %s changed nothing", command_id, record.device_id
            )
        return record, changed

    async def cancel(self, command_id: str, *, by: str | None = None) -> CommandRecord:
        """Cancels a command and returns its record as it now stands; ``by`` (who cancels)
        is kept as ``cancelled_by``."""
        by = validate_actor(by)
        cancelling = _OwnWriteAware(
            lambda current, now: rules.cancelled(current, now, by),
            lambda current, now: rules.cancelled_by_call(current, now, by),
            advancing(self.clock),
        )
        record = await self.modify(command_id, cancelling)
        logger.info("cancelled command %s for device %s", command_id, record.device_id)
        return record

    async def modify(self, command_id: str, change: Change) -> CommandRecord:
        """Applies ``change`` (pure: see :data:`Change`) to one command atomically; raises
        CommandNotFound if unknown."""
        check_command_id(command_id)
        record = await self._modify(command_id, change)
        if record is None:
            raise CommandNotFound(command_id)
        return record

    async def claim_outbox(self, owner: str) -> None:
        """Makes ``owner`` (the namespace the outbox is published into) the one that
        publishes this index's outbox; the first claim on an index sets it for good.

        Raises:
            OutboxTaken: another owner holds the outbox.
        """
        holder = await self._hold_outbox(owner)
        if holder != owner:
            raise OutboxTaken(
                f"this state index publishes for {holder!r}, not {owner!r}: give each "
                "exchange its own state (SQLite file, PostgreSQL ?schema=, Redis ?prefix=)"
            )

    async def hold_relay(self, holder: str, seconds: float) -> bool:
        """Takes or renews the relay lease for ``seconds``; returns whether ``holder`` has it.

        Several processes (sidecars on one index) each run an outbox relay. Each publishes
        what it owes itself; the commands nobody owes any more (their writer died between
        its write and its publish) are swept by the one relay holding this lease, so each
        is published once, not once per survivor. The lease is free once its holder let
        ``seconds`` pass without renewing it (it died), or gave it up (``seconds`` = 0).
        """
        now = self.clock()
        return await self._hold_relay(holder, now, now + timedelta(seconds=max(seconds, 0.0)))

    async def write(self, records: Sequence[CommandRecord], published: Collection[str]) -> int:
        """Adds ``records`` (see :meth:`add`) and marks ``published`` commands published.

        The delivery layer's group commit: new commands and the publish marks of earlier
        ones share one round trip. A backend that can makes it one transaction; marks are
        advisory (a lost one costs a duplicate publish, dropped at delivery).

        Returns:
            How many open, unexpired commands the records superseded.

        Raises:
            StateError: the records were not written (or the error says the outcome is
                unknown).
        """
        superseded = await self.add(records) if records else 0
        if published:
            try:
                await self.mark_published(published)
            except StateError as exc:
                if not records:
                    raise
                # The records are written: raising would tell their callers "not written"
                # for commands the relay then publishes and devices receive. A lost mark
                # costs a second publish, dropped at delivery.
                logger.warning(
                    "%d commands written, but marking %d others published failed: %s",
                    len(records),
                    len(published),
                    exc,
                )
        return superseded

    # -- primitives a backend implements -----------------------------------------------

    @abc.abstractmethod
    async def add(self, records: Sequence[CommandRecord]) -> int:
        """Inserts validated records in order, in one atomic step.

        A record with a ``command_type`` first ends the open command of that
        ``(device_id, command_type)`` (see :func:`amqp_queue.state.rules.end_of_replaced`).

        Returns:
            How many open, unexpired commands the records superseded.
        """

    @abc.abstractmethod
    async def get(self, command_id: str) -> CommandRecord | None:
        """The record of any command still held, finished ones included."""

    @abc.abstractmethod
    async def open_commands(self, device_id: str) -> list[CommandRecord]:
        """Open, unexpired commands of a device in write order."""

    @abc.abstractmethod
    async def _modify(self, command_id: str, change: Change) -> CommandRecord | None:
        """Loads one record under lock, applies ``change`` and stores the result."""

    @abc.abstractmethod
    async def deliverable(self, command_ids: Collection[str]) -> dict[str, CommandRecord]:
        """Of these ids, the commands that are open, ready and unexpired now."""

    async def is_deliverable(self, command_id: str) -> bool:
        """Whether one command is open, ready and unexpired now (asked before a hand-out).

        A backend overrides it where one command can be answered more cheaply than a set.
        """
        return command_id in await self.deliverable([command_id])

    @abc.abstractmethod
    async def mark_delivered(self, command_ids: Collection[str]) -> int:
        """Marks open commands delivered (after a device took them); returns how many."""

    @abc.abstractmethod
    async def _release(self, claims: Mapping[str, datetime], *, unpublish: bool) -> int:
        """Of ``claims`` (ids to the ``claimed_until`` of the claim giving them back), ends
        those claims on open commands and opens again what their hand-overs delivered (see
        :meth:`release`); returns how many are open again."""

    @abc.abstractmethod
    async def _hold_outbox(self, owner: str) -> str:
        """Records ``owner`` as the outbox's unless one is recorded; returns the recorded one."""

    @abc.abstractmethod
    async def _hold_relay(self, holder: str, now: datetime, until: datetime) -> bool:
        """Records ``holder`` as the relay lease's until ``until`` unless another holds it
        past ``now``; returns whether ``holder`` holds it."""

    @abc.abstractmethod
    async def expire(self, now: datetime) -> int:
        """Ends every open command whose TTL ran out; returns how many."""

    @abc.abstractmethod
    async def prune(self, before: datetime) -> int:
        """Deletes final commands whose retention started before ``before``
        (:attr:`CommandRecord.pruned_after`); returns how many."""

    @abc.abstractmethod
    async def time_out(self, now: datetime) -> int:
        """Ends ``TIMED_OUT`` every delivered command whose outcome is overdue
        (:func:`amqp_queue.state.rules.outcome_overdue`); returns how many."""

    @abc.abstractmethod
    async def unpublished(self, limit: int) -> list[CommandRecord]:
        """The outbox: deliverable commands not yet marked published, in ready order."""

    @abc.abstractmethod
    async def mark_published(self, command_ids: Collection[str]) -> None:
        """Marks these commands published: the outbox handed them on."""

    @abc.abstractmethod
    async def awaiting_confirmation(
        self,
        *,
        after: Position | None = None,
        limit: int = 100,
        device_prefix: str | None = None,
        command_type: str | None = None,
    ) -> list[CommandRecord]:
        """Open, unexpired commands awaiting confirmation across the fleet, oldest first
        (by ``created_at``, then id), starting after ``after``; at most ``limit``.
        ``device_prefix`` and ``command_type`` narrow it."""

    @abc.abstractmethod
    async def devices_with_open(
        self, *, after: str | None = None, limit: int = 100
    ) -> list[DeviceSummary]:
        """Devices holding open, unexpired commands, by device id, starting after ``after``;
        at most ``limit``."""

    @abc.abstractmethod
    async def device_history(
        self, device_id: str, *, before: Position | None = None, limit: int = 100
    ) -> list[CommandRecord]:
        """The device's commands of any status still held, newest first (by ``created_at``,
        then id, descending), starting before ``before``; at most ``limit``."""

    @abc.abstractmethod
    async def reject(self, command_ids: Collection[str]) -> int:
        """Ends open commands ``REJECTED``: the outbox could not hand them on, for good.

        Returns:
            How many open commands it ended; finished and unknown ids are left alone.
        """


class _OwnWriteAware:
    """A :data:`Change` that decides with the time it runs and knows its own write when a
    backend runs it again.

    It runs once the backend holds the command (its row lock, its file's write lock, its
    WATCH), so expiry is compared with that time, read from ``now``: not the time the call
    began, which a wait for another writer's lock or a busy event loop left behind (a
    command whose TTL ran out meanwhile, read EXPIRED by others, is not cancelled or
    confirmed). A backend runs a change again when an attempt failed, also after it wrote
    and lost the reply (Redis: a WATCH whose EXEC answer never came). Once an attempt of
    this call wrote, a record that ``is_own`` recognises holds that write (at that
    attempt's time): the change is done, not refused (``rule`` would say "already
    cancelled"). ``wrote``: the stored attempt changed the record (the one impurity
    :data:`Change` allows for: the last run is the stored one).
    """

    def __init__(
        self,
        rule: Callable[[CommandRecord, datetime], CommandRecord | None],
        is_own: Callable[[CommandRecord, datetime], bool],
        now: Clock,
    ) -> None:
        self._rule = rule
        self._is_own = is_own
        self._now = now
        self._wrote_at: datetime | None = None

    @property
    def wrote(self) -> bool:
        return self._wrote_at is not None

    def __call__(self, current: CommandRecord) -> CommandRecord | None:
        if self._wrote_at is not None and self._is_own(current, self._wrote_at):
            return None
        at = self._now()
        updated = self._rule(current, at)
        self._wrote_at = at if updated is not None else None
        return updated
