"""The backtester's InfluxDB measurements (default retention policy, kept), written by
``arbstream backtest run`` and read by the provisioned "Backtest" dashboard.

* ``backtest_equity``: tags ``run``, ``bot``; fields ``equity_usd`` (USD, marked to market),
  ``drawdown`` (fraction below the running peak); time = the mark (UTC ms), one per minute.
* ``backtest_trade``: tags ``run``, ``bot``, ``pair``; fields ``pnl_usd``, ``fees_usd``
  (USD), ``net_bps`` (the signal's net spread, bps), ``win`` (1 or 0), ``matched`` (base
  units), ``fill_ratio``; time = the decision (UTC ms).
* ``backtest_summary``: tags ``run``, ``bot``; fields the finite numbers of
  :func:`backtest.metrics.summarize` (``trades``, ``win_rate``, ``total_profit_usd``,
  ``sharpe``...); time = the run's last mark.

A re-run under the same run id replaces its points (same tags and times).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from influxdb_client import Point, WritePrecision

from arbstream.records import finite_or_none
from arbstream.store.config import InfluxConfig
from arbstream.store.influx.writer import write_lines_with_rejects

BACKTEST_EQUITY = "backtest_equity"
BACKTEST_TRADE = "backtest_trade"
BACKTEST_SUMMARY = "backtest_summary"
TRADE_FIELDS = ("pnl_usd", "fees_usd", "net_bps", "matched", "fill_ratio")


def equity_line(run: str, bot: str, t_ms: int, equity_usd: float, drawdown: float) -> str:
    """One ``backtest_equity`` point as line protocol."""
    return (Point(BACKTEST_EQUITY).tag("run", run).tag("bot", bot)
            .field("equity_usd", float(equity_usd)).field("drawdown", float(drawdown))
            .time(int(t_ms), WritePrecision.MS).to_line_protocol())


def trade_line(run: str, trade: Mapping[str, Any]) -> str:
    """One ``backtest_trade`` point (``trade``: a row of :func:`backtest.run.trade_row`)."""
    p = Point(BACKTEST_TRADE).tag("run", run).tag("bot", trade["bot"]).tag("pair", trade["pair"])
    for name in TRADE_FIELDS:
        v = finite_or_none(trade.get(name))
        if v is not None:
            p.field(name, v)
    p.field("win", 1.0 if float(trade["pnl_usd"]) > 0 else 0.0)
    return p.time(int(trade["decided_ms"]), WritePrecision.MS).to_line_protocol()


def summary_line(run: str, bot: str, t_ms: int, metrics: Mapping[str, Any]) -> str:
    """One ``backtest_summary`` point: the finite numeric metrics."""
    p = Point(BACKTEST_SUMMARY).tag("run", run).tag("bot", bot)
    for name, value in sorted(metrics.items()):
        v = finite_or_none(value)
        if v is not None:
            p.field(name, v)
    return p.time(int(t_ms), WritePrecision.MS).to_line_protocol()


def write_backtest(conf: InfluxConfig, measurement: str, lines: Iterable[str]
                   ) -> tuple[int, list[tuple[str, str]]]:
    """Write the lines of one backtest measurement; ``(stored, rejected (line, reason))``.

    Raises:
        ValueError: an unknown measurement.
        InfluxError, InfluxUnavailableError: as
            :func:`arbstream.store.influx.writer.write_lines_with_rejects`.
    """
    if measurement not in (BACKTEST_EQUITY, BACKTEST_TRADE, BACKTEST_SUMMARY):
        raise ValueError(f"not a backtest measurement: {measurement}")
    return write_lines_with_rejects(conf, measurement, lines)
