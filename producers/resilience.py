"""Connection policy for cryptofeed feeds: what cryptofeed's ConnectionHandler lacks.

cryptofeed reconnects with a delay that doubles without bound and gives up after ``retries``;
a handler exception (one malformed frame) tears the connection down. For weeks of unattended
running arbstream needs instead:

* reconnect forever with exponential backoff and jitter: 1 s doubling to a 60 s cap, each
  delay drawn uniformly from [delay/2, delay] ("equal jitter", AWS Architecture Blog,
  "Exponential Backoff And Jitter", 2015); reset after a successful subscribe;
* a staleness watchdog: no frame for ``stale_after`` seconds forces a reconnect (cryptofeed's
  own watcher, checked every ``stale_after / 4`` s);
* a frame the adapter cannot parse goes to the dead-letter hook with the reason, and the
  connection carries on;
* every frame is counted, every reconnect reported.

:func:`start_resilient` starts a cryptofeed ``Feed`` with this handler instead of its own.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from cryptofeed.connection_handler import ConnectionHandler
from cryptofeed.feed import Feed
from websockets import ConnectionClosed

log = logging.getLogger(__name__)


@dataclass
class Backoff:
    """Exponential backoff with equal jitter; delays in seconds."""

    initial: float = 1.0
    cap: float = 60.0
    attempt: int = 0

    def next_delay(self, rng: random.Random | None = None) -> float:
        """The next delay: ``d = min(cap, initial * 2**attempt)`` drawn from ``[d/2, d]``."""
        ceiling = min(self.cap, self.initial * 2**self.attempt)
        self.attempt += 1
        return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)

    def reset(self) -> None:
        """Start over from ``initial`` (after a successful subscribe)."""
        self.attempt = 0


@dataclass(frozen=True)
class FeedHooks:
    """Callbacks a resilient connection reports to (all about one exchange)."""

    frame: Callable[[], None]
    reconnect: Callable[[], None]
    bad_frame: Callable[[str | bytes, str], Awaitable[None]]


class ResilientConnectionHandler(ConnectionHandler):
    """cryptofeed's ConnectionHandler with arbstream's reconnect, watchdog and error policy."""

    def __init__(self, *args, hooks: FeedHooks, backoff: Backoff, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hooks = hooks
        self.backoff = backoff

    async def _create_connection(self) -> None:
        await asyncio.sleep(self.start_delay)
        first = True
        while self.running:
            try:
                async with self.conn.connect() as connection:
                    if not first:
                        self.hooks.reconnect()
                    first = False
                    await self.authenticate(connection)
                    await self.subscribe(connection)
                    self.backoff.reset()
                    watcher = asyncio.create_task(self._watcher()) if self.timeout != -1 else None
                    try:
                        await self._handler(connection, self.handler)
                    finally:
                        if watcher is not None:
                            watcher.cancel()
                    if not self.running:
                        return
                    reason = "connection closed"
            except (ConnectionClosed, OSError, TimeoutError) as exc:
                reason = f"connection issue {exc!r}"
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect, forever
                reason = f"error {exc!r}"
            if not self.running:
                return
            delay = self.backoff.next_delay()
            first = False
            log.warning("%s: %s; reconnecting in %.1f s", self.conn.uuid, reason, delay)
            await asyncio.sleep(delay)

    async def _handler(self, connection, handler) -> None:  # noqa: ANN001 - cryptofeed types
        async for message in connection.read():
            if not self.running:
                await connection.close()
                return
            self.hooks.frame()
            try:
                await handler(message, connection, self.conn.last_message)
            except Exception as exc:  # noqa: BLE001 - one bad frame must not stop the feed
                await self.hooks.bad_frame(message, f"{type(exc).__name__}: {exc}")


def start_resilient(
    feed: Feed, loop: asyncio.AbstractEventLoop, hooks: FeedHooks, stale_after: float = 30.0
) -> None:
    """Start ``feed``'s connections with :class:`ResilientConnectionHandler`.

    Args:
        stale_after: seconds without any frame before the watchdog forces a reconnect.
    """
    for conn, sub, handler, auth in feed.connect():
        conn_handler = ResilientConnectionHandler(
            conn, sub, handler, auth, -1, timeout=stale_after,
            timeout_interval=max(stale_after / 4, 0.1), exceptions=None, log_on_error=False,
            start_delay=feed.start_delay, hooks=hooks, backoff=Backoff(),
        )
        feed.connection_handlers.append(conn_handler)
        conn_handler.start(loop)
