"""Privacy primitives: keyed identifier tokens and the Laplace mechanism of DP releases.

**Identifier tokens.** An identifier (a trade id, an order id, an e-mail address...) leaves
the platform only as ``h1:`` + the hex HMAC-SHA256 of its UTF-8 text under the key
``ARB_ID_HASH_KEY`` (RFC 2104, FIPS 198-1; :func:`token`). The same id under the same key is
the same token, so exports stay joinable with each other; without the key a token cannot be
reversed or recomputed (a plain hash of a guessable id could be). :func:`tokenize_rows`
tokenizes the :data:`IDENTIFIER_FIELDS` of export rows (and every e-mail address in their
text) and refuses (:class:`IdHashKeyMissing`) an export holding identifiers when no key is
configured: an export never falls back to raw ids or to a silent per-run key.

**Laplace mechanism.** :func:`laplace_mechanism` is OpenDP's ``make_laplace`` over floats:
``x + Laplace(0, Δ/ε)`` noise, which is ε-differentially private for a query of L1
sensitivity Δ (Dwork, McSherry, Nissim, Smith 2006, "Calibrating noise to sensitivity in
private data analysis"). OpenDP samples on a fine 2^k grid from the OS's secure generator
(immune to the floating-point attack of Mironov 2012, "On significance of the least
significant bits for differential privacy"); it cannot be seeded, by design. The budget
accounting of releases is :mod:`arbstream.store.mongo.privacy_budget`; docs/privacy.md says
what this protects and what it does not.
"""

from __future__ import annotations

import hashlib
import hmac
import numbers
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import SecretStr

#: Prefix of every token (version 1: HMAC-SHA256, full 64 hex digits).
TOKEN_PREFIX = "h1:"
TOKEN_RE = re.compile(r"^h1:[0-9a-f]{64}$")
#: Shortest accepted key, bytes of its UTF-8 text (the SHA-256 output size, RFC 2104 §3).
MIN_KEY_BYTES = 32
#: Fields holding identifiers, wherever they occur in an export row (nested too).
IDENTIFIER_FIELDS = frozenset({
    "trade_id", "order_id", "client_order_id", "account_id", "user_id", "recipient",
    "recipients", "email",
})
#: An e-mail address inside free text (SMTP errors quote the refused recipients).
EMAIL_IN_TEXT = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}")
REDACTED = "redacted"


class IdHashKeyMissing(ValueError):  # noqa: N818 (an error, named for what is missing)
    """An export holds identifiers and no ``ARB_ID_HASH_KEY`` is configured."""


def key_bytes(key: SecretStr | bytes) -> bytes:
    """The raw HMAC key of ``key`` (a ``SecretStr``'s UTF-8 text, or bytes).

    Raises:
        ValueError: shorter than :data:`MIN_KEY_BYTES` (the key itself is never in the
            message).
        TypeError: neither ``SecretStr`` nor bytes.
    """
    if isinstance(key, SecretStr):
        raw = key.get_secret_value().encode("utf-8")
    elif isinstance(key, bytes):
        raw = key
    else:
        raise TypeError(f"the id hash key must be SecretStr or bytes, got {type(key).__name__}")
    if len(raw) < MIN_KEY_BYTES:
        raise ValueError(f"the id hash key must be at least {MIN_KEY_BYTES} bytes, got "
                         f"{len(raw)} (generate one: python -c 'import secrets; "
                         "print(secrets.token_hex(32))')")
    return raw


def token(value: str | int, key: SecretStr | bytes) -> str:
    """``h1:`` + hex HMAC-SHA256 of ``value`` (UTF-8; an integer, numpy's too, as its
    decimal text) under ``key``: 67 characters.

    Raises:
        TypeError: ``value`` is not a str or integer (a bool neither), or ``key`` is
            invalid.
        ValueError: ``value`` is empty, or the key is too short (:func:`key_bytes`).
    """
    if isinstance(value, bool) or not isinstance(value, str | numbers.Integral):
        raise TypeError(f"an identifier is a str or int, got {type(value).__name__}")
    text = value if isinstance(value, str) else str(int(value))
    if not text:
        raise ValueError("an empty identifier cannot be tokenized")
    digest = hmac.new(key_bytes(key), text.encode("utf-8"), hashlib.sha256).hexdigest()
    return TOKEN_PREFIX + digest


