"""What a Kafka error means for the publisher, and logging errors without flooding the log.

:func:`classify` sorts a librdkafka error (from ``produce()``, a delivery report, the error
callback or ``poll``/``flush``) into ``"fatal"`` (the producer instance is unusable: stop and
let the supervisor restart the process), ``"record"`` (this record cannot be written: it
goes to the dead-letter topic with the reason, the rest carry on), ``"purged"`` (removed by
our own shutdown) or ``"client"`` (a client or configuration problem no retry will fix: stop).
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from confluent_kafka import KafkaError

Kind = Literal["fatal", "record", "purged", "client"]

#: Errors about one record (its size or content), not about the client.
RECORD_ERRORS = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,  # also raised locally by produce() past message.max.bytes
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,  # CORRUPT_MESSAGE: CRC mismatch on the broker
    KafkaError.INVALID_TIMESTAMP,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_MSG_SIZE,
    KafkaError._MSG_TIMED_OUT,  # only with a finite message.timeout.ms (the live one is 0)
    KafkaError._BAD_MSG,
})
#: Delivery reports of records our own ``purge()`` removed at shutdown.
PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})


def classify(err: KafkaError) -> Kind:
    """The kind of ``err`` (module docstring)."""
    code = err.code()
    if err.fatal() or code == KafkaError._FATAL:
        return "fatal"
    if code in RECORD_ERRORS:
        return "record"
    if code in PURGED:
        return "purged"
    return "client"


def describe(err: KafkaError) -> str:
    """``NAME: text`` of a Kafka error, e.g. ``MSG_SIZE_TOO_LARGE: Broker: Message size too
    large``."""
    return f"{err.name()}: {err.str()}"


class RateLimitedLog:
    """Log the first occurrence of each kind of message at once, then at most one line per
    ``interval`` seconds per kind, carrying the count of those not logged in between."""

    def __init__(self, logger: logging.Logger, interval: float = 10.0) -> None:
        self.logger = logger
        self.interval = interval
        self._last: dict[str, float] = {}
        self._muted: dict[str, int] = {}

    def __call__(self, level: int, kind: str, msg: str, *args: object) -> None:
        """Log ``msg % args`` at ``level`` unless ``kind`` was logged less than ``interval``
        seconds ago (then it is counted and reported with the next line of that kind)."""
        now = time.monotonic()
        if now - self._last.get(kind, -1e18) < self.interval:
            self._muted[kind] = self._muted.get(kind, 0) + 1
            return
        self._last[kind] = now
        muted = self._muted.pop(kind, 0)
        if muted:
            msg += f" (and {muted} more like it in the last {self.interval:.0f} s)"
        self.logger.log(level, msg, *args)
