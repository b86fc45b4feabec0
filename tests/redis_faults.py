"""A redis-py connection to the real Redis that loses, refuses or stalls replies on demand."""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio.connection import Connection as RedisConnection
from redis.exceptions import ConnectionError as RedisConnectionError


class LosesReplies(RedisConnection):
    """A connection to the real Redis that, while ``lose`` is above 0, drops the reply to
    each command after Redis ran it: the connection dies as a reply is on its way. While
    ``refuse`` is above 0 a command fails before it is sent; while ``stall`` is set, a
    reply never comes. With ``only`` set, only commands whose bytes hold it (a script's
    SHA) are affected."""

    lose = 0
    refuse = 0
    stall = False
    only: bytes | None = None
    _sent = b""

    def _targeted(self) -> bool:
        only = type(self).only
        return only is None or only in self._sent

    async def send_packed_command(self, command: Any, *args: Any, **kwargs: Any) -> None:
        parts = [command] if isinstance(command, bytes | str) else list(command)
        self._sent = b"".join(p.encode() if isinstance(p, str) else bytes(p) for p in parts)
        if type(self).refuse > 0 and self._targeted():
            type(self).refuse -= 1
            await self.disconnect()
            raise RedisConnectionError("connection refused")
        await super().send_packed_command(command, *args, **kwargs)

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if type(self).stall and self._targeted():
            try:
                await asyncio.Event().wait()
            except BaseException:
                # As redis-py's own read does: a reply left unread must not answer the next.
                await self.disconnect(nowait=True)
                raise
        response = await super().read_response(*args, **kwargs)
        if type(self).lose > 0 and self._targeted():
            type(self).lose -= 1
            await self.disconnect()
            raise RedisConnectionError("reply lost")
        return response