def _protect(value: Any, key: SecretStr | bytes | None, redact: bool, is_id: bool) -> Any:
    """``value`` with identifiers replaced (see :func:`tokenize_rows`)."""
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {k: _protect(v, key, redact, k in IDENTIFIER_FIELDS) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_protect(v, key, redact, is_id) for v in value]
    if is_id:
        if isinstance(value, str) and TOKEN_RE.match(value):
            return value  # already a token
        if key is None:
            if redact:
                return REDACTED
            raise IdHashKeyMissing(
                "this export holds identifiers (trade ids, e-mail addresses...), which leave "
                "the platform only as HMAC tokens: set ARB_ID_HASH_KEY (or "
                "ARB_ID_HASH_KEY_FILE), see docs/privacy.md")
        return token(value, key)
    if isinstance(value, str) and EMAIL_IN_TEXT.search(value):
        return EMAIL_IN_TEXT.sub(lambda m: _protect(m.group(0), key, redact, True), value)
    return value


def tokenize_rows(rows: Iterable[Mapping[str, Any]], key: SecretStr | bytes | None, *,
                  redact: bool = False) -> list[dict[str, Any]]:
    """Copies of export ``rows`` in which no raw identifier is left.

    Every value under a key of :data:`IDENTIFIER_FIELDS`, at any depth (a str or int, or a
    list of them), becomes its :func:`token`; every e-mail address inside any other string
    (error messages) is replaced by its token in place; ``None`` stays ``None``; a value
    that already is a token is kept. Other values are unchanged.

    Args:
        rows: the rows (mappings; nested mappings and lists are walked).
        key: ``Settings.id_hash_key``; ``None``: see ``redact``.
        redact: without a key, replace identifiers by ``"redacted"`` instead of refusing
            (interactive views only; file exports refuse).

    Raises:
        IdHashKeyMissing: ``key`` is None, ``redact`` is False and a row holds an
            identifier (rows without identifiers pass without a key).
        TypeError, ValueError: as :func:`token` (an identifier of another type, an empty
            one, a short key).
    """
    return [_protect(dict(row), key, redact, False) for row in rows]


@dataclass(frozen=True)
class LaplaceNoise:
    """A configured Laplace mechanism: ``sensitivity`` Δ (L1, in the query's unit),
    ``epsilon`` ε, ``scale`` = Δ/ε (the noise's standard deviation is √2·scale), ``measurement``
    (the OpenDP ``Measurement`` on floats; call it with the true value)."""

    sensitivity: float
    epsilon: float
    scale: float
    measurement: Any

    def __call__(self, true_value: float) -> float:
        """``true_value`` plus one fresh Laplace(0, scale) draw."""
        return float(self.measurement(float(true_value)))


def laplace_mechanism(sensitivity: float, epsilon: float) -> LaplaceNoise:
    """OpenDP's Laplace mechanism of scale Δ/ε on an absolute-distance float space.

    Its privacy loss is checked with OpenDP's own map (``measurement.map(Δ) <= ε``).

    Raises:
        ValueError: ``sensitivity`` or ``epsilon`` not finite and > 0, or OpenDP's map
            exceeds ``epsilon``.
    """
    import math

    import opendp.prelude as dp

    for name, v in (("sensitivity", sensitivity), ("epsilon", epsilon)):
        if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    dp.enable_features("contrib")
    scale = float(sensitivity) / float(epsilon)
    space = dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float)
    meas = dp.m.make_laplace(*space, scale=scale)
    loss = meas.map(float(sensitivity))
    if loss > float(epsilon) * (1 + 1e-9):
        raise ValueError(f"OpenDP's privacy loss {loss} exceeds epsilon {epsilon}")
    return LaplaceNoise(float(sensitivity), float(epsilon), scale, meas)
