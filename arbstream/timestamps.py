"""The one place timestamps are converted: UTC throughout, integer milliseconds on the wire.

Every record carries event times as integer milliseconds since the Unix epoch (UTC); Python
code works with tz-aware UTC :class:`~datetime.datetime`. A naive datetime is taken to be UTC
already (Spark, PyMongo and pandas hand them out that way). Conversions use exact integer
arithmetic, never floats, so a millisecond is never rounded into the next one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from typing import Any

#: The Unix epoch, 1970-01-01T00:00:00Z.
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: One millisecond.
MS = timedelta(milliseconds=1)


def to_utc(value: datetime | int | float) -> datetime:
    """An aware UTC datetime of ``value``.

    Args:
        value: an aware datetime (converted to UTC), a naive one (taken to be UTC), or
            milliseconds since the epoch (int or float).

    Raises:
        TypeError: any other type (bool included).
    """
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return EPOCH + timedelta(milliseconds=value)
    raise TypeError(f"expected a datetime or epoch milliseconds, got {type(value).__name__}")


def to_ms(value: Any) -> int:
    """UTC milliseconds since the epoch, floored.

    Args:
        value: an int (already ms, returned as is), a datetime (naive means UTC; a pandas
            ``Timestamp`` is one) or a ``numpy.datetime64``.

    Raises:
        TypeError: any other type (bool included).
    """
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, datetime):
        return (to_utc(value) - EPOCH) // MS
    if type(value).__name__ == "datetime64":  # numpy, without importing it here
        return int(value.astype("datetime64[ms]").astype("int64"))
    raise TypeError(f"expected a datetime or epoch milliseconds, got {type(value).__name__}")


def from_ms(ms: int) -> datetime:
    """Aware UTC datetime of UTC milliseconds (exact: ms fit in datetime's µs)."""
    return EPOCH + timedelta(milliseconds=ms)


def iso_ms(ms: int) -> str:
    """ISO-8601 text of UTC milliseconds with exactly three decimals and ``Z``, e.g.
    ``2023-03-11T04:00:00.123Z``."""
    return from_ms(ms).strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def seconds_to_ms(ts: float | Decimal | str | int) -> int:
    """Seconds since the epoch (float, Decimal or decimal text, as exchanges send them) →
    integer ms, floored.

    Goes through the shortest decimal text of a float, so ``1633998523.963`` gives
    ``1633998523963`` and µs times are never rounded across a millisecond.

    Raises:
        decimal.InvalidOperation: text that is not a decimal number.
    """
    value = ts if isinstance(ts, Decimal) else Decimal(str(ts))
    return int(value.scaleb(3).to_integral_value(rounding=ROUND_FLOOR))


def parse_time(text: str) -> datetime:
    """Parse an ISO-8601 date or date-time; naive means UTC. Returns a tz-aware UTC datetime.

    Accepts e.g. ``2023-03-11``, ``2023-03-11T04:00``, ``2023-03-11 04:00:00Z``,
    ``2023-03-11T06:00:00+02:00``.

    Raises:
        ValueError: the text is not ISO-8601.
    """
    try:
        return to_utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise ValueError(
            f"invalid time {text!r}: expected ISO-8601 such as 2023-03-11T04:00:00Z "
            "(no offset means UTC)"
        ) from None
