"""A change run again after its answer was lost: what the call reports is what its first run
did.

A networked index runs a confirm, a cancel or an outcome report again when the answer of a
run that may have landed was lost (tests/test_change_doubt.py storms that on real servers).
Here the index is the memory store, made to lose the answer of every first run after
writing it: each call must still succeed, say it changed the command, and leave what one
run leaves.
"""

from __future__ import annotations

from amqp_queue.state import CommandStatus, MemoryStore
from amqp_queue.state.fleet import Change
from amqp_queue.state.model import CommandRecord, EndReason
from tests.drain_claims import drained


class _LosesFirstAnswers(MemoryStore):
    """Writes each change, then runs it again on what it wrote, as a backend does whose first
    answer was lost after the write landed."""

    async def _modify(self, command_id: str, change: Change) -> CommandRecord | None:
        await super()._modify(command_id, change)
        return await super()._modify(command_id, change)


async def test_a_confirm_run_again_reports_its_own_write() -> None:
    store = _LosesFirstAnswers()
    command_id = await store.enqueue_with_confirmation("gw-1", "unlock", b"x", 60)
    record, changed = await store.confirm_changed(command_id, by="ops")
    assert changed
    assert record.confirmed
    assert record.confirmed_by == "ops"


async def test_a_cancel_run_again_succeeds_instead_of_saying_already_cancelled() -> None:
    store = _LosesFirstAnswers()
    command_id = await store.enqueue("gw-1", b"x", 60)
    record = await store.cancel(command_id, by="ops")
    assert record.end_reason is EndReason.CANCELLED
    assert record.cancelled_by == "ops"


async def test_an_outcome_report_run_again_counts_as_this_calls() -> None:
    store = _LosesFirstAnswers()
    command_id = await store.enqueue("gw-1", b"x", 60)
    assert [record.id for record in await drained(store, "gw-1")] == [command_id]
    record, changed = await store.report(command_id, CommandStatus.SUCCEEDED, result=b"ok")
    assert changed
    assert record.outcome is CommandStatus.SUCCEEDED
    assert record.outcome_result == b"ok"
