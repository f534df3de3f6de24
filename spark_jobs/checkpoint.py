"""Streaming checkpoints that belong to the configuration they were written with.

A Structured Streaming checkpoint holds the source offsets and the operators' state (dedupe
keys, open snapshot windows). Both only make sense under the settings that produced them:
restarting with another window width, watermark, fee table, exchange set or shuffle-partition
count would silently combine old state with new semantics (Spark checks state *schemas*, not
what the columns mean). So the job records a fingerprint of every setting that changes the
meaning of the state or of the output ids in ``<checkpoint root>/arbstream-checkpoint.json``
when the checkpoint is new, and refuses to start on a checkpoint whose fingerprint differs.

Settings that are safe to change between restarts (``trigger_seconds``,
``max_offsets_per_trigger``, ``starting_offsets``, sink URLs and databases, credentials,
retention, producers' settings) are not part of the fingerprint.

:func:`raise_if_incompatible` and :func:`check_queries` turn Spark's own state-incompatibility
failures (``STATE_STORE_*_SCHEMA_NOT_COMPATIBLE`` and friends) into the same
:class:`IncompatibleCheckpointError`, with the query name and its checkpoint path.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from arbstream.config import Settings
from arbstream.schemas import SCHEMA_VERSION

#: Bump whenever the job's queries change shape in a way an old checkpoint cannot follow:
#: a stateful operator added, removed or reordered, a query's source topics or grouping keys
#: changed, or the meaning of an output id changed.
JOB_LAYOUT_VERSION = 1
FINGERPRINT_FILE = "arbstream-checkpoint.json"
FORMAT_VERSION = 1

#: Spark error conditions (and legacy messages) that mean "this state was written by a query of
#: another shape": never transient, never fixed by retrying.
SPARK_STATE_ERRORS = (
    "STATE_STORE_KEY_SCHEMA_NOT_COMPATIBLE",
    "STATE_STORE_VALUE_SCHEMA_NOT_COMPATIBLE",
    "STATE_STORE_COLUMN_FAMILY_SCHEMA_INCOMPATIBLE",
    "STATE_STORE_INVALID_VALUE_SCHEMA_EVOLUTION",
    "STATE_STORE_INVALID_CONFIG_AFTER_RESTART",
    "STREAMING_STATEFUL_OPERATOR_NOT_MATCH_IN_STATE_METADATA",
    "STREAMING_STATEFUL_OPERATOR_MISSING_STATE_DIRECTORY",
    "StateSchemaNotCompatible",
)
_SPARK_STATE_RE = re.compile(
    "|".join(re.escape(c) for c in SPARK_STATE_ERRORS)
    + r"|Provided (?:key |value )?schema (?:doesn't|does not) match"
)


class IncompatibleCheckpointError(RuntimeError):
    """A streaming checkpoint cannot be reused with the current configuration.

    ``checkpoint`` is the offending directory; ``differences`` maps each differing
    fingerprint setting to ``(old, new)`` (empty when the cause is not a setting, e.g. unknown
    provenance or a Spark state-schema error).
    """

    def __init__(
        self,
        message: str,
        checkpoint: Path,
        differences: dict[str, tuple[Any, Any]] | None = None,
    ) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint
        self.differences = differences or {}


def fingerprint(settings: Settings) -> dict[str, Any]:
    """The settings that give a checkpoint its meaning, as plain JSON values.

    Durations are seconds, fees and ``min_net`` fractions, haircuts basis points, notional USD.
    Exchanges and USD-like quotes are sorted (their order does not matter); fees are those of
    the configured exchanges only (no other exchange's records reach the job).
    """
    exchanges = sorted(settings.exchanges)
    fees = settings.taker_fees
    values = {
        "job_layout_version": JOB_LAYOUT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "exchanges": exchanges,
        "taker_fees": {e: fees[e] for e in exchanges},
        "window_seconds": settings.window_seconds,
        "max_quote_age_seconds": settings.max_quote_age_seconds,
        "watermark_seconds": settings.watermark_seconds,
        "min_net": settings.min_net,
        "slippage_bps": settings.slippage_bps,
        "latency_haircut_bps": settings.latency_haircut_bps,
        "notional_usd": settings.notional_usd,
        "usd_quotes": sorted(settings.usd_quotes),
        "episode_gap_seconds": settings.episode_gap_seconds,
        "stats_horizon_seconds": settings.stats_horizon_seconds,
        "anomaly_sigma": settings.anomaly_sigma,
        "health_interval_seconds": settings.health_interval_seconds,  # staleness timeout
        "spark_shuffle_partitions": settings.spark_shuffle_partitions,
    }
    return json.loads(json.dumps(values))  # exactly what a round trip through the file gives


def has_state(root: Path) -> bool:
    """Whether ``root`` holds any file besides the fingerprint and its temporary copies
    (empty directories don't count)."""
    if not root.is_dir():
        return False
    return any(
        p.is_file() and not p.name.lstrip(".").startswith(FINGERPRINT_FILE)
        for p in root.rglob("*")
    )


def record(settings: Settings, root: Path) -> Path:
    """Write ``settings``' fingerprint to ``root/arbstream-checkpoint.json`` (atomically,
    creating ``root``), replacing any previous one.

    Use it directly only to adopt a checkpoint known to match the current settings.

    Returns:
        The fingerprint file's path.

    Raises:
        OSError: ``root`` cannot be created or written.
    """
    root.mkdir(parents=True, exist_ok=True)
    path = root / FINGERPRINT_FILE
    doc = {
        "format": FORMAT_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "settings": fingerprint(settings),
    }
    tmp = path.with_name(f".{FINGERPRINT_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def _how_to_proceed(root: Path, settings: Settings, restore: bool = False) -> str:
    return (
        "To proceed, either\n"
        + ("  * restore the old values above, or\n" if restore else "")
        + f"  * keep the old checkpoint and start a new one: point ARB_STATE_DIR at a new "
        f"directory (checkpoints live in ARB_STATE_DIR/checkpoints) or pass another checkpoint "
        f"path; the new one starts from ARB_STARTING_OFFSETS "
        f"(now {settings.starting_offsets!r}), or\n"
        f"  * delete {root} and restart with ARB_STARTING_OFFSETS=earliest to reprocess what "
        f"Kafka still retains. The sinks are idempotent (deterministic MongoDB ids, InfluxDB "
        f"points overwritten per series and time), so reprocessing rewrites instead of "
        f"duplicating; results computed under the old settings stay in MongoDB and InfluxDB "
        f"unless you drop them."
    )


_MISSING = object()


def _show(value: Any) -> str:
    return "(not recorded)" if value is _MISSING else json.dumps(value, sort_keys=True)


def verify(settings: Settings, root: Path) -> None:
    """Check that the checkpoint under ``root`` was written with ``settings``; record the
    fingerprint when the checkpoint is new. Call before any streaming query starts.

    New means ``root`` is missing or holds no files (empty query directories are fine).

    Raises:
        IncompatibleCheckpointError: the recorded fingerprint differs (the message lists each
            differing setting as ``old → new`` and how to proceed); or ``root`` holds Spark
            state but no fingerprint file (unknown provenance, e.g. written by an older
            arbstream); or the fingerprint file is unreadable.
        OSError: the fingerprint cannot be written.
    """
    root = Path(root)
    path = root / FINGERPRINT_FILE
    if not path.exists():
        if has_state(root):
            raise IncompatibleCheckpointError(
                f"checkpoint {root} holds Spark state but no {FINGERPRINT_FILE}: it was "
                "written by an older arbstream or another program, so the settings its state "
                "was computed with are unknown (provenance unknown).\n"
                + _how_to_proceed(root, settings)
                + f"\nIf you know it was written with the current settings, adopt it with "
                f"`python -c \"from arbstream.config import get_settings; from pathlib import "
                f"Path; from spark_jobs.checkpoint import record; "
                f"record(get_settings(), Path('{root}'))\"`.",
                root,
            )
        record(settings, root)
        return
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))["settings"]
        if not isinstance(stored, dict):
            raise TypeError("'settings' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IncompatibleCheckpointError(
            f"checkpoint fingerprint {path} is unreadable ({exc}); cannot tell which settings "
            f"checkpoint {root} was written with.\n" + _how_to_proceed(root, settings),
            root,
        ) from exc
    current = fingerprint(settings)
    differences = {
        name: (stored.get(name, _MISSING), current.get(name, _MISSING))
        for name in sorted(set(stored) | set(current))
        if stored.get(name, _MISSING) != current.get(name, _MISSING)
    }
    if differences:
        lines = "\n".join(
            f"  {name}: {_show(old)} → {_show(new)}" for name, (old, new) in differences.items()
        )
        raise IncompatibleCheckpointError(
            f"checkpoint {root} was written with different settings; its offsets and state "
            f"would be misread under the current ones:\n{lines}\n"
            + _how_to_proceed(root, settings, restore=True),
            root,
            {k: (None if o is _MISSING else o, None if n is _MISSING else n)
             for k, (o, n) in differences.items()},
        )


def _texts(exc: BaseException) -> Iterable[str]:
    """Message, Spark error condition and JVM stack text of ``exc`` and its causes."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield str(current)
        getters = ("getCondition", "getMessage") if hasattr(current, "getCondition") else (
            "getErrorClass", "getMessage")  # getErrorClass is deprecated where both exist
        for getter in getters:
            method = getattr(current, getter, None)
            if callable(method):
                try:
                    value = method()
                except Exception:  # a dead JVM must not hide the original error
                    value = None
                if value:
                    yield str(value)
        current = current.__cause__ or current.__context__


def is_state_incompatibility(exc: BaseException) -> bool:
    """Whether ``exc`` (e.g. a ``StreamingQueryException``) is Spark refusing a checkpoint's
    state as written by a query of another shape (:data:`SPARK_STATE_ERRORS`)."""
    return any(_SPARK_STATE_RE.search(text) for text in _texts(exc))


def raise_if_incompatible(exc: BaseException, query: str, checkpoint: Path) -> None:
    """Re-raise a Spark state-incompatibility failure of ``query`` as
    :class:`IncompatibleCheckpointError` (chained to ``exc``); return for any other error.

    Args:
        exc: the query's failure, e.g. ``query.exception()``.
        query: the query's name.
        checkpoint: that query's checkpoint directory (``<root>/<query>``).

    Raises:
        IncompatibleCheckpointError: ``exc`` is a state incompatibility.
    """
    if not is_state_incompatibility(exc):
        return
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    raise IncompatibleCheckpointError(
        f"query {query!r} cannot use its checkpoint {checkpoint}: Spark reports that the "
        f"stored state was written by a query of another shape ({first[:500]}). The job "
        f"changed incompatibly since that checkpoint was written (it should have bumped "
        f"spark_jobs.checkpoint.JOB_LAYOUT_VERSION).\n"
        "To proceed, either run the arbstream version that wrote it, or\n"
        "  * start a new checkpoint: point ARB_STATE_DIR at a new directory (checkpoints live "
        "in ARB_STATE_DIR/checkpoints) or pass another checkpoint path; it starts from "
        "ARB_STARTING_OFFSETS, or\n"
        f"  * delete {checkpoint.parent} and restart with ARB_STARTING_OFFSETS=earliest to "
        "reprocess what Kafka still retains; the sinks are idempotent, so this rewrites "
        "instead of duplicating.",
        checkpoint,
    ) from exc


def check_queries(queries: Iterable[Any], root: Path) -> None:
    """Raise :class:`IncompatibleCheckpointError` for the first of ``queries`` (PySpark
    ``StreamingQuery`` objects, checkpoints in ``root/<query name>`` as the job lays them out)
    that failed on an incompatible checkpoint.

    Other failures are left to the caller (typically: re-raise what it caught).

    Raises:
        IncompatibleCheckpointError: as :func:`raise_if_incompatible`.
    """
    for query in queries:
        exc = query.exception()
        if exc is not None:
            name = query.name or str(query.id)
            raise_if_incompatible(exc, name, Path(root) / name if query.name else Path(root))
