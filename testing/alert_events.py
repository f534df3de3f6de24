"""Opportunity and episode events as the stream job publishes them, built without Spark.

Real IAQF bars → :func:`tests.reference.reference_spreads` (the independent pandas spread
implementation, bit-identical to Spark's) → the real tracker functions
(:func:`spark_jobs.tracker.track_pair`) → :func:`event_json`, which writes a record exactly as
``spark_jobs.arbitrage._events`` does with Spark's ``to_json`` (``schema_version`` and
``type`` first, then the record's columns in order, nulls left out, timestamps ISO-8601 UTC
ms). ``tests/alerts/test_alerts.py::test_events_contract`` checks both claims against the real
``_events`` on Spark.
"""

from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from arbstream.config import Settings
from arbstream.schemas import SCHEMA_VERSION
from producers.replay.iaqf import load_iaqf_quotes
from spark_jobs import tracker
from testing.reference import reference_opportunities, reference_spreads

EVENT_TYPE = {"spread": "opportunity", "episode": "episode"}
KEY_FIELD = {"spread": "opportunity_id", "episode": "episode_id"}


def _plain(value: Any) -> Any:
    """A record value as Spark's ``to_json`` writes it (``None`` = left out)."""
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, datetime | pd.Timestamp):
        ts = pd.Timestamp(value)
        ts = ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")
        return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    return value


def event_dict(record: dict[str, Any]) -> dict[str, Any]:
    """The parsed JSON of the ``arb.opportunities`` value of a tracker record (``record`` =
    ``spread`` with ``is_opportunity``, or ``episode``)."""
    kind = record["record"]
    out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "type": EVENT_TYPE[kind]}
    names = [*tracker.RECORD_FIELDS[kind]]
    if kind == "spread":
        names += ["valid_from", "valid_to", "windows"]
    for name in names:
        value = _plain(record.get(name))
        if value is not None:
            out[name] = value
    return out


def event_message(record: dict[str, Any]) -> tuple[bytes, bytes]:
    """``(key, value)`` of the Kafka record the stream job publishes for ``record``."""
    kind = record["record"]
    value = json.dumps(event_dict(record), separators=(",", ":"))
    return record[KEY_FIELD[kind]].encode(), value.encode()


def iaqf_quotes(data_dir: Path, start: datetime, end: datetime) -> pd.DataFrame:
    """IAQF bars in ``[start, end)`` as quotes, as ``arbstream replay iaqf`` publishes them."""
    bars = load_iaqf_quotes(data_dir, start, end)
    bars["received_ts"] = bars["exchange_ts"]
    bars["dedupe_key"] = bars["exchange"] + ":" + bars["symbol"] + ":" + bars[
        "exchange_ts"].astype(str)
    return bars


def tracker_records(
    spread_rows: list[dict[str, Any]], settings: Settings,
    runs: dict[str, dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The real tracker over spread rows, one pair at a time, every episode closed at the end:
    the opportunity ``spread`` records and the ``episode`` records, in the tracker's order.

    With ``runs`` (:func:`reference_runs`), an opportunity is published once for its run of
    windows with one snapshot: only the record of a run's first window is kept, with the run's
    ``valid_from``, ``valid_to`` and ``windows``."""
    cfg = tracker.TrackerConfig.of(settings)
    by_pair: dict[str, list[dict[str, Any]]] = {}
    for row in spread_rows:
        by_pair.setdefault(tracker.pair_key(row), []).append(row)
    out: list[dict[str, Any]] = []
    for key in sorted(by_pair):
        _, records, _ = tracker.track_pair(None, by_pair[key], 10**15, cfg)
        for r in records:
            if r["record"] == "episode":
                out.append(r)
            elif r["record"] == "spread" and r["is_opportunity"]:
                if runs is None:
                    out.append(r)
                elif r["opportunity_id"] in runs:
                    out.append({**r, **runs[r["opportunity_id"]]})
    return out


def reference_runs(quotes: pd.DataFrame, settings: Settings) -> dict[str, dict[str, Any]]:
    """``valid_from``, ``valid_to`` and ``windows`` of every opportunity of
    :func:`reference_opportunities` (one per run of windows with one snapshot), by id."""
    frame = reference_opportunities(
        quotes, settings.taker_fees, settings.window_seconds, settings.max_quote_age_seconds,
        settings.min_net, (settings.slippage_bps + settings.latency_haircut_bps) / 10_000.0,
        settings.notional_usd)
    return {r["opportunity_id"]: {"valid_from": r["valid_from"], "valid_to": r["valid_to"],
                                  "windows": int(r["windows"])} for r in frame.to_dict("records")}


def reference_rows(quotes: pd.DataFrame, settings: Settings) -> list[dict[str, Any]]:
    """Spread rows of :func:`reference_spreads` with the pair columns the stream job adds for
    sizeless quotes (``size_source`` notional, ``profit_currency`` the buy quote currency)."""
    frame = reference_spreads(
        quotes, settings.taker_fees, settings.window_seconds, settings.max_quote_age_seconds,
        (settings.slippage_bps + settings.latency_haircut_bps) / 10_000.0, settings.notional_usd,
    )
    frame["buy_ask_size"] = None
    frame["sell_bid_size"] = None
    frame["size_source"] = "notional"
    frame["profit_currency"] = frame["symbol"].str.split("-").str[1]
    rows = frame.to_dict("records")
    for row in rows:
        for k, v in row.items():
            if isinstance(v, float) and math.isnan(v):
                row[k] = None
    return rows


def iaqf_events(
    data_dir: Path, start: datetime, end: datetime, settings: Settings
) -> list[tuple[bytes, bytes]]:
    """Every ``arb.opportunities`` record (key, value) the stream job publishes for the IAQF
    bars in ``[start, end)``, episodes closed at the end."""
    quotes = iaqf_quotes(data_dir, start, end)
    return [event_message(r) for r in tracker_records(
        reference_rows(quotes, settings), settings, reference_runs(quotes, settings))]
