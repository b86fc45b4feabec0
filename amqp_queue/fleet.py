"""RabbitMQStore's fleet calls: outcomes (rule 9), rollouts (rule 10), retiring a device.

The index decides (:mod:`amqp_queue.state.fleet`); this side publishes what a rollout made
ready, deletes a retired device's queue and tells the observer.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential_jitter,
)

from amqp_queue.calls_in_flight import CallsInFlight, counted
from amqp_queue.config import RabbitMQConfig
from amqp_queue.errors import QueueMismatch
from amqp_queue.observer import Observer
from amqp_queue.publish_path import PublishPath
from amqp_queue.received import OutcomeReporter
from amqp_queue.relay_holds import WRITER_GRACE
from amqp_queue.state import rules
from amqp_queue.state.cancellation import run_through
from amqp_queue.state.errors import StateError
from amqp_queue.state.indexed_store import IndexedStore
from amqp_queue.state.model import (
    CommandRecord,
    CommandStatus,
    DeviceSummary,
    Outcome,
    Position,
    RolloutSummary,
)
from amqp_queue.state.validation import Limits, validate_reason, validate_result

if TYPE_CHECKING:
    from amqp_queue.topology import Topology

T = TypeVar("T")

logger = logging.getLogger("amqp_queue.store")


class FleetDelivery:
    """The fleet calls of :class:`~amqp_queue.store.RabbitMQStore` (a mixin of it)."""

    state: IndexedStore
    observer: Observer
    limits: Limits
    config: RabbitMQConfig
    _path: PublishPath
    _calls: CallsInFlight

    if TYPE_CHECKING:  # provided by RabbitMQStore and BrokerStart

        @property
        def broker_pending(self) -> bool: ...

        async def _ready(self) -> Topology: ...

        def _refuse_if_closed(self) -> None: ...

        def _device(self, device_id: str) -> str: ...

        async def _flush_outbox(self) -> None: ...

    # -- outcomes (rule 9) ----------------------------------------------------------------

    async def complete_command(self, command_id: str, result: bytes | None = None) -> None:
        """See :meth:`IndexedStore.complete_command`."""
        data = validate_result(result, self.limits)
        record, changed = await self.state.report(command_id, CommandStatus.SUCCEEDED, result=data)
        if changed:  # the same report again is harmless, and counted once
            self.observer.outcome(record)

    async def fail_command(self, command_id: str, reason: str) -> None:
        """See :meth:`IndexedStore.fail_command`."""
        text = validate_reason(reason, self.limits)
        record, changed = await self.state.report(command_id, CommandStatus.FAILED, reason=text)
        if changed:  # the same report again is harmless, and counted once
            self.observer.outcome(record)

    def _outcome_reporter(self) -> OutcomeReporter:
        """What the commands ``consume`` hands out report their outcomes through."""
        return OutcomeReporter(self._complete_received, self._fail_received)

    async def _complete_received(self, command_id: str, result: bytes | None) -> None:
        """:meth:`complete_command` for a command ``consume`` handed out (see
        :class:`~amqp_queue.received.ReceivedCommand`): marked delivered first. Not public:
        it takes any id as received."""
        data = validate_result(result, self.limits)
        await self.state.mark_delivered([command_id])
        await self.complete_command(command_id, data)

    async def _fail_received(self, command_id: str, reason: str) -> None:
        """:meth:`fail_command` for a command ``consume`` handed out."""
        text = validate_reason(reason, self.limits)
        await self.state.mark_delivered([command_id])
        await self.fail_command(command_id, text)

    async def get_outcome(self, command_id: str) -> Outcome | None:
        """See :meth:`IndexedStore.get_outcome`."""
        return await self.state.get_outcome(command_id)

    async def get_command(self, command_id: str) -> CommandRecord:
        """See :meth:`IndexedStore.get_command`."""
        return await self.state.get_command(command_id)

    # -- fleet-wide lists (the operator console) -------------------------------------------

    async def awaiting_confirmation(
        self,
        *,
        after: Position | None = None,
        limit: int = 100,
        device_prefix: str | None = None,
        command_type: str | None = None,
    ) -> list[CommandRecord]:
        """See :meth:`IndexedStore.awaiting_confirmation`."""
        return await self.state.awaiting_confirmation(
            after=after, limit=limit, device_prefix=device_prefix, command_type=command_type
        )

    async def devices_with_open(
        self, *, after: str | None = None, limit: int = 100
    ) -> list[DeviceSummary]:
        """See :meth:`IndexedStore.devices_with_open`."""
        return await self.state.devices_with_open(after=after, limit=limit)

    async def device_history(
        self, device_id: str, *, before: Position | None = None, limit: int = 100
    ) -> list[CommandRecord]:
        """See :meth:`IndexedStore.device_history`."""
        device = self._device(device_id)
        return await self.state.device_history(device, before=before, limit=limit)

    # -- rollouts (rule 10) and retiring a device -----------------------------------------

    @counted
    async def confirm_rollout(self, rollout_id: str, *, by: str | None = None) -> int:
        """See :meth:`IndexedStore.confirm_rollout`; the confirmed commands are published
        together (pipelined)."""
        self._refuse_if_closed()
        if not self.broker_pending:
            await self._ready()
        confirmed = await self._path.write_outside(
            self.state.confirm_members(rollout_id, by=by), self._unpublished_ready
        )
        for record in confirmed:
            self.observer.confirmed(record)
        await self._publish_ready(confirmed, reachable=not self.broker_pending)
        if not self.broker_pending:
            try:
                await self._publish_confirmed_elsewhere(rollout_id, confirmed)
            except StateError as exc:
                # The confirmation landed, and its own members are published or owed: an
                # error now would tell the caller nothing was confirmed. The others are
                # their confirmer's to publish, or the relay's.
                logger.warning(
                    "confirm_rollout %s: confirmed; members confirmed elsewhere not looked at: %s",
                    rollout_id,
                    exc,
                )
        return len(confirmed)

    async def _publish_confirmed_elsewhere(
        self, rollout_id: str, confirmed: Sequence[CommandRecord]
    ) -> None:
        """Members another call confirmed (the rollout confirmed twice at once, here or in
        another process): their publishes land before this call returns, as a repeated
        confirm of one command waits, or a command enqueued next would go first."""
        mine = {record.id for record in confirmed}
        others = set(await self.state.rollout_unpublished(rollout_id)) - mine
        # A fan-out publishes a relay batch at a time, each within publish_timeout: past
        # that with no mark landing, its writer is stuck (or dead).
        within = WRITER_GRACE + self.config.publish_timeout
        stuck = await self._path.published_elsewhere(others, within)
        if stuck:
            stuck_records = await self.state.deliverable(stuck)
            await self._publish_ready(list(stuck_records.values()), reachable=True)

    async def rollout_enqueuer(self, rollout_id: str) -> str | None:
        """See :meth:`IndexedStore.rollout_enqueuer`."""
        return await self.state.rollout_enqueuer(rollout_id)

    async def cancel_rollout(self, rollout_id: str, *, by: str | None = None) -> int:
        """See :meth:`IndexedStore.cancel_rollout`; messages already queued are dropped at
        delivery."""
        return await self.state.cancel_rollout(rollout_id, by=by)

    async def rollout_summary(self, rollout_id: str) -> RolloutSummary:
        """See :meth:`IndexedStore.rollout_summary`."""
        return await self.state.rollout_summary(rollout_id)

    async def retire_device(self, device_id: str) -> int:
        """Cancels the device's open commands (they end ``CANCELLED``, still queryable) and
        deletes its queue with whatever is in it.

        A ``consume`` stream still open on the device ends when the broker cancels its
        consumer. A drain under way hands out what it handed over before the retiring (its
        claims are open commands, which the retiring cancels); cancelled, it finds its queue
        gone and ends what it handed over ``CANCELLED`` too. Cancelled by its caller once
        the queue's deletion began, the retire runs to its end (the index's retries
        included) before the cancellation is raised.

        Returns:
            How many commands it cancelled.

        Raises:
            InvalidDeviceId: a bad device id.
            BrokerError: the queue could not be deleted (nothing is cancelled; call
                again).
            StateError: the queue is deleted, but the index refused to cancel the commands
                for ``publish_timeout`` seconds: they are listed as pending with no message
                until ``retire_device`` is called again. (A try whose outcome the index could
                not tell may have cancelled them: the next one then counts 0.)
        """
        device = self._device(device_id)
        topology = await self._ready()
        # To its end once begun, through the caller's cancellation (raised after it): cut
        # between its two steps, the commands stayed pending with their messages deleted.
        try:
            return await run_through(self._retire(topology, device))
        except asyncio.CancelledError as cut:
            if isinstance(cut.__cause__, StateError):  # nobody else hears of it
                logger.error("retire_device(%r) cut short: %s", device, cut.__cause__)
            raise

    async def _retire(self, topology: Topology, device: str) -> int:
        # The queue first: an enqueue accepted between the two steps is cancelled by the
        # second (its message, if any, is stale in a new queue); cancelled first, it would
        # stay pending with its message deleted, never to be delivered.
        await topology.delete_queue(device)
        # With the queue gone, the commands must end now: tried again while the index
        # refuses (a cut connection coming back), as long as a publish may take.
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(StateError),
                stop=stop_after_delay(self.config.publish_timeout),
                wait=wait_exponential_jitter(multiplier=0.05, max=1.0),
                reraise=True,
            ):
                with attempt:
                    return await self.state.retire_device(device)
        except StateError as exc:
            raise StateError(
                f"the queue of {device!r} is deleted but its commands are not cancelled "
                f"({exc}): call retire_device again"
            ) from exc
        raise AssertionError("unreachable: tenacity returns or raises")

    @counted
    async def _accept_many(self, records: Sequence[CommandRecord]) -> None:
        self._refuse_if_closed()
        reachable = not self.broker_pending
        if reachable:
            topology = await self._ready()
            declared = await _bounded(
                [topology.ensure_queue(record.device_id) for record in records],
                return_exceptions=True,
            )
            failed = [outcome for outcome in declared if isinstance(outcome, BaseException)]
            for outcome in failed:
                if isinstance(outcome, QueueMismatch):
                    raise outcome  # nothing written yet: a clear error, as for one enqueue
            if failed:
                # Once per call: a rollout to a whole fleet on a struggling broker would log
                # a line per device.
                logger.warning(
                    "%d of %d queues of a rollout not declared, the relay publishes its "
                    "commands (the first failure: %r)",
                    len(failed),
                    len(records),
                    failed[0],
                )
                reachable = False
        # One transaction, all or nothing, outside the group commit: a refusal (a device at
        # its limit) must fail this call alone, and whole.
        ready = self._unpublished_ready(records)
        superseded = await self._path.write_outside(
            self.state.write(records, ()), lambda _: ready, if_unknown=[r.id for r in ready]
        )
        self.observer.enqueued(records, superseded)
        await self._publish_ready(records, reachable=reachable)

    async def _publish_ready(self, records: Sequence[CommandRecord], *, reachable: bool) -> None:
        """Publishes the ready ones of ``records`` at once, their confirms pipelined, or
        leaves them to the relay."""
        ready = [
            record
            for record in self._unpublished_ready(records)
            if record.id not in self._path.in_flight
        ]
        if not reachable or len(ready) > FAN_OUT_IN_FLIGHT:
            # Past FAN_OUT_IN_FLIGHT the publishes would wait their turn, and a command
            # enqueued meanwhile to one of those devices would be published ahead of its
            # fan-out command: the relay publishes a fan-out that large, in ready order.
            for record in ready:
                self._path.owe(record.id)
            if reachable:
                # Before the call returns, as a smaller fan-out is: a command another
                # process enqueues after it (that process does not know what this one
                # owes) would otherwise be published ahead of it.
                try:
                    await self._flush_outbox()
                except asyncio.CancelledError:
                    await self._path.published_after_a_cut([record.id for record in ready])
                    raise
            return
        try:
            await asyncio.gather(*(self._path.publish(record) for record in ready))
        except asyncio.CancelledError:
            # The publishes not started yet would wait out the relay's lease behind newer
            # commands; cut, the call still raises only once they are published.
            await self._path.published_after_a_cut(self._path.owe_unstarted(ready))
            raise

    def _unpublished_ready(self, records: Sequence[CommandRecord]) -> list[CommandRecord]:
        now = self.state.clock()
        return [
            record
            for record in records
            if rules.is_deliverable(record, now) and record.published_at is None
        ]


# Broker calls of one fan-out in flight at once. Started all together, 10,000 publishes of a
# rollout outlasted their publish timeout on a busy broker and were left to the relay, which
# published copies of what the broker had in fact received.
FAN_OUT_IN_FLIGHT = 1_000


async def _bounded(
    calls: Sequence[Coroutine[Any, Any, T]], *, return_exceptions: bool = False
) -> list[T | BaseException]:
    """Awaits ``calls`` with at most :data:`FAN_OUT_IN_FLIGHT` running at once, in order."""
    gate = asyncio.Semaphore(FAN_OUT_IN_FLIGHT)

    async def gated(call: Coroutine[Any, Any, T]) -> T:
        try:
            async with gate:
                return await call
        finally:
            call.close()  # cancelled while it waited for the gate: never started, never run

    return await asyncio.gather(
        *(gated(call) for call in calls), return_exceptions=return_exceptions
    )
