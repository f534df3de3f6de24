"""Fixtures of the backtester's tests: the USDC depeg's first day (2023-03-10 12:00 to
2023-03-11 12:00 UTC, IAQF bars) as the stream's lake, written by the stream's own backfill
with 60 s windows and no haircut (so the stream's ``expected_profit`` is exactly what the
fills are worth), and the same quotes as a :class:`backtest.market.Market`."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from arbstream.config import Settings

START, END = datetime(2023, 3, 10, 12, tzinfo=UTC), datetime(2023, 3, 11, 12, tzinfo=UTC)


def lake_settings(data_dir: Path, lake_dir: Path, **extra: object) -> Settings:
    """The backtest tests' settings: 60 s windows, bars fresh for one window, no haircut."""
    return Settings(data_dir=data_dir, lake_dir=lake_dir, state_dir=lake_dir.parent,
                    window_seconds=60.0, max_quote_age_seconds=60.0,
                    stats_horizon_seconds=3600.0, slippage_bps=0.0, latency_haircut_bps=0.0,
                    **extra)


@pytest.fixture(scope="module")
def depeg(tmp_path_factory: pytest.TempPathFactory, data_dir: Path):
    """``(settings, market)`` of the slice, the lake written by the stream's backfill."""
    from arbstream.shell.backfill import Input, read_quotes
    from backtest.market import Market
    from spark_jobs.backfill import BackfillConfig, backfill

    settings = lake_settings(data_dir, tmp_path_factory.mktemp("bt") / "lake")
    _, quotes = read_quotes(settings, Input.iaqf, START, END)
    quotes = list(quotes)
    backfill((q.to_json() for q in quotes), "iaqf", BackfillConfig.of(settings))
    return settings, Market.from_records(quotes, max_age_ms=60_000)
