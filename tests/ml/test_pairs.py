"""The pairs job (ml/pairs.py) on the real IAQF lake (2023-03-09..10, 60 s windows), against
the real InfluxDB, MongoDB-protocol server and Kafka broker of the ``settings`` fixture.

Every stored value is compared with statsmodels / pandas computed here directly from the
lake's Parquet files (read with pandas, not through ``arbstream.store.lake``)."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from pydantic import ValidationError
from statsmodels.regression.rolling import RollingOLS
from statsmodels.tsa.stattools import adfuller, coint

import grafana as G
from arbstream.config import AlertRule, PairSpec, Settings
from arbstream.schemas import PairSignal
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.queries import query
from arbstream.store.mongo.pair_stats import pair_stats
from ml import pairs as P
from testing.support import consume

COINBASE_KRAKEN = PairSpec(name="btcusd-coinbase-kraken", y="coinbase:BTC-USD",
                           x="kraken:BTC-USD")
BINANCE_COINBASE = PairSpec(name="btc-binance-usdt-coinbase-usd", y="binance:BTC-USDT",
                            x="coinbase:BTC-USD")
#: A leg the IAQF lake has no row of (the perpetual is only in the Binance recording).
PERP_SPOT = PairSpec(name="btcusdt-binance-perp-spot", y="binanceusdm:BTC-USDT",
                     x="binance:BTC-USDT")
WINDOW, Z_WINDOW, LOOKBACK = 60, 30, 1440


def lake_mids(lake_dir: Path, pair: PairSpec) -> pd.DataFrame:
    """The two legs' mids on common window ends, straight from the Parquet files."""
    frame = pd.read_parquet(lake_dir / "feature", columns=["exchange", "symbol", "window_end",
                                                           "mid"])
    legs = {}
    for name, leg in (("y", pair.y), ("x", pair.x)):
        exchange, symbol = leg.split(":")
        rows = frame[(frame.exchange == exchange) & (frame.symbol == symbol)]
        legs[name] = rows.drop_duplicates("window_end", keep="last").set_index(
            "window_end")["mid"].sort_index()
    return pd.DataFrame(legs).dropna()


@pytest.fixture(scope="module")
def job(settings: Settings, iaqf_lake: Path) -> tuple[Settings, P.PairsRun]:
    conf = settings.model_copy(update={
        "lake_dir": iaqf_lake, "mongo_db": f"pairs_test_{uuid.uuid4().hex[:8]}",
        "pairs": [COINBASE_KRAKEN, BINANCE_COINBASE, PERP_SPOT], "pairs_window": WINDOW,
        "pairs_z_window": Z_WINDOW, "pairs_test_lookback": LOOKBACK,
        "pairs_topic": f"pairs.test.{uuid.uuid4().hex[:8]}",
    })
    return conf, P.run(conf)


