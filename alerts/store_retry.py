"""The alert worker's MongoDB calls, retried through an outage (tenacity).

:class:`RetryingStore` wraps the :class:`~arbstream.store.mongo.alert_log.AlertStore`: every
call that fails with a connection error (:class:`pymongo.errors.ConnectionFailure`: refused,
reset, no server selected, pool wait timed out) is tried again with exponential backoff
(:data:`RETRY_INITIAL_SECONDS` doubling up to :data:`RETRY_MAX_SECONDS`) for at most
:data:`RETRY_SECONDS`; after that the error is raised and the worker stops (exit 1, offsets
of unhandled events not committed). Other MongoDB errors are raised at once.

A retried call may have been applied before its reply was lost. That is harmless for every
call but two: the claim insert, which is made recognisable by a token unique to the attempt
(:meth:`AlertStore.claim`: a retry finds its own claim and goes on to send, so the alert is
neither lost nor sent twice); and the decision log's ``$inc`` of ``count``, which can count a
decision one time too many (the log's counts only; claims and e-mails are exact).
"""

from __future__ import annotations

import inspect
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from pymongo.errors import ConnectionFailure
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from arbstream.store.mongo.alert_log import AlertKey, AlertStore

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long a MongoDB call is retried through connection errors before it fails, seconds.
RETRY_SECONDS = 120.0
#: First backoff delay and its cap, seconds.
RETRY_INITIAL_SECONDS, RETRY_MAX_SECONDS = 0.2, 5.0


class RetryingStore:
    """``store``'s methods retried on connection errors (see the module docstring); any
    other attribute (``claims``, ``log``, ``db``, ``close``) is ``store``'s own.

    Args:
        store: the store to wrap.
        retry_seconds: the retry budget of one call, seconds.
    """

    def __init__(self, store: AlertStore, retry_seconds: float = RETRY_SECONDS) -> None:
        self.store = store
        self.retry_seconds = retry_seconds
        self.stats = {"retries": 0}

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.store, name)
        if name.startswith("_") or name == "close" or not inspect.ismethod(attr):
            return attr
        return lambda *args, **kwargs: self.call(name, lambda: attr(*args, **kwargs))

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried on :class:`~pymongo.errors.ConnectionFailure` for at most
        ``retry_seconds``.

        Raises:
            pymongo.errors.PyMongoError: any other MongoDB error, or the last connection
                error once the budget is spent.
        """
        def before_sleep(state: RetryCallState) -> None:
            self.stats["retries"] += 1
            exc = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            log.warning("MongoDB %s failed (attempt %d: %s); retrying in %.1f s", what,
                        state.attempt_number, str(exc).splitlines()[0], delay)

        retrying = Retrying(
            retry=retry_if_exception_type(ConnectionFailure),
            wait=wait_exponential(multiplier=RETRY_INITIAL_SECONDS, max=RETRY_MAX_SECONDS),
            stop=stop_after_delay(self.retry_seconds), reraise=True, before_sleep=before_sleep,
        )
        return retrying(fn)

    def claim(self, item: AlertKey, state: str, message_id: str | None = None) -> bool:
        """:meth:`AlertStore.claim` with a token unique to this claim, kept across its
        retries: ``True`` also when an earlier attempt's insert was applied."""
        token = uuid.uuid4().hex
        return self.call("claim", lambda: self.store.claim(item, state, message_id, token))
