"""The alert worker's event model: the ``arb.opportunities`` events of
:mod:`arbstream.schemas`, stricter where the worker needs it and ready for staged output.

* **No control characters.** Event strings end up in e-mail headers (the alert key, the
  subject), MongoDB ``_id`` s and log lines. A string field holding a control character
  (``\\r``, ``\\n``, NUL, ESC ...; Unicode category ``Cc``), a format character (bidi
  overrides, zero-width characters; ``Cf``), a line or paragraph separator (``Zl``, ``Zp``) or
  a lone surrogate (``Cs``, not encodable as UTF-8 or BSON) makes the event invalid, with the
  field, the code point and its position in the reason (never the value itself). The worker
  dead-letters it like any invalid event.
* **Stages** (opportunity events only): ``stage`` is ``early`` (emitted as soon as the quote
  that opens the window arrives; may still change), ``final`` (the window closed by event time;
  replaces the early version) or ``retracted`` (an early window that turned out not to be an
  opportunity once every allowed-late quote arrived). Absent (events of older stream versions):
  ``final``. ``emitted_ts`` is when the stream emitted that version, UTC ms (optional).
  Episode events (``type`` ``episode``) are unchanged.

The models subclass :class:`~arbstream.schemas.OpportunityEvent` and
:class:`~arbstream.schemas.EpisodeEvent`, so everything typed with those accepts them.
"""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, ValidationInfo, field_validator

from arbstream.schemas import (
    EpisodeEvent,
    OpportunityEvent,
    PairSignal,
    json_object,
    validation_reason,
)

Stage = Literal["early", "final", "retracted"]
#: Unicode categories not allowed anywhere in an event string.
FORBIDDEN_CATEGORIES = {
    "Cc": "control character", "Cf": "format character", "Cs": "lone surrogate",
    "Zl": "line separator", "Zp": "paragraph separator",
}


def forbidden_char(text: str) -> tuple[int, str, str] | None:
    """The first character of ``text`` not allowed in an event string, as ``(index, 'U+XXXX',
    what)``, or ``None``."""
    for i, ch in enumerate(text):
        what = FORBIDDEN_CATEGORIES.get(unicodedata.category(ch))
        if what is not None:
            return i, f"U+{ord(ch):04X}", what
    return None


def printable(text: str) -> str:
    """``text`` with every forbidden character escaped (``\\r``, ``\\x00``, ``\\u2028`` ...),
    for one log line."""
    if forbidden_char(text) is None:
        return text
    return "".join(ch.encode("unicode_escape", "backslashreplace").decode("ascii")
                   if unicodedata.category(ch) in FORBIDDEN_CATEGORIES else ch for ch in text)


def _no_control_characters(value: Any, info: ValidationInfo) -> Any:
    if isinstance(value, str):
        bad = forbidden_char(value)
        if bad is not None:
            index, code, what = bad
            raise ValueError(f"{info.field_name} contains a {what} ({code}) at index {index}; "
                             f"not allowed in ids, e-mail headers or log lines")
    return value


def _checked_fields(model: type[BaseModel], *more: str) -> tuple[str, ...]:
    """Every field of ``model`` and ``more`` but the discriminator ``type`` (a ``Literal``,
    and pydantic allows no before-validator on it)."""
    return tuple(dict.fromkeys(n for n in (*model.model_fields, *more) if n != "type"))


class AlertOpportunityEvent(OpportunityEvent):
    """An opportunity event as the worker accepts it (see the module docstring)."""

    stage: Stage = Field("final", description="early, final or retracted; absent: final")
    emitted_ts: int | None = Field(None, gt=0, strict=True,
                                   description="when the stream emitted this version, UTC ms")

    _text = field_validator(*_checked_fields(OpportunityEvent, "stage"),
                            mode="before")(_no_control_characters)


class AlertEpisodeEvent(EpisodeEvent):
    """An episode event as the worker accepts it: unchanged but for control characters."""

    _text = field_validator(*_checked_fields(EpisodeEvent), mode="before")(
        _no_control_characters)


class AlertPairSignal(PairSignal):
    """A ``pair_signal`` event of the pairs job (``ARB_PAIRS_TOPIC``) as the worker accepts
    it: unchanged but for control characters (:mod:`alerts.pair_alerts`)."""

    _text = field_validator(*_checked_fields(PairSignal), mode="before")(
        _no_control_characters)


AlertEvent = Annotated[AlertOpportunityEvent | AlertEpisodeEvent | AlertPairSignal,
                       Field(discriminator="type")]
_ALERT_EVENT: TypeAdapter[AlertOpportunityEvent | AlertEpisodeEvent | AlertPairSignal] = (
    TypeAdapter(AlertEvent))


def parse_event(raw: bytes | str) -> AlertOpportunityEvent | AlertEpisodeEvent | AlertPairSignal:
    """Parse one ``arb.opportunities`` record value (as
    :func:`arbstream.schemas.parse_arb_event`, with the rules of the module docstring), or a
    ``pair_signal`` event of ``ARB_PAIRS_TOPIC``.

    Raises:
        ValueError: malformed JSON or not UTF-8, not an object, an unknown ``type``, or the
            validation failures in one message (field named, offending value never quoted).
    """
    obj = json_object(raw)
    try:
        return _ALERT_EVENT.validate_python(obj)
    except ValidationError as exc:  # an unknown key is quoted in the reason: escaped
        raise ValueError(printable(validation_reason(exc))) from None


def stage_of(event: OpportunityEvent | EpisodeEvent | PairSignal
             ) -> Literal["early", "final", "retracted"]:
    """The stage of an opportunity event (``final`` for a plain
    :class:`~arbstream.schemas.OpportunityEvent`); episode events are ``final``."""
    return getattr(event, "stage", "final")