@pytest.mark.parametrize("pair", [COINBASE_KRAKEN, BINANCE_COINBASE], ids=lambda p: p.name)
def test_stored_statistics_equal_statsmodels(job: tuple[Settings, P.PairsRun],
                                             iaqf_lake: Path, pair: PairSpec) -> None:
    conf, result = job
    mids = lake_mids(iaqf_lake, pair)
    ly, lx = np.log(mids["y"]), np.log(mids["x"])
    ty, tx = ly.iloc[-LOOKBACK:], lx.iloc[-LOOKBACK:]
    ols = sm.OLS(ty.to_numpy(), sm.add_constant(tx.to_numpy())).fit()
    origin = sm.OLS(ty.to_numpy(), tx.to_numpy()).fit()
    resid = ty.to_numpy() - ols.params[0] - ols.params[1] * tx.to_numpy()
    ar1 = sm.OLS(resid[1:], sm.add_constant(resid[:-1])).fit()  # AR(1) by plain OLS
    half_life_obs = -math.log(2) / math.log(ar1.params[1])
    spacing_s = pd.Series(ty.index).diff().dt.total_seconds().median()
    # rolling: RollingOLS, and the last window refitted by plain OLS
    params = RollingOLS(ly, sm.add_constant(lx.rename("x")), window=WINDOW).fit().params
    last = sm.OLS(ly.iloc[-WINDOW:].to_numpy(), sm.add_constant(lx.iloc[-WINDOW:].to_numpy())
                  ).fit().params
    # (log mids of one asset vary little: RollingOLS's updating and a fresh fit agree to ~1e-7)
    assert params.iloc[-1].to_numpy() == pytest.approx(last, rel=1e-6)
    spread = ly - params["const"].shift(1) - params["x"].shift(1) * lx
    z = (spread - spread.rolling(Z_WINDOW).mean()) / spread.rolling(Z_WINDOW).std()
    corr = ly.diff().rolling(WINDOW).corr(lx.diff())

    [doc] = pair_stats(MongoConfig.of(conf), [pair.name])
    assert doc["status"] == "ok" and doc["observations"] == len(mids)
    assert doc["test_observations"] == LOOKBACK
    assert doc["alpha_ols"] == pytest.approx(ols.params[0], rel=1e-9)
    assert doc["beta_ols"] == pytest.approx(ols.params[1], rel=1e-9)
    assert doc["beta_ols_no_intercept"] == pytest.approx(origin.params[0], rel=1e-9)
    adf = adfuller(resid, autolag="AIC", result_object=False)
    assert doc["adf_pvalue"] == pytest.approx(adf[1], rel=1e-6)
    assert doc["coint_pvalue"] == pytest.approx(
        coint(ty.to_numpy(), tx.to_numpy(), autolag="aic")[1], rel=1e-6)
    assert doc["half_life_obs"] == pytest.approx(half_life_obs, rel=1e-6)
    assert doc["half_life_s"] == pytest.approx(half_life_obs * spacing_s, rel=1e-6)
    assert doc["window_end"] == mids.index[-1].to_pydatetime()
    assert doc["beta"] == pytest.approx(params["x"].iloc[-1], rel=1e-9)
    assert doc["z"] == pytest.approx(z.iloc[-1], rel=1e-6)
    assert doc["correlation"] == pytest.approx(corr.iloc[-1], rel=1e-9)

    # InfluxDB: every window's β and z-score
    rows = query(InfluxConfig.of(conf), 'SELECT "beta", "z", "alpha", "spread" FROM '
                 f"\"pair_stats\" WHERE \"pair\" = '{pair.name}'")
    stored = pd.DataFrame(rows).set_index("time")
    want = pd.DataFrame({"beta": params["x"], "z": z}).dropna(how="all")
    want.index = (want.index - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    assert len(stored) == len(want.dropna(subset=["beta"]))
    joined = want.join(stored, rsuffix="_db", how="inner")
    assert len(joined) == len(stored)
    assert np.allclose(joined["beta_db"], joined["beta"], rtol=1e-9)
    finite = joined["z"].notna()
    assert finite.sum() > 2000
    assert np.allclose(joined.loc[finite, "z_db"], joined.loc[finite, "z"], rtol=1e-6)
    assert joined.loc[~finite, "z_db"].isna().all()

    # the event for the alert worker
    signals = [PairSignal.model_validate_json(m.value())
               for m in consume(conf, conf.pairs_topic) if m.key() == pair.name.encode()]
    [signal] = signals
    assert signal.z == pytest.approx(z.iloc[-1], rel=1e-6)
    sign = np.sign(z.dropna())
    flips = sign.index[1:][sign.to_numpy()[1:] != sign.to_numpy()[:-1]]
    assert signal.excursion_start == flips[-1].to_pydatetime()
    assert signal.signal_id.startswith(pair.name + "|")


def test_a_pair_with_a_missing_leg_is_reported(job: tuple[Settings, P.PairsRun]) -> None:
    conf, result = job
    why = result.errors[PERP_SPOT.name]
    assert "binanceusdm:BTC-USDT has no mid" in why and PERP_SPOT.name not in result.stats
    [doc] = pair_stats(MongoConfig.of(conf), [PERP_SPOT.name])
    assert doc["status"] == "error" and doc["error"] == why
    assert result.summary()["pairs"][PERP_SPOT.name] == {"error": why}
    keys = {m.key() for m in consume(conf, conf.pairs_topic)}
    assert keys == {COINBASE_KRAKEN.name.encode(), BINANCE_COINBASE.name.encode()}


def test_analytics_pair_panels_return_rows(job: tuple[Settings, P.PairsRun]) -> None:
    """The Analytics dashboard's pair-trading panels, expanded as Grafana does, against the
    job's InfluxDB points: one series per computed pair; an hour without data gives none."""
    conf, _ = job
    board = G.load_dashboards()["arbstream-analytics"]
    titles = {"Pair spread z-score", "Pair hedge ratio β"}
    values = {"symbol": "BTC-USD", "exchange": "$__all", "exchange_a": "coinbase",
              "exchange_b": "kraken", "min_net_bps": "0"}
    influx = InfluxConfig.of(conf)

    def series(start: str, end: str) -> dict[str, int]:
        rng = G.TimeRange(int(pd.Timestamp(start).timestamp() * 1000),
                          int(pd.Timestamp(end).timestamp() * 1000))
        return {r.panel_title: r.rows for r in G.check(
            board, values, rng, rng.to_ms, lambda q: len({row["pair"] for row in query(
                influx, q, retries=0)})) if r.panel_title in titles}

    assert series("2023-03-10T12:00Z", "2023-03-10T18:00Z") == dict.fromkeys(titles, 2)
    assert series("2023-03-12T12:00Z", "2023-03-12T18:00Z") == dict.fromkeys(titles, 0)


def test_too_few_common_windows_is_a_clear_error() -> None:
    times = pd.date_range("2023-03-09", periods=50, freq="60s", tz="UTC")
    mids = pd.DataFrame({"y": np.linspace(20_000, 20_100, 50), "x": 20_000.0}, index=times)
    with pytest.raises(P.PairDataError, match=r"50 common window ends .* need at least 110"):
        P.compute(mids, COINBASE_KRAKEN, 60, 30, 200)
    features = pd.DataFrame({"exchange": ["coinbase"], "symbol": ["BTC-USD"],
                             "window_end": times[:1], "mid": [20_000.0]})
    with pytest.raises(P.PairDataError, match="share no window end|kraken:BTC-USD has no mid"):
        P.align(features, COINBASE_KRAKEN)


def test_pair_settings_are_validated() -> None:
    def error(**values: object) -> str:
        with pytest.raises(ValidationError) as info:
            Settings(**values)
        return str(info.value)

    assert "repeated: ['a']" in error(pairs=[{"name": "a", "y": "coinbase:BTC-USD",
                                              "x": "kraken:BTC-USD"}] * 2)
    assert "not in ARB_EXCHANGES" in error(pairs=[{"name": "a", "y": "ftx:BTC-USD",
                                                   "x": "kraken:BTC-USD"}])
    assert "same leg" in error(pairs=[{"name": "a", "y": "kraken:BTC-USD",
                                       "x": "kraken:BTC-USD"}])
    assert "pattern" in error(pairs=[{"name": "a", "y": "coinbase:btcusd",
                                      "x": "kraken:BTC-USD"}])
    assert "must be >= pairs_window" in error(pairs_window=500, pairs_test_lookback=100)
    pair_rule = {"name": "z", "min_abs_pair_z": 2.0, "recipients": ["a@b.org"]}
    assert "not in ARB_PAIRS" in error(alert_rules=[{**pair_rule, "pairs": ["nope"]}])
    assert "cannot set the episode fields ['min_net_bps']" in error(
        alert_rules=[{**pair_rule, "min_net_bps": 5}])
    assert "set min_abs_pair_z too" in error(
        alert_rules=[{"name": "r", "pairs": ["x"], "recipients": ["a@b.org"]}])
    # the default pairs follow ARB_EXCHANGES
    assert [p.name for p in Settings(exchanges=["coinbase", "kraken"]).pairs] == [
        COINBASE_KRAKEN.name]
    assert AlertRule(**pair_rule).min_abs_pair_z == 2.0


def test_cli_run_and_show(job: tuple[Settings, P.PairsRun], monkeypatch: pytest.MonkeyPatch,
                          tmp_path: Path) -> None:
    """``arbstream pairs run`` exits 1 naming the pair it could not compute (the others are
    written); ``show`` lists every pair with its β and status."""
    import os

    from typer.testing import CliRunner

    from arbstream.config import get_settings
    from arbstream.shell.cli import app

    conf, result = job
    for name in list(os.environ):
        if name.startswith("ARB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    env = {"ARB_LAKE_DIR": str(conf.lake_dir), "ARB_MONGO_URI": conf.mongo_uri.get_secret_value(),
           "ARB_MONGO_DB": conf.mongo_db, "ARB_INFLUX_URL": conf.influx_url,
           "ARB_KAFKA_BOOTSTRAP": conf.kafka_bootstrap, "ARB_PAIRS_WINDOW": str(WINDOW),
           "ARB_PAIRS_Z_WINDOW": str(Z_WINDOW), "ARB_PAIRS_TEST_LOOKBACK": str(LOOKBACK)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        ran = CliRunner().invoke(app, ["pairs", "run", "--no-publish", "--until",
                                       "2023-03-11T00:00:00Z"])
        assert ran.exit_code == 1, ran.output
        flat = " ".join(ran.output.split())
        assert "2 pair(s) computed" in flat and f"{PERP_SPOT.name}: pair" in flat
        table = CliRunner().invoke(app, ["pairs", "show"])
        assert table.exit_code == 0 and "coint p" in table.output, table.output
        shown = CliRunner().invoke(app, ["pairs", "show", "--json"])
        assert shown.exit_code == 0, shown.output
        docs = {d["pair"]: d for d in json.loads(shown.output)}
        assert set(docs) == {COINBASE_KRAKEN.name, BINANCE_COINBASE.name, PERP_SPOT.name}
        beta = result.stats[COINBASE_KRAKEN.name].latest()["beta"]
        assert docs[COINBASE_KRAKEN.name]["beta"] == pytest.approx(beta, rel=1e-12)
        assert docs[PERP_SPOT.name]["status"] == "error"
    finally:
        get_settings.cache_clear()
