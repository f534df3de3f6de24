"""``arbstream backtest run`` end to end: the Binance spot/perpetual capture backfilled and
backtested through the CLI into the real MongoDB and InfluxDB, and the stored run read back
and checked against the exported trades."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from arbstream.privacy import IDENTIFIER_FIELDS
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.queries import query
from arbstream.store.lake import LakeConfig
from arbstream.store.mongo.backtests import backtest_run
from backtest import bots as B
from backtest import signals
from backtest.execution import ExecutionModel
from backtest.market import Market
from backtest.run import BacktestConfig, run_bot

#: Near-miss spot/perpetual signals: no pair of the capture clears the taker fees (net
#: spreads of -6 to -21 bps), so the stream reports as opportunities those above -15 bps.
MIN_NET = -0.0015


@pytest.fixture(scope="module")
def binance_run(settings, tmp_path_factory, monkeypatch_module) -> dict:
    """One CLI run on the Binance capture with ``--backfill``, stored."""
    from arbstream.config import get_settings
    from arbstream.shell.cli import app

    state = tmp_path_factory.mktemp("bt-binance")
    env = {"ARB_STATE_DIR": str(state), "ARB_DATA_DIR": str(settings.data_dir),
           "ARB_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "ARB_INFLUX_URL": settings.influx_url, "ARB_INFLUX_DB": "backtests",
           "ARB_MONGO_URI": settings.mongo_uri.get_secret_value(),
           "ARB_MONGO_DB": "backtests", "ARB_MIN_NET": str(MIN_NET),
           "ARB_BACKTEST_ORDER_LATENCY_MS": "recorded"}
    for k, v in env.items():
        monkeypatch_module.setenv(k, v)
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["backtest", "run", "--input", "binance", "--backfill"])
    conf = get_settings()
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    return {"output": result.output, "settings": conf}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_binance_capture_run_is_stored_and_exported(binance_run) -> None:
    conf = binance_run["settings"]
    docs = backtest_run(MongoConfig.of(conf))
    # the default ARB_PAIRS pair on these venues: Binance USD-M perpetual vs spot
    assert {d["bot"] for d in docs} == {"threshold-p50", "threshold-p75", "threshold-p95",
                                        "oracle", "oracle-unconstrained", "naive",
                                        "pair-z-btcusdt-binance-perp-spot"}
    run = docs[0]["run_id"]
    assert run in binance_run["output"] and "naive" in binance_run["output"]
    out = conf.backtest_dir / run
    trades = pd.read_parquet(out / "trades.parquet")
    csv = pd.read_csv(out / "trades.csv")
    rows = json.loads((out / "trades.json").read_text())
    assert len(trades) == len(csv) == len(rows) > 0
    assert not IDENTIFIER_FIELDS & set(trades.columns)
    for d in docs:
        mine = trades[trades["bot"] == d["bot"]]
        assert d["metrics"]["trades"] == len(mine)
        assert d["metrics"]["total_profit_usd"] == pytest.approx(mine["pnl_usd"].sum())
        if d["bot"] != "naive":  # recorded per venue; the naive setup has none
            assert set(d["execution"]["order_latency_ms"]) == {"binance", "binanceusdm"}
    # the unconstrained oracle finds nothing worth taking after fees; the naive setup loses
    by = {d["bot"]: d for d in docs}
    assert by["oracle-unconstrained"]["metrics"]["trades"] == 0
    assert by["naive"]["metrics"]["total_profit_usd"] < 0
    pair = by["pair-z-btcusdt-binance-perp-spot"]
    assert pair["metrics"]["trades"] > 0 and pair["decomposition"]["fees"] < 0
    influx = InfluxConfig.of(conf)
    [eq] = query(influx, f'SELECT count("equity_usd") FROM "backtest_equity" '
                         f"WHERE \"run\" = '{run}' AND \"bot\" = 'naive'")
    [tr] = query(influx, f'SELECT count("pnl_usd") FROM "backtest_trade" '
                         f"WHERE \"run\" = '{run}' AND \"bot\" = 'naive'")
    assert tr["count"] == by["naive"]["metrics"]["trades"] and eq["count"] >= 6
    [sm] = query(influx, f'SELECT "trades", "total_profit_usd" FROM "backtest_summary" '
                         f"WHERE \"run\" = '{run}' AND \"bot\" = 'naive'")
    assert sm["total_profit_usd"] == pytest.approx(by["naive"]["metrics"]["total_profit_usd"])


def test_binance_capture_reconciles_to_the_stream(binance_run) -> None:
    """On top-of-book quotes with sizes, zero latency and no limits, each fill is the
    stream's size at the stream's quotes: gross profit less the stream's haircut provision
    = expected_profit."""
    from arbstream.shell.backfill import Input, read_quotes

    conf = binance_run["settings"]
    sig = signals.from_lake(LakeConfig.of(conf))
    assert len(sig) > 100 and (sig["size_source"] == "top_of_book").all()
    _, quotes = read_quotes(conf, Input.binance)
    market = Market.from_records(quotes, max_age_ms=int(conf.max_quote_age_seconds * 1000))
    bot = B.Bot("all", ExecutionModel(), lambda _s: True, constrained=False)
    trades = run_bot(market, sig, bot, BacktestConfig()).trades
    assert len(trades) == len(sig) and (trades["fill_ratio"] == 1.0).all()
    # the stream's expected_profit also deducts its haircut provision (ARB_SLIPPAGE_BPS +
    # ARB_LATENCY_HAIRCUT_BPS, 2 bps here) from the net spread; the fills carry no provision
    merged = trades.merge(sig[["opportunity_id", "expected_profit", "haircut"]],
                          on="opportunity_id", suffixes=("", "_stream"))
    assert (merged["haircut"] == 2e-4).all()
    provisioned = merged["gross_profit"] - merged["haircut"] * merged["cost"]
    assert np.abs(provisioned - merged["expected_profit_stream"]).max() <= 1e-9
    assert abs(math.fsum(provisioned) - math.fsum(sig["expected_profit"])) <= 1e-9


def test_show_prints_the_stored_run(binance_run, monkeypatch_module) -> None:
    from arbstream.config import get_settings
    from arbstream.shell.cli import app

    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["backtest", "show"])
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "oracle-unconstrained" in result.output.replace("\n", "") or "oracle" in \
        result.output


def test_dp_release_of_the_trade_count(binance_run) -> None:
    """A backtest's trade count released with ε-DP from the persisted budget: spent, logged
    without the true value, refused when the budget would be exceeded or DP is off."""
    from arbstream.store.mongo import privacy_budget as pb
    from backtest.privacy_release import release_trade_count

    mongo = MongoConfig.of(binance_run["settings"])
    conf = pb.DpConfig(mongo, enabled=True, epsilon_total=1.0)
    made = release_trade_count(conf, 0.6, bot="naive", scope="bt-test")
    run = backtest_run(mongo)[0]["run_id"]
    assert made.what == f"backtest_trades:{run}:naive" and made.scale == pytest.approx(1 / 0.6)
    assert made.budget.spent == pytest.approx(0.6)
    with pytest.raises(pb.BudgetExhausted):
        release_trade_count(conf, 0.6, scope="bt-test")
    with pytest.raises(pb.DpDisabled):
        release_trade_count(pb.DpConfig(mongo, enabled=False, epsilon_total=1.0), 0.1)
    with pytest.raises(ValueError, match="no bot"):
        release_trade_count(conf, 0.1, bot="nobody", scope="bt-test")
