"""MemoryStore: the whole contract in process memory."""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta

from . import rules
from .clock import Clock, utc_now
from .indexed_store import DEFAULT_RETENTION, Change, IndexedStore
from .model import CommandRecord, CommandStatus, DeviceSummary, EndReason, Position
from .validation import DEFAULT_LIMITS, Limits


class MemoryStore(IndexedStore):
    """An in-memory command store for tests and development.

    No persistence: everything is lost when the process ends. Safe under concurrent asyncio
    tasks of one event loop because no method awaits between reading and writing its state;
    it is not thread-safe.
    """

    def __init__(
        self,
        *,
        limits: Limits = DEFAULT_LIMITS,
        clock: Clock = utc_now,
        retention: timedelta = DEFAULT_RETENTION,
    ) -> None:
        super().__init__(limits=limits, clock=clock, retention=retention)
        self._records: dict[str, CommandRecord] = {}
        self._by_device: dict[str, list[str]] = {}
        self._open_by_type: dict[tuple[str, str], str] = {}
        self._outbox_owner: str | None = None
        self._relay_lease: tuple[str, datetime] | None = None

    async def add(self, records: Sequence[CommandRecord]) -> int:
        now = self.clock()
        by_device: dict[str, list[CommandRecord]] = {}
        for record in records:
            by_device.setdefault(record.device_id, []).append(record)
        for device, added in by_device.items():
            before, after = rules.open_after_add(self._device_records(device), added, now)
            rules.check_room(device, before, after, self.limits)
        superseded = 0
        for record in records:
            if record.command_type is not None:
                key = (record.device_id, record.command_type)
                previous_id = self._open_by_type.get(key)
                if previous_id is not None:
                    previous = self._records[previous_id]
                    reason = rules.end_of_replaced(previous, now)
                    superseded += reason is EndReason.SUPERSEDED
                    self._records[previous_id] = replace(previous, end_reason=reason, ended_at=now)
                self._open_by_type[key] = record.id
            self._records[record.id] = record
            self._by_device.setdefault(record.device_id, []).append(record.id)
        return superseded

    async def get(self, command_id: str) -> CommandRecord | None:
        return self._records.get(command_id)

    async def open_commands(self, device_id: str) -> list[CommandRecord]:
        now = self.clock()
        return [
            record
            for record in self._device_records(device_id)
            if record.is_open and record.expires_at > now
        ]

    async def _modify(self, command_id: str, change: Change) -> CommandRecord | None:
        record = self._records.get(command_id)
        if record is None:
            return None
        updated = change(record)
        if updated is None:
            return record
        self._store(updated)
        return updated

    async def _claim(
        self, device_id: str, now: datetime, command_ids: Collection[str] | None
    ) -> list[CommandRecord]:
        wanted = None if command_ids is None else set(command_ids)
        until = rules.claim_until(now)
        claimed = []
        for record in self._device_records(device_id):
            if wanted is None and rules.held_by_a_claim(record, now):
                break
            if (wanted is None or record.id in wanted) and rules.is_deliverable(record, now):
                held = replace(record, claimed_until=until)
                self._store(held)
                claimed.append(held)
        return claimed

    async def _end_claims(self, command_ids: Collection[str], now: datetime) -> int:
        ended = 0
        for command_id in command_ids:
            record = self._records.get(command_id)
            if record is None or record.claimed_until is None or record.expires_at <= now:
                continue
            if record.is_open:
                self._store(replace(record, claimed_until=None))
                ended += 1
        return ended

    async def _hand_over(
        self, command_ids: Sequence[str], claimed_until: datetime, now: datetime
    ) -> list[str]:
        handed = []
        for command_id in command_ids:
            record = self._records.get(command_id)
            delivered = None if record is None else rules.handed_over(record, claimed_until, now)
            if delivered is not None:
                self._store(delivered)
                handed.append(command_id)
        return handed

    async def deliverable(self, command_ids: Collection[str]) -> dict[str, CommandRecord]:
        now = self.clock()
        found = (self._records.get(command_id) for command_id in command_ids)
        return {
            record.id: record
            for record in found
            if record is not None and rules.is_deliverable(record, now)
        }

    async def mark_delivered(self, command_ids: Collection[str]) -> int:
        now = self.clock()
        marked = 0
        for command_id in command_ids:
            record = self._records.get(command_id)
            delivered = None if record is None else rules.taken(record, now)
            if delivered is not None:
                self._store(delivered)
                marked += 1
        return marked

    async def _release(self, claims: Mapping[str, datetime], *, unpublish: bool) -> int:
        now = self.clock()
        reopened = 0
        for command_id, claimed_until in claims.items():
            record = self._records.get(command_id)
            if record is None or record.claimed_until != claimed_until:
                continue
            if record.is_open:
                self._records[command_id] = rules.released(
                    record, now, slot_taken=False, unpublish=unpublish
                )
                reopened += record.expires_at > now  # expired: the expiry sweep ends it
                continue
            if not rules.given_back_delivered(record):
                continue
            slot = None if record.command_type is None else (record.device_id, record.command_type)
            taken = slot is not None and self._open_by_type.get(slot) not in (None, command_id)
            released = rules.released(record, now, slot_taken=taken, unpublish=unpublish)
            self._records[command_id] = released
            if released.is_open:
                reopened += 1
                if slot is not None:
                    self._open_by_type[slot] = command_id
        return reopened

    async def _hold_outbox(self, owner: str) -> str:
        if self._outbox_owner is None:
            self._outbox_owner = owner
        return self._outbox_owner

    async def _hold_relay(self, holder: str, now: datetime, until: datetime) -> bool:
        current = self._relay_lease
        if current is not None and current[0] != holder and current[1] > now:
            return False
        self._relay_lease = (holder, until)
        return True

    async def expire(self, now: datetime) -> int:
        expired = [
            record
            for record in self._records.values()
            if record.is_open and record.expires_at <= now
        ]
        for record in expired:
            self._store(replace(record, end_reason=EndReason.EXPIRED, ended_at=now))
        return len(expired)

    async def prune(self, before: datetime) -> int:
        doomed = [
            record
            for record in self._records.values()
            if (start := record.pruned_after) is not None and start < before
        ]
        for record in doomed:
            del self._records[record.id]
            ids = self._by_device[record.device_id]
            ids.remove(record.id)
            if not ids:
                del self._by_device[record.device_id]
        return len(doomed)

    async def unpublished(self, limit: int) -> list[CommandRecord]:
        now = self.clock()
        waiting = [
            record
            for record in self._records.values()
            if record.published_at is None and rules.is_deliverable(record, now)
        ]
        return rules.in_ready_order(waiting)[:limit]

    async def mark_published(self, command_ids: Collection[str]) -> None:
        now = self.clock()
        for command_id in command_ids:
            record = self._records.get(command_id)
            if record is not None:
                self._records[command_id] = replace(record, published_at=now)

    async def reject(self, command_ids: Collection[str]) -> int:
        now = self.clock()
        rejected = 0
        for command_id in command_ids:
            record = self._records.get(command_id)
            if record is not None and record.is_open:
                self._store(replace(record, end_reason=EndReason.REJECTED, ended_at=now))
                rejected += 1
        return rejected

    async def time_out(self, now: datetime) -> int:
        overdue = [
            record for record in self._records.values() if rules.outcome_overdue(record, now)
        ]
        for record in overdue:
            self._store(replace(record, outcome=CommandStatus.TIMED_OUT, outcome_at=now))
        return len(overdue)

    async def _confirm_rollout(
        self, rollout_id: str, now: datetime, by: str | None = None
    ) -> list[CommandRecord]:
        confirmed = []
        for record in self._rollout(rollout_id):
            if record.is_open and record.expires_at > now and not record.is_ready:
                updated = replace(record, confirmed=True, confirmed_at=now, confirmed_by=by)
                self._store(updated)
                confirmed.append(updated)
        return confirmed

    async def _cancel_open(
        self,
        now: datetime,
        *,
        device_id: str | None = None,
        rollout_id: str | None = None,
        by: str | None = None,
    ) -> int:
        members = (
            self._device_records(device_id) if device_id is not None else self._rollout(rollout_id)
        )
        cancelled = 0
        for record in members:
            if record.is_open and record.expires_at > now:
                ended = replace(record, end_reason=EndReason.CANCELLED, ended_at=now)
                self._store(replace(ended, cancelled_by=by))
                cancelled += 1
        return cancelled

    async def _rollout_counts(self, rollout_id: str, now: datetime) -> dict[CommandStatus, int]:
        return dict(Counter(rules.status_of(record, now) for record in self._rollout(rollout_id)))

    async def _rollout_unpublished(self, rollout_id: str, now: datetime) -> list[str]:
        return [
            record.id
            for record in self._rollout(rollout_id)
            if rules.is_deliverable(record, now) and record.published_at is None
        ]

    async def _rollout_enqueuer(self, rollout_id: str) -> tuple[bool, str | None]:
        for record in self._rollout(rollout_id):
            return True, record.enqueued_by
        return False, None

    # The fleet-wide lists scan too: the memory store is for tests and development.

    async def awaiting_confirmation(
        self,
        *,
        after: Position | None = None,
        limit: int = 100,
        device_prefix: str | None = None,
        command_type: str | None = None,
    ) -> list[CommandRecord]:
        now = self.clock()
        found = sorted(
            (
                record
                for record in self._records.values()
                if record.is_open
                and record.expires_at > now
                and not record.is_ready
                and (device_prefix is None or record.device_id.startswith(device_prefix))
                and (command_type is None or record.command_type == command_type)
                and (after is None or (record.created_at, record.id) > after)
            ),
            key=lambda record: (record.created_at, record.id),
        )
        return found[:limit]

    async def devices_with_open(
        self, *, after: str | None = None, limit: int = 100
    ) -> list[DeviceSummary]:
        summaries = []
        for device in sorted(self._by_device):
            if after is not None and device <= after:
                continue
            live = await self.open_commands(device)
            if live:
                waiting = sum(not record.is_ready for record in live)
                summaries.append(DeviceSummary(device, len(live) - waiting, waiting))
            if len(summaries) == limit:
                break
        return summaries

    async def device_history(
        self, device_id: str, *, before: Position | None = None, limit: int = 100
    ) -> list[CommandRecord]:
        found = sorted(
            (
                record
                for record in self._device_records(device_id)
                if before is None or (record.created_at, record.id) < before
            ),
            key=lambda record: (record.created_at, record.id),
            reverse=True,
        )
        return found[:limit]

    def _rollout(self, rollout_id: str | None) -> list[CommandRecord]:
        # A scan: the memory store is for tests and development, not for fleets.
        return [record for record in self._records.values() if record.rollout_id == rollout_id]

    def _device_records(self, device_id: str) -> list[CommandRecord]:
        return [self._records[command_id] for command_id in self._by_device.get(device_id, [])]

    def _store(self, record: CommandRecord) -> None:
        """Saves a changed record and keeps the open-by-type index in step."""
        self._records[record.id] = record
        if record.command_type is not None and not record.is_open:
            key = (record.device_id, record.command_type)
            if self._open_by_type.get(key) == record.id:
                del self._open_by_type[key]
