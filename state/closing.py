"""``async with`` for the objects that hold a connection, a channel or a file (stores, streams,
the service): leaving the block closes them (:class:`Closing`). In the state package, the lower
layer, so the state index and the delivery side share it."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Closing:
    """Entering returns the object; leaving the block closes it.

    A subclass defines ``close``; one whose ending depends on how the block ended (a stream
    settles the command in hand only if the body finished) overrides :meth:`_leave`.
    """

    async def close(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._leave(finished=exc_type is None)

    async def _leave(self, *, finished: bool) -> None:
        """Ends the object as the ``async with`` block ends; ``finished``: without raising."""
        await self.close()
