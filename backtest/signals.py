"""Signals: the stream's own opportunity records, and its recommended thresholds.

A signal is one final ``opportunity`` record of the stream (:data:`arbstream.records.
OPPORTUNITY_FIELDS`): a pair's snapshot whose net spread exceeded ``ARB_MIN_NET`` in the
window ending ``window_end``, with the legs' quotes, fees, conversion leg, size
(``size_base``) and ``expected_profit`` the stream computed. Read from the lake (every final
version; retracted ones are dropped: the stream withdrew them) or from MongoDB
``opportunities`` (:func:`from_mongo`; the stream deletes retracted ones there).

Thresholds: the stream recommends, per pair and UTC hour, the p50 / p75 / p95 of the
windows' ``net_bps`` (``percentiles`` records, MongoDB ``thresholds``; ``spark_jobs.
tracker.percentile_record``: numpy linear interpolation over every final window of the
hour). :func:`hourly_thresholds` recomputes them from the lake's ``spread`` records with the
same definition. A bot trading at hour ``h`` uses the recommendation of the last complete
hour before ``h`` (no look-ahead).
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd

from arbstream.records import OPPORTUNITY_FIELDS
from arbstream.store import lake
from arbstream.store.config import MongoConfig
from arbstream.store.lake import LakeConfig
from arbstream.store.mongo.opportunities import find_opportunities

HOUR_MS = 3_600_000
#: The threshold levels a bot can use, and the percentile each is.
LEVELS = {"p50": 50.0, "p75": 75.0, "p95": 95.0}
PAIR_COLUMNS = ["symbol", "sell_symbol", "buy_exchange", "sell_exchange"]


def _ms(series: pd.Series) -> pd.Series:
    return series.astype("datetime64[us, UTC]").astype("int64") // 1000


def _pairs(frame: pd.DataFrame) -> pd.Series:
    """``symbol|sell_symbol|buy_exchange|sell_exchange`` of every row."""
    if frame.empty:
        return pd.Series([], index=frame.index, dtype=object)
    return frame[PAIR_COLUMNS].astype(str).agg("|".join, axis=1)


def prepare(frame: pd.DataFrame) -> pd.DataFrame:
    """Opportunity records as signals: final versions only (the last one per id), sorted by
    ``window_end`` then id, with ``t_ms`` (window end, UTC ms) and ``pair`` added.

    Raises:
        ValueError: a missing opportunity field.
    """
    missing = set(OPPORTUNITY_FIELDS) - set(frame.columns)
    if missing:
        raise ValueError(f"opportunity records lack fields {sorted(missing)}")
    out = frame[frame["stage"] == "final"].copy()
    out = out.sort_values(["emitted_ts"], kind="stable").drop_duplicates(
        "opportunity_id", keep="last")
    out["t_ms"] = _ms(out["window_end"])
    out["pair"] = _pairs(out)
    return out.sort_values(["t_ms", "opportunity_id"], kind="stable").reset_index(drop=True)


def from_lake(cfg: LakeConfig, since: datetime | None = None,
              until: datetime | None = None) -> pd.DataFrame:
    """The signals of ``[since, until)`` from the lake (see :func:`prepare`).

    Raises:
        OSError, pyarrow.ArrowInvalid: a lake file cannot be read.
    """
    with lake.locked(cfg):
        table = lake.latest(lake.read(cfg, "opportunity", since, until), "opportunity")
    return prepare(table.to_pandas())


def from_mongo(conf: MongoConfig, since: datetime | None = None,
               until: datetime | None = None) -> pd.DataFrame:
    """The signals of ``[since, until)`` from MongoDB ``opportunities`` (the stream's live
    documents; early versions and expired documents are not signals, see :func:`prepare`).

    Raises:
        ValueError: documents without the opportunity fields (an older stream).
        pymongo.errors.PyMongoError: connection or server errors.
    """
    docs = find_opportunities(conf, since=since, until=until)
    frame = pd.DataFrame(docs, columns=list(OPPORTUNITY_FIELDS) if not docs else None)
    for name in ("window_start", "window_end", "buy_ts", "sell_ts", "valid_from", "valid_to"):
        if name in frame:
            frame[name] = pd.to_datetime(frame[name], utc=True)
    return prepare(frame)


def hourly_thresholds(spreads: pd.DataFrame) -> pd.DataFrame:
    """Per pair and UTC hour, the p50/p75/p95 of ``net_bps`` over the hour's final windows
    (the stream's recommended thresholds, bps), and ``valid_from_ms`` = the hour's end, when
    a live user would first see them.

    Args:
        spreads: ``spread`` records (at least the pair columns, ``window_end``,
            ``net_bps``). A window belongs to the hour of its interval ``(end - W, end]``,
            approximated here as the hour of ``window_end - 1 ms``.

    Returns:
        Columns ``pair``, ``hour_ms``, ``valid_from_ms``, ``count``, ``p50``, ``p75``, ``p95``.
    """
    if spreads.empty:
        return pd.DataFrame(columns=["pair", "hour_ms", "valid_from_ms", "count", *LEVELS])
    s = spreads.assign(
        pair=_pairs(spreads),
        hour_ms=(_ms(spreads["window_end"]) - 1) // HOUR_MS * HOUR_MS)
    rows = []
    for (pair, hour), g in s.groupby(["pair", "hour_ms"], sort=True):
        values = g["net_bps"].to_numpy(np.float64)
        row = {"pair": pair, "hour_ms": int(hour), "valid_from_ms": int(hour) + HOUR_MS,
               "count": len(values)}
        row.update({k: float(np.percentile(values, q)) for k, q in LEVELS.items()})
        rows.append(row)
    return pd.DataFrame(rows)


def spreads_from_lake(cfg: LakeConfig, since: datetime | None = None,
                      until: datetime | None = None) -> pd.DataFrame:
    """The lake's ``spread`` records of ``[since, until)``, the columns thresholds need."""
    with lake.locked(cfg):
        table = lake.read(cfg, "spread", since, until)
    return table.select([*PAIR_COLUMNS, "window_end", "net_bps"]).to_pandas()

