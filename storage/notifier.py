"""Wake-ups between engine replicas. The database holds every task; a notifier only says "look now".

`LocalNotifier` (the default) does nothing: one server knows what it enqueued, and replicas without Redis
find each other's tasks by re-checking the database at a short interval. `RedisNotifier` publishes the
component codes of newly enqueued tasks on a Redis channel, so a long poll held by another replica returns
within milliseconds. If Redis is down, publishing and listening fail quietly (logged once) and the
database re-check carries on until Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger("storage.notifier")

CHANNEL = "engine:tasks"
RETRY_SECONDS = 1.0


class Notifier(Protocol):
    async def start(self, on_wake: Callable[[set[str]], None]) -> None: ...

    def publish(self, codes: Iterable[str]) -> None: ...

    async def stop(self) -> None: ...

    @property
    def connected(self) -> bool: ...


class LocalNotifier:
    connected = False

    async def start(self, on_wake: Callable[[set[str]], None]) -> None:
        return None

    def publish(self, codes: Iterable[str]) -> None:
        return None

    async def stop(self) -> None:
        return None


class RedisNotifier:
    def __init__(self, url: str, channel: str = CHANNEL) -> None:
        self.url = url
        self.channel = channel
        self.connected = False
        self._client: aioredis.Redis | None = None
        self._listener: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._outage_logged = False

    async def start(self, on_wake: Callable[[set[str]], None]) -> None:
        self._client = aioredis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=None)
        self._listener = asyncio.create_task(self._listen(on_wake), name="redis-wake-ups")

    def publish(self, codes: Iterable[str]) -> None:
        message = ",".join(sorted(set(codes)))
        if not message or self._client is None:
            return
        task = asyncio.get_running_loop().create_task(self._publish(message))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, message: str) -> None:
        assert self._client is not None
        # A pooled connection that broke while Redis was away fails once; the retry takes a fresh one.
        for attempt in range(2):
            try:
                await self._client.publish(self.channel, message)
                return
            except (RedisError, OSError) as exc:
                if attempt == 1:
                    self._outage(exc)

    async def _listen(self, on_wake: Callable[[set[str]], None]) -> None:
        assert self._client is not None
        while True:
            try:
                async with self._client.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    self._recovered()
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            data = message["data"]
                            text = data.decode() if isinstance(data, bytes) else str(data)
                            on_wake({code for code in text.split(",") if code})
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as exc:
                self._outage(exc)
            # Anything we may have missed while away is found by the database re-check; wake everyone once.
            on_wake(set())
            await asyncio.sleep(RETRY_SECONDS)

    def _outage(self, exc: BaseException) -> None:
        self.connected = False
        if not self._outage_logged:
            self._outage_logged = True
            log.warning("Redis at %s is unreachable (%s): falling back to polling the database", self.url, exc)

    def _recovered(self) -> None:
        self.connected = True
        if self._outage_logged:
            self._outage_logged = False
            log.info("Redis at %s is back: wake-ups resume", self.url)

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        for task in list(self._pending):
            task.cancel()
        if self._client is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._client.aclose()
