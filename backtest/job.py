"""The backtest as a batch job: settings → execution model, bots, run, outputs.

``arbstream backtest run`` (:mod:`arbstream.shell.backtest`) reads the recording's quotes
with the producers' readers and hands them here as a :class:`backtest.market.Market`; the
signals and thresholds come from the lake (the stream's own records, written by the stream
or by ``arbstream backfill``). :func:`run_job` runs the default bots (:func:`default_bots`),
exports the trades and stores the run.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from arbstream.config import Settings
from arbstream.fees import DEFAULT_WITHDRAWALS, USDC_DEPEG_PAUSE
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.lake import LakeConfig
from arbstream.store.models import ModelIntegrityError, ModelNotFoundError, RegistryConfig
from backtest import bots as B
from backtest import report, signals
from backtest.execution import ExecutionModel
from backtest.market import Market
from backtest.ml_bot import ml_bot
from backtest.pair_bot import Leg, run_pair_bot
from backtest.run import BacktestConfig, BotResult, run


def execution_model(settings: Settings, market: Market) -> ExecutionModel:
    """The bots' execution from ``ARB_BACKTEST_*`` (``recorded`` order latency: each venue's
    median received − exchange time in the recording)."""
    lat = settings.backtest_order_latency_ms
    per_venue = market.recorded_latency_ms() if lat == "recorded" else {}
    return ExecutionModel(
        decision_latency_ms=settings.backtest_decision_latency_ms,
        order_latency_ms=per_venue,
        default_order_latency_ms=0.0 if lat == "recorded" else float(lat),
        sequential=settings.backtest_legs == "sequential",
        bar_impact_bps=settings.backtest_bar_impact_bps)


def backtest_config(settings: Settings, usdc_paused: bool = False) -> BacktestConfig:
    """Money and inventory settings; ``usdc_paused`` adds the March 2023 USDC rail pause
    (:data:`arbstream.fees.USDC_DEPEG_PAUSE`)."""
    return BacktestConfig(
        capital_usd=settings.backtest_capital_usd,
        position_cap=settings.backtest_position_cap,
        rebalance_below=settings.backtest_rebalance_below,
        withdrawals=dict(DEFAULT_WITHDRAWALS),
        pauses=(USDC_DEPEG_PAUSE,) if usdc_paused else ())


def default_bots(thresholds: pd.DataFrame, model: ExecutionModel,
                 extra: Sequence[B.Bot] = ()) -> list[B.Bot]:
    """Threshold bots at p50/p75/p95, the oracle, the unconstrained oracle, the naive
    setup, then ``extra`` (the ML bot when a champion scorer exists)."""
    th = B.Thresholds(thresholds)
    return [*(B.threshold_bot(level, th, model) for level in signals.LEVELS),
            B.oracle(model), B.oracle(model, constrained=False), B.naive(model), *extra]


@dataclass
class JobResult:
    """A finished run: its id, per-bot results, the comparison table, exported files and
    what the stores took."""

    run_id: str
    results: dict[str, BotResult]
    table: pd.DataFrame
    files: report.Files
    stored: dict[str, Any] | None
    ml: dict[str, Any]


def run_job(settings: Settings, market: Market, source: str, since: dt.datetime | None,
            until: dt.datetime | None, *, usdc_paused: bool = False,
            extra_bots: Sequence[B.Bot] = (), store: bool = True,
            out_dir: Path | None = None, ml: bool = True, from_mongo: bool = False,
            ml_version: int | None = None,
            pair_series: Sequence[tuple[str, str, str, pd.DataFrame]] = ()) -> JobResult:
    """Run the default bots on the signals of ``[since, until)`` (the lake's, or MongoDB's
    with ``from_mongo``; thresholds always from the lake's spreads) against ``market``,
    the ML bot (:mod:`backtest.ml_bot`) when ``ml`` and the registry has a champion scorer
    (or version ``ml_version`` of it; otherwise ``JobResult.ml["skipped"]`` says why), and a
    z-score pair bot (:mod:`backtest.pair_bot`, named ``pair-z-<pair>``) per
    ``pair_series`` item ``(pair name, y leg, x leg, z series)``.

    Raises:
        ValueError: the lake holds no opportunity in the range (run ``arbstream backfill``
            or the stream first).
        arbstream.privacy.IdHashKeyMissing: as :func:`backtest.report.write_files`.
        pymongo.errors.PyMongoError, arbstream.store.influx.client.InfluxError: a store
            cannot be written (``store=True``).
    """
    cfg = LakeConfig.of(settings)
    if from_mongo:
        sig = signals.from_mongo(MongoConfig.of(settings), since, until)
    else:
        sig = signals.from_lake(cfg, since, until)
    if sig.empty:
        where = "MongoDB opportunities" if from_mongo else f"the lake ({cfg.dir})"
        raise ValueError(f"no opportunity in {where} between {since} and {until}: run "
                         "`arbstream backfill` (or the stream) over it first")
    thresholds = signals.hourly_thresholds(signals.spreads_from_lake(cfg, since, until))
    model = execution_model(settings, market)
    config = backtest_config(settings, usdc_paused)
    extra = list(extra_bots)
    ml_info: dict[str, Any] = {"skipped": "not requested"}
    if ml:
        try:
            bot, ml_info = ml_bot(RegistryConfig.of(settings), sig, market, model,
                                  version=ml_version, lake_cfg=cfg)
            extra.append(bot)
        except (ModelNotFoundError, ModelIntegrityError, ValueError) as exc:
            ml_info = {"skipped": str(exc)}
    results = run(market, sig, default_bots(thresholds, model, extra), config)
    for name, y, x, series in pair_series:
        bot = f"pair-z-{name}"
        results[bot] = run_pair_bot(market, series, Leg.parse(y), Leg.parse(x), model,
                                    settings.taker_fees, config, name=bot)
    inputs = {"source": source, "since": since, "until": until, "signals": len(sig),
              "signals_from": "mongo" if from_mongo else "lake",
              "execution": model.describe(), "capital": config.capital_usd,
              "cap": config.position_cap, "usdc_paused": usdc_paused,
              "bots": sorted(results), "ml": ml_info}
    rid = report.run_id(int(sig["t_ms"].iloc[0]), inputs)
    table = report.comparison(results)
    files = report.write_files(results, table, (out_dir or settings.backtest_dir) / rid,
                               settings.id_hash_key)
    stored = None
    if store:
        meta = {"source": source, "since": since, "until": until, "usdc_paused": usdc_paused,
                "trades_file": str(files.parquet), "ml": ml_info,
                "config": {"capital_usd": config.capital_usd,
                           "position_cap": config.position_cap,
                           "rebalance_below": config.rebalance_below,
                           "pauses": [p.asset for p in config.pauses]}}
        stored = report.store(results, table, rid, meta, MongoConfig.of(settings),
                              InfluxConfig.of(settings))
    return JobResult(rid, results, table, files, stored, ml_info)

