"""Keeping secrets out of text that leaves the process (error strings stored in InfluxDB,
status panels): every secret value of the configuration, and the credentials of any URL, are
replaced by ``***``."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from pydantic import SecretStr

if TYPE_CHECKING:
    from arbstream.config import Settings

MASK = "***"
#: ``scheme://user:password@`` (or ``scheme://token@``) in a URL: the credentials part.
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")


def secret_values(settings: Settings | Any) -> list[str]:
    """The text of every :class:`~pydantic.SecretStr` of ``settings`` (a
    :class:`~arbstream.config.Settings`, or any object with secret attributes such as a store
    config), including secret values inside dict settings (``kafka_config``); longest first,
    empty ones left out."""
    found: list[str] = []

    def take(value: Any) -> None:
        if isinstance(value, SecretStr):
            found.append(value.get_secret_value())
        elif isinstance(value, dict):
            for item in value.values():
                take(item)

    names = getattr(type(settings), "model_fields", None) or vars(settings)
    for name in names:
        take(getattr(settings, name, None))
    return sorted({s for s in found if s}, key=len, reverse=True)


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every occurrence of each of ``secrets`` and the credentials of every URL
    (``scheme://user:password@host`` -> ``scheme://***@host``) replaced by ``***``."""
    for secret in sorted(set(secrets), key=len, reverse=True):
        if secret:
            text = text.replace(secret, MASK)
    return _URL_CREDENTIALS.sub(rf"\g<scheme>{MASK}@", text)


def first_line(text: str, secrets: Iterable[str] = (), limit: int = 500) -> str:
    """The first non-empty line of :func:`redact` of ``text``, at most ``limit``
    characters (``""`` for blank text). Redacted before it is cut, so a secret spanning the
    cut is never half kept."""
    for line in redact(text, secrets).splitlines():
        if line.strip():
            return line.strip()[:limit]
    return ""
