"""What a replay reports: its outcome (:class:`ReplayReport`) and its errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from arbstream.timestamps import from_ms

#: At most this many problems are spelled out in a :class:`ReplayInputError` message.
MAX_LISTED_PROBLEMS = 50


@dataclass(frozen=True)
class RowProblem:
    """One rejected input row: its 1-based file ``line`` (header is line 1), why, and the text."""

    line: int
    reason: str
    raw: str


class ReplayInputError(ValueError):
    """Replay input is missing or invalid. ``problems`` lists every bad row (may be empty)."""

    def __init__(self, message: str, problems: Sequence[RowProblem] = ()) -> None:
        self.problems: list[RowProblem] = list(problems)
        if self.problems:
            shown = [f"  line {p.line}: {p.reason}" for p in self.problems[:MAX_LISTED_PROBLEMS]]
            extra = len(self.problems) - MAX_LISTED_PROBLEMS
            if extra > 0:
                shown.append(f"  ... and {extra} more (see ReplayInputError.problems)")
            message = "\n".join([message, *shown])
        super().__init__(message)


class ReplayDeliveryError(RuntimeError):
    """Kafka did not acknowledge every record. ``failed`` counts them; ``report`` has the rest."""

    def __init__(self, message: str, failed: int, report: ReplayReport) -> None:
        super().__init__(message)
        self.failed = failed
        self.report = report


@dataclass(frozen=True)
class ReplayReport:
    """Outcome of one replay.

    Attributes:
        published: records acknowledged by Kafka per topic (``md.<exchange>.quotes``, and
            ``md.<exchange>.trades`` when trades were published).
        deadletters: records acknowledged on ``md.deadletter``.
        elapsed_s: wall-clock seconds from the first produce to the final flush.
        first_event_ts: event time of the first quote published, UTC ms (None when none).
        last_event_ts: latest event time published, UTC ms (None when none); the last
            quote's when the input was sorted.
    """

    published: dict[str, int] = field(default_factory=dict)
    deadletters: int = 0
    elapsed_s: float = 0.0
    first_event_ts: int | None = None
    last_event_ts: int | None = None

    @property
    def quotes(self) -> int:
        """Total quotes acknowledged across every quote topic."""
        return sum(n for t, n in self.published.items() if not t.endswith(".trades"))

    @property
    def trades(self) -> int:
        """Total trades acknowledged across every trade topic."""
        return sum(n for t, n in self.published.items() if t.endswith(".trades"))

    @property
    def first_event_time(self) -> datetime | None:
        """:attr:`first_event_ts` as an aware UTC datetime."""
        return None if self.first_event_ts is None else from_ms(self.first_event_ts)

    @property
    def last_event_time(self) -> datetime | None:
        """:attr:`last_event_ts` as an aware UTC datetime."""
        return None if self.last_event_ts is None else from_ms(self.last_event_ts)

    def summary(self) -> str:
        """One human-readable paragraph: totals, per-topic counts, event-time span, rate."""
        rate = self.quotes / self.elapsed_s if self.elapsed_s > 0 else 0.0
        lines = [
            f"published {self.quotes} quotes and {self.deadletters} dead letters "
            f"in {self.elapsed_s:.2f} s ({rate:,.0f} quotes/s)"
        ]
        lines += [f"  {topic}: {n}" for topic, n in sorted(self.published.items())]
        if self.first_event_time and self.last_event_time:
            lines.append(
                f"  event time {self.first_event_time.isoformat()} .. "
                f"{self.last_event_time.isoformat()}"
            )
        return "\n".join(lines)
