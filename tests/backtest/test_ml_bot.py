"""The ML bot on the real depeg day: a champion opportunity scorer registered in a real
registry (files and MongoDB mirror), scores equal to the model's own ``predict_proba`` on the
online features, the threshold chosen on training-range signals only and equal to a brute
force search, and no training-range signal traded."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pytest
from sklearn.ensemble import RandomForestClassifier

from arbstream.features import FEATURE_NAMES, online_features
from arbstream.store import models as R
from arbstream.store.config import MongoConfig
from arbstream.store.lake import LakeConfig
from arbstream.timestamps import to_ms
from backtest import signals
from backtest.execution import ExecutionModel, execute
from backtest.ml_bot import ml_bot
from backtest.run import BacktestConfig, run_bot

REAL = ExecutionModel(decision_latency_ms=840.0, default_order_latency_ms=100.0,
                      bar_impact_bps=1.0)
TRAIN_END = datetime(2023, 3, 11, 0, 0, tzinfo=UTC)


def test_ml_bot_thresholds_on_training_signals_only(depeg, settings, tmp_path) -> None:
    lake_settings, market = depeg
    sig = signals.from_lake(LakeConfig.of(lake_settings))
    train = sig[sig["t_ms"] <= to_ms(TRAIN_END)]
    x = np.array([online_features(r) for r in train.to_dict("records")])
    outcome = np.array([execute(market, REAL, s, float(s["size_base"])).gross_profit
                        for s in train.to_dict("records")])
    model = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0).fit(
        x, outcome > 0)
    registry = R.RegistryConfig(tmp_path / "models", MongoConfig.of(
        settings.model_copy(update={"mongo_db": "bt_ml"})))
    card = R.Card.model_validate({
        "name": R.SCORER,
        "target": {"kind": "classification", "horizon_s": 1.0, "threshold_bps": 0.0},
        "data": {"start": sig["window_end"].iloc[0], "end": TRAIN_END, "rows": len(train),
                 "table_sha256": "ab" * 32},
        "features": [s.model_dump() for s in R.feature_specs(FEATURE_NAMES)],
        "feature_schema_hash": R.feature_schema_hash(FEATURE_NAMES),
        "code_version": "test", "libraries": {}, "params": {}, "folds": []})
    version = R.register(registry, R.SCORER, card, model,
                         pa.table({"y_pred": model.predict_proba(x)[:, 1].tolist()}))
    R.set_status(registry, R.SCORER, version, "champion", "test")

    bot, info = ml_bot(registry, sig, market, REAL)
    assert info["version"] == version and info["training_signals"] == len(train)
    # the threshold: brute force over the training scores, outcomes in USD
    scores = model.predict_proba(x)[:, list(model.classes_).index(True)]
    usd = np.array([market.usd(s["profit_currency"], int(s["t_ms"]))
                    for s in train.to_dict("records")])
    totals = {t: (outcome * usd)[scores >= t].sum() for t in np.unique(scores)}
    best = max(totals.values())
    assert info["threshold"] == max(t for t, v in totals.items() if v == best)
    # a backtest of the later period alone reads the training signals from the lake
    later = sig[sig["t_ms"] > to_ms(TRAIN_END)].reset_index(drop=True)
    _, info_later = ml_bot(registry, later, market, REAL, lake_cfg=LakeConfig.of(lake_settings))
    assert info_later["threshold"] == info["threshold"]
    assert info_later["training_signals"] == len(train)
    # out of sample only, and exactly the signals scoring at or above the threshold
    result = run_bot(market, sig, bot, BacktestConfig(), )
    assert result.skipped["in_training"] == len(train)
    test = sig[sig["t_ms"] > to_ms(TRAIN_END)]
    xt = np.array([online_features(r) for r in test.to_dict("records")])
    wanted = set(test.loc[model.predict_proba(xt)[:, 1] >= info["threshold"],
                          "opportunity_id"])
    traded = set(result.trades["opportunity_id"]) if len(result.trades) else set()
    assert traded <= wanted and result.skipped.get("declined", 0) == len(test) - len(wanted)
    assert len(traded) + result.skipped.get("budget", 0) + result.skipped.get(
        "no_fill", 0) == len(wanted)


def test_without_a_champion_the_job_says_why(depeg, tmp_path) -> None:
    from backtest.job import run_job

    lake_settings, market = depeg
    conf = lake_settings.model_copy(update={"models_dir": tmp_path / "empty"})
    job = run_job(conf, market, "iaqf", None, None, store=False, out_dir=tmp_path / "out")
    assert "no champion" in job.ml["skipped"] and "ml" not in job.results
    with pytest.raises(KeyError):
        job.results["ml"]
