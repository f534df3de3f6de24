"""A backtest run's outputs: the bot comparison, trade files, MongoDB and InfluxDB.

* :func:`comparison`: one row per bot (:func:`backtest.metrics.summarize`, capture against
  the oracle of the same execution), plus the decomposition;
* :func:`write_files`: every trade as ``trades.parquet``, ``trades.csv`` and ``trades.json``
  and the comparison as ``summary.json`` under the output directory; rows pass through
  :func:`arbstream.privacy.tokenize_rows`, so an identifier field never leaves raw (a
  backtest's rows hold none today: opportunity and episode ids are public market keys);
* :func:`store`: MongoDB ``backtests`` (one document per bot) and InfluxDB
  ``backtest_equity`` / ``backtest_trade`` / ``backtest_summary``; points InfluxDB refuses
  are returned with their reasons, never dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import SecretStr

from arbstream.privacy import tokenize_rows
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx import backtest as influx_bt
from arbstream.store.influx.schema import ensure_database
from arbstream.store.mongo.backtests import save_backtest
from arbstream.timestamps import from_ms
from backtest import metrics
from backtest.run import BotResult, all_trades


def run_id(start_ms: int, inputs: Mapping[str, Any]) -> str:
    """``bt-<UTC start, YYYYmmddTHHMMSS>-<12 hex of the sha256 of the inputs as JSON>``."""
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode())
    return f"bt-{from_ms(start_ms):%Y%m%dT%H%M%S}-{digest.hexdigest()[:12]}"


def _oracle_for(result: BotResult, results: Mapping[str, BotResult]) -> float | None:
    """The total of the oracle with the same execution model and constraint, if one ran."""
    for r in results.values():
        if r.bot.oracle and r.bot.execution == result.bot.execution and (
                r.bot.constrained == result.bot.constrained) and r.bot.kind == result.bot.kind:
            return float(r.trades["pnl_usd"].sum()) if len(r.trades) else 0.0
    return None


def comparison(results: Mapping[str, BotResult]) -> pd.DataFrame:
    """One row per bot: its metrics, decomposition (``pnl_<part>``, USD), skipped signals
    and transfers."""
    rows = []
    for name, r in results.items():
        row: dict[str, Any] = {"bot": name,
                               **metrics.summarize(r.trades, r.equity, _oracle_for(r, results))}
        row.update({f"pnl_{k}": v for k, v in r.decomposition.items()})
        row.update(skipped=sum(r.skipped.values()), transfers=r.transfers,
                   blocked_transfers=r.blocked_transfers)
        rows.append(row)
    return pd.DataFrame(rows)


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, np.generic):
        return _json_ready(value.item())
    return value


@dataclass(frozen=True)
class Files:
    """Paths of a run's exported files."""

    parquet: Path
    csv: Path
    json: Path
    summary: Path


def write_files(results: Mapping[str, BotResult], table: pd.DataFrame, out_dir: Path,
                id_key: SecretStr | None) -> Files:
    """Export the trades and the comparison ``table`` (:func:`comparison` of ``results``;
    see the module docstring).

    Raises:
        arbstream.privacy.IdHashKeyMissing: a row holds an identifier and no key is set.
        OSError: the directory cannot be written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    trades = all_trades(results.values())
    rows = tokenize_rows(trades.to_dict("records"), id_key)
    frame = pd.DataFrame(rows, columns=list(trades.columns))
    files = Files(out_dir / "trades.parquet", out_dir / "trades.csv", out_dir / "trades.json",
                  out_dir / "summary.json")
    frame.to_parquet(files.parquet, index=False)
    frame.to_csv(files.csv, index=False)
    files.json.write_text(json.dumps([{k: _json_ready(v) for k, v in r.items()} for r in rows],
                                     indent=None))
    summary = [{k: _json_ready(v) for k, v in r.items()}
               for r in table.to_dict("records")]
    files.summary.write_text(json.dumps(summary, indent=2))
    return files


def store(results: Mapping[str, BotResult], table: pd.DataFrame, run: str,
          meta: Mapping[str, Any], mongo: MongoConfig, influx: InfluxConfig) -> dict[str, Any]:
    """Write the run and its comparison ``table`` (:func:`comparison` of ``results``) to
    MongoDB ``backtests`` and InfluxDB (module docstring).

    Returns:
        ``{"documents": n, "points": n, "rejected": [(line, reason)...]}``.

    Raises:
        pymongo.errors.PyMongoError, arbstream.store.influx.client.InfluxError: the stores
            cannot be written.
    """
    ensure_database(influx)
    table = table.set_index("bot")
    docs = points = 0
    rejected: list[tuple[str, str]] = []
    for name, r in results.items():
        m = {k: _json_ready(v) for k, v in table.loc[name].to_dict().items()
             if not k.startswith("pnl_")}
        save_backtest(mongo, {**meta, "run_id": run, "bot": name,
                              "execution": r.bot.execution.describe(),
                              "constrained": r.bot.constrained, "metrics": m,
                              "decomposition": r.decomposition, "skipped": r.skipped,
                              "transfers": r.transfers,
                              "blocked_transfers": r.blocked_transfers})
        docs += 1
        eq = r.equity["equity_usd"].to_numpy(float)
        dd = 1.0 - eq / np.maximum.accumulate(eq) if len(eq) else eq
        lines = [influx_bt.equity_line(run, name, int(t), e, d)
                 for t, e, d in zip(r.equity["t_ms"], eq, dd, strict=True)]
        batches = [(influx_bt.BACKTEST_EQUITY, lines),
                   (influx_bt.BACKTEST_TRADE, [influx_bt.trade_line(run, t)
                                               for t in r.trades.to_dict("records")])]
        if len(r.equity):
            batches.append((influx_bt.BACKTEST_SUMMARY, [influx_bt.summary_line(
                run, name, int(r.equity["t_ms"].iloc[-1]), m)]))
        for measurement, batch in batches:
            stored, bad = influx_bt.write_backtest(influx, measurement, batch)
            points += stored
            rejected.extend(bad)
    return {"documents": docs, "points": points, "rejected": rejected}
