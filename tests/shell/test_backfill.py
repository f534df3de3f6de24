"""``arbstream backfill``, run in-process with Typer's CliRunner on the recorded data (no
service: the command writes the Parquet history only).

The same IAQF half hour read as bars and as a tick CSV must give the same lake, and the
Binance spot and USD-M captures a spot-perp basis; bad arguments exit with the reason.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner, Result

from arbstream.config import get_settings
from arbstream.shell.cli import app
from arbstream.store import lake
from producers.replay.binance import BINANCE_SUBDIR
from producers.replay.iaqf import load_iaqf_quotes
from testing.support import DATA_DIR
from tests.spark_jobs.test_lake import assert_same_lake

FROM, TO = "2023-03-11T04:00:00Z", "2023-03-11T04:30:00Z"


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Callable[..., Result]]:
    """Invoke ``arbstream`` with only ``ARB_DATA_DIR`` and ``ARB_LAKE_DIR`` (``<tmp>/lake``)
    set, from an empty working directory."""
    for name in list(os.environ):
        if name.startswith("ARB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ARB_DATA_DIR", str(DATA_DIR))
    monkeypatch.setenv("ARB_LAKE_DIR", str(tmp_path / "lake"))

    def invoke(*args: str, lake_dir: str = "lake") -> Result:
        monkeypatch.setenv("ARB_LAKE_DIR", str(tmp_path / lake_dir))
        get_settings.cache_clear()
        return CliRunner().invoke(app, ["backfill", *args])

    yield invoke
    get_settings.cache_clear()


def test_iaqf_bars_and_the_same_ticks_as_csv_give_one_lake(run, tmp_path: Path) -> None:
    bars = run("--input", "iaqf", "--from", FROM, "--to", TO)
    assert bars.exit_code == 0, bars.output
    quotes = load_iaqf_quotes(DATA_DIR, pd.Timestamp(FROM), pd.Timestamp(TO))
    assert f"backfill iaqf: {len(quotes):,} records" in bars.output
    assert "spread" in bars.output and "dead letters: 0" in bars.output
    ticks = tmp_path / "ticks.csv"
    with ticks.open("w", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(["exchange", "symbol", "ts", "bid", "ask"])
        out.writerows(zip(quotes.exchange, quotes.symbol, quotes.exchange_ts,
                          map(repr, quotes.bid), map(repr, quotes.ask), strict=True))
    ticked = run("--input", "csv", "--path", str(ticks), lake_dir="csv")
    assert ticked.exit_code == 0, ticked.output
    counts = assert_same_lake(lake.LakeConfig(tmp_path / "csv"), lake.LakeConfig(tmp_path / "lake"))
    assert counts["spread"] > 5_000


def test_binance_spot_and_perp_captures(run, tmp_path: Path) -> None:
    root = DATA_DIR / BINANCE_SUBDIR
    result = run("--input", "binance", "--path", str(root / "spot_btcusdt_20240808.gz"),
                 "--path", str(root / "usdm_btcusdt_20240808.gz"),
                 "--from", "2024-08-08T23:58:00Z", "--to", "2024-08-08T23:58:30Z",
                 "--chunk", "5000")
    assert result.exit_code == 0, result.output
    spreads = lake.read(lake.LakeConfig(tmp_path / "lake"), "spread").to_pandas()
    assert set(zip(spreads.buy_exchange, spreads.sell_exchange, strict=True)) == {
        ("binance", "binanceusdm"), ("binanceusdm", "binance")}
    assert spreads["buy_ask_size"].notna().all()  # bookTicker quotes carry sizes
    assert (spreads["size_source"] == "top_of_book").all()


@pytest.mark.parametrize(("args", "message"), [
    (["--input", "iaqf", "--path", "x.gz"], "--path is not used with --input iaqf"),
    (["--input", "csv"], "--input csv needs at least one --path"),
    (["--input", "csv", "--path", "missing.csv"], "missing.csv not found"),
])
def test_bad_arguments_exit_with_the_reason(run, args: list[str], message: str) -> None:
    result = run(*args)
    assert result.exit_code == 1
    assert message in " ".join(result.output.split())
