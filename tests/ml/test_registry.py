"""The promotion rule (ml/promotion.py) and the registry's retraining side (ml/registry.py):
cards from training results, promotion decisions recorded in the cards and MongoDB
``models``, and the live evaluation (MongoDB ``ml_eval``) of ``ml_score`` points against the
real ``spread`` series in InfluxDB.

Data: real IAQF bars of the USDC depeg (2023-03-11 04:00-06:00) through the reference spread
implementation; features :func:`arbstream.features.online_features`; labels the pair's net
spread one bar (60 s) later. Walk-forward folds are 20 minutes from 04:40; the models are real
scikit-learn estimators.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.metrics import average_precision_score
from sklearn.pipeline import make_pipeline

from arbstream.config import Settings
from arbstream.features import FEATURE_NAMES, online_features
from arbstream.store import models as R
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.schema import ensure_database
from arbstream.store.influx.writer import write_ml_scores, write_spreads
from arbstream.store.mongo.ml_eval import evals
from ml.promotion import DEFAULT_K, beats, decide, promote
from ml.registry import (
    PSI_DRIFTED,
    card_from_result,
    evaluate_live,
    psi,
    reference_bins,
    register_result,
)
from testing.alert_events import iaqf_quotes, reference_rows

START = datetime(2023, 3, 11, 4, tzinfo=UTC)
END = datetime(2023, 3, 11, 6, tzinfo=UTC)
FOLDS = [START + timedelta(minutes=m) for m in (40, 60, 80, 100, 120)]
HORIZON_S = 60.0
PAIR = ["symbol", "sell_symbol", "buy_exchange", "sell_exchange"]


# --- data ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rows(data_dir: Path) -> list[dict[str, Any]]:
    return reference_rows(iaqf_quotes(data_dir, START, END), Settings())


@pytest.fixture(scope="module")
def table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per spread window with a label: features, ``net_bps`` at t, ``y`` = net bps
    at t + 60 s, ``label`` = y > 0."""
    frame = pd.DataFrame(rows)
    ahead = frame[[*PAIR, "window_end", "net_bps"]].rename(columns={"net_bps": "y"})
    ahead["window_end"] -= pd.Timedelta(seconds=HORIZON_S)
    frame = frame.merge(ahead, on=[*PAIR, "window_end"], how="inner")
    features = pd.DataFrame([online_features(r) for r in frame.to_dict("records")],
                            columns=list(FEATURE_NAMES))
    return pd.concat([frame[[*PAIR, "window_end", "net_bps", "y"]], features.add_prefix("x_")],
                     axis=1).assign(label=lambda f: (f["y"] > 0).astype(int))


def x_of(frame: pd.DataFrame) -> np.ndarray:
    return frame[[f"x_{n}" for n in FEATURE_NAMES]].to_numpy()


def walk_forward(table: pd.DataFrame, make: Any, kind: str,
                 champion: Any = None) -> tuple[Any, list[dict[str, Any]], pa.Table]:
    """Fit ``make()`` before each fold and score it on the fold; baselines and (when given)
    the fitted champion on the same rows. Returns the model fitted on everything before the
    last fold's end, the folds and the out-of-sample predictions."""
    folds, preds = [], []
    model = None
    for i, (lo, hi) in enumerate(zip(FOLDS, FOLDS[1:], strict=False)):
        train, test = table[table.window_end < lo], table[(table.window_end >= lo)
                                                          & (table.window_end < hi)]
        target = "label" if kind == "classification" else "y"
        model = make().fit(x_of(train), train[target])
        metrics = {"model": fold_metrics(kind, predict(model, kind, test), test)}
        if kind == "classification":
            metrics["threshold_rule"] = fold_metrics(kind, (test.net_bps > 0).astype(float), test)
            metrics["base_rate"] = fold_metrics(kind, np.full(len(test), train.label.mean()),
                                                test)
        else:
            metrics["persistence"] = fold_metrics(kind, test.net_bps.to_numpy(), test)
        if champion is not None:
            metrics["champion"] = fold_metrics(kind, predict(champion[0], kind, test), test)
        folds.append({"fold": i, "train_start": START, "train_end": lo, "test_start": lo,
                      "test_end": hi, "rows": len(test), "metrics": metrics,
                      "champion_version": champion[1] if champion is not None else None})
        preds.append(pa.table({"window_end": test.window_end.to_list(), "fold": [i] * len(test),
                               "y_pred": predict(model, kind, test).tolist()}))
    return model, folds, pa.concat_tables(preds)


def predict(model: Any, kind: str, frame: pd.DataFrame) -> np.ndarray:
    return (model.predict_proba(x_of(frame))[:, 1] if kind == "classification"
            else model.predict(x_of(frame)))


def fold_metrics(kind: str, pred: Any, frame: pd.DataFrame) -> dict[str, float]:
    pred = np.asarray(pred, dtype=float)
    if kind == "classification":
        label = frame.label.to_numpy()
        return {"brier": float(np.mean((pred - label) ** 2)),
                "auc_pr": float(average_precision_score(label, pred))}
    return {"rmse": float(np.sqrt(np.mean((pred - frame.y.to_numpy()) ** 2)))}


def result(kind: str, model: Any, folds: list[dict[str, Any]], predictions: pa.Table,
           train: pd.DataFrame) -> dict[str, Any]:
    """A training result as the retraining job hands it over (see ml/registry.py)."""
    return {
        "model": model, "folds": folds, "predictions": predictions,
        "target": {"kind": kind, "horizon_s": HORIZON_S, "threshold_bps": 0.0,
                   "description": "net bps of the pair one bar later"},
        "data": {"start": START, "end": END, "rows": len(train),
                 "table_sha256": "0" * 64}, "train_features": x_of(train),
    }


def good_forest() -> RandomForestClassifier:
    return RandomForestClassifier(n_estimators=30, min_samples_leaf=20, random_state=0)


def shallow_forest() -> RandomForestClassifier:  # deliberately worse: depth 2
    return RandomForestClassifier(n_estimators=10, max_depth=2, random_state=0)


def boosted() -> Any:
    return make_pipeline(SimpleImputer(keep_empty_features=True),
                         GradientBoostingRegressor(n_estimators=40, random_state=0))


@pytest.fixture
def registry(settings: Settings, tmp_path: Path) -> R.RegistryConfig:
    mongo = MongoConfig.of(settings.model_copy(update={
        "mongo_db": f"ml_test_{uuid.uuid4().hex[:10]}"}))
    return R.RegistryConfig(models_dir=tmp_path / "models", mongo=mongo)


def mirror_of(registry: R.RegistryConfig, name: str) -> dict[int, dict[str, Any]]:
    """The ``models`` documents of ``name`` by version, each checked equal to its card."""
    docs = {d["version"]: d for d in R.mirrored(registry.mongo, name)}
    for v, doc in docs.items():
        card = R.read_card(registry, name, v)
        assert {k: x for k, x in doc.items() if k not in ("_id", "champion")} == card.model_dump()
    return docs


# --- the rule on chosen figures ------------------------------------------------------------------

def fake_card(kind: str, folds: list[dict[str, dict[str, float | None]]], version: int = 1,
              **target: Any) -> R.Card:
    """A card whose fold ``i`` (test window of minute ``i``) has ``folds[i]`` as metrics."""
    card = card_from_result(R.SCORER if kind == "classification" else R.REGRESSOR, {
        "model": None, "params": {}, "predictions": None,
        "target": {"kind": kind, "horizon_s": HORIZON_S, **target},
        "data": {"start": START, "end": END, "rows": 1, "table_sha256": "0" * 64},
        "folds": [{"fold": i, "test_start": START + timedelta(minutes=i),
                   "test_end": START + timedelta(minutes=i + 1), "metrics": m}
                  for i, m in enumerate(folds)]})
    return card.model_copy(update={"version": version})


def reg(model: float, persistence: float) -> dict[str, dict[str, float | None]]:
    return {"model": {"rmse": model}, "persistence": {"rmse": persistence}}


def clf(model: tuple[float, float], rule: tuple[float, float] = (0.2, 0.3),
        base: tuple[float, float] = (0.25, 0.1)) -> dict[str, dict[str, float | None]]:
    def m(pair: tuple[float, float]) -> dict[str, float | None]:
        return {"brier": pair[0], "auc_pr": pair[1]}

    return {"model": m(model), "threshold_rule": m(rule), "base_rate": m(base)}


def test_rule_regressor_needs_each_of_the_last_k_folds() -> None:
    # fold 0 loses to persistence, folds 1-3 win: promoted with K = 3, not with K = 4
    cand = fake_card("regression", [reg(9, 8), reg(4, 5), reg(4, 5), reg(4, 5)])
    assert decide(cand, None).promote and DEFAULT_K == 3
    refused = decide(cand, None, k=4)
    assert not refused.promote and refused.reason == "fold 0: does not beat persistence " \
                                                     "(RMSE 9 >= 8)"
    assert not decide(cand, None, k=5).promote  # too few folds
    assert "only 4" in decide(cand, None, k=5).reason
    tie = fake_card("regression", [reg(5, 5)] * 3)
    assert not decide(tie, None).promote  # strictly better only
    # against a champion scored on the same test windows (its own card's folds)
    champ = fake_card("regression", [reg(3.5, 5)] * 4, version=7)
    worse = decide(cand, champ)
    assert not worse.promote
    assert worse.reason.count("does not beat champion v7 (RMSE 4 >= 3.5)") == 3
    better = fake_card("regression", [reg(3, 5)] * 4, version=8)
    assert decide(better, champ).promote
    assert decide(better, champ).reason == ("beats persistence, champion v7 on each of the "
                                            "last 3 folds (1, 2, 3)")
    # the champion's figures recorded in the candidate's folds win over its own card
    recorded = fake_card("regression", [{**reg(3, 5), "champion": {"rmse": 2.0}}] * 4)
    recorded.folds[-1].champion_version = 7
    assert "fold 3: does not beat champion v7 (RMSE 3 >= 2)" in decide(recorded, champ).reason
    # no comparable champion figures, another target: not promoted
    shifted = champ.model_copy(update={"folds": [f.model_copy(update={
        "test_start": f.test_start + timedelta(hours=1)}) for f in champ.folds]})
    assert "no metrics of champion v7" in decide(better, shifted).reason
    other = fake_card("regression", [reg(3, 5)] * 4, version=9, horizon_s=5.0)
    assert "not comparable" in decide(other, champ).reason


def test_rule_classifier_brier_and_auc_pr() -> None:
    ok = fake_card("classification", [clf((0.1, 0.6))] * 3)
    assert decide(ok, None).promote
    # better Brier but worse AUC-PR than the threshold rule: not promoted
    ranking = decide(fake_card("classification", [clf((0.1, 0.25))] * 3), None)
    assert not ranking.promote and "AUC-PR 0.25 < 0.3" in ranking.reason
    # an undefined metric never beats
    assert not beats("classification", {"brier": 0.1, "auc_pr": None},
                     {"brier": 0.2, "auc_pr": 0.1})[0]
    assert beats("classification", {"brier": 0.1, "auc_pr": 0.3},
                 {"brier": 0.2, "auc_pr": 0.3})[0]  # equal AUC-PR is enough
    champ = fake_card("classification", [clf((0.09, 0.7))] * 3, version=2)
    refused = decide(ok, champ)
    assert not refused.promote and "does not beat champion v2 (Brier 0.1 not < 0.09" in \
        refused.reason
    with pytest.raises(ValueError):
        decide(ok, None, k=0)


# --- the rule on real models -------------------------------------------------------------------

def test_a_deliberately_worse_candidate_is_refused_promotion(
    registry: R.RegistryConfig, table: pd.DataFrame,
) -> None:
    """Real walk-forward on the depeg: the forest beats the fixed rule and the base rate on
    the last two folds and becomes champion (K = 2; with the default K = 3 its fold 1 loses
    to the rule on Brier). A shallow forest, scored with the champion on the same folds, is
    refused: rejected with its reason in the card and MongoDB, and the champion stays."""
    train = table[table.window_end < FOLDS[-1]]
    model, folds, preds = walk_forward(table, good_forest, "classification")
    first = result("classification", model, folds, preds, train)
    assert not decide(card_from_result(R.SCORER, first), None).promote  # K = 3
    v1, d1 = register_result(registry, R.SCORER, first, k=2)
    assert (v1, d1.promote) == (1, True), d1.reason
    assert R.champion_version(registry, R.SCORER) == 1
    champ = R.read_card(registry, R.SCORER, 1)
    assert champ.status == "champion" and champ.reason.startswith("promoted: beats "
                                                                  "threshold_rule, base_rate")

    worse, folds2, preds2 = walk_forward(table, shallow_forest, "classification",
                                         champion=(model, 1))
    v2, d2 = register_result(registry, R.SCORER, result("classification", worse, folds2,
                                                        preds2, train), k=2)
    assert (v2, d2.promote) == (2, False)
    assert "does not beat champion v1 (Brier" in d2.reason
    lost = [c for c in d2.comparisons if c["against"] == "champion v1"]
    assert len(lost) == 2 and not any(c["won"] for c in lost)
    for c in lost:
        assert c["model"]["brier"] > c["other"]["brier"]
    assert R.champion_version(registry, R.SCORER) == 1
    rejected = R.read_card(registry, R.SCORER, 2)
    assert rejected.status == "rejected" and rejected.reason == "not promoted: " + d2.reason
    docs = mirror_of(registry, R.SCORER)
    assert (docs[1]["champion"], docs[2]["champion"]) == (True, False)
    assert docs[2]["reason"] == rejected.reason

    # the regressor does not beat persistence on this slice: refused as the first version
    reg_model, reg_folds, reg_preds = walk_forward(table, boosted, "regression")
    v, d = register_result(registry, R.REGRESSOR, result("regression", reg_model, reg_folds,
                                                         reg_preds, train))
    assert not d.promote and "does not beat persistence (RMSE" in d.reason
    assert R.champion(registry, R.REGRESSOR) is None
    assert mirror_of(registry, R.REGRESSOR)[v]["status"] == "rejected"
    assert promote(registry, R.SCORER, 1).reason == "already the champion"


# --- live evaluation -------------------------------------------------------------------------

def test_psi() -> None:
    rng = np.random.default_rng(0)
    train = rng.normal(0, 1, 5000)
    ref = reference_bins(np.concatenate([train, [np.nan] * 50]))
    assert len(ref.edges) == 9 and abs(sum(ref.fractions) + ref.missing - 1) < 1e-9
    same = np.concatenate([rng.normal(0, 1, 5000), [np.nan] * 50])
    assert psi(ref, same) < 0.02
    assert psi(ref, rng.normal(1.5, 1, 5000)) > PSI_DRIFTED
    assert psi(ref, [np.nan] * 100) > PSI_DRIFTED  # everything missing is a shift too
    assert psi(ref, []) is None


def test_evaluate_live_labels_real_scores_with_the_spread_series(
    registry: R.RegistryConfig, settings: Settings, table: pd.DataFrame,
    rows: list[dict[str, Any]],
) -> None:
    """Real spreads of 04:00-06:00 in InfluxDB; a forest trained before 05:00 is champion;
    its scores of the opportunity windows of 05:00-06:00 are written to ``ml_score`` as the
    worker writes them. Two retrains evaluate them in two windows; metrics and labels equal
    an independent computation (pandas ``merge_asof``), and the feature ``hour`` (4 in
    training, 5 live) is reported drifted."""
    influx = InfluxConfig.of(settings.model_copy(update={
        "influx_db": f"ml_eval_{uuid.uuid4().hex[:10]}"}))
    ensure_database(influx)
    assert write_spreads(influx, rows) == len(rows)
    train = table[table.window_end < FOLDS[1]]
    model = good_forest().fit(x_of(train), train.label)
    card = card_from_result(R.SCORER, {**result("classification", model, [], None, train)})
    preds = pa.table({"y_pred": model.predict_proba(x_of(train))[:, 1].tolist()})
    version = R.register(registry, R.SCORER, card, model, preds)
    R.set_status(registry, R.SCORER, version, "champion", "test")
    loaded = R.load(registry, R.SCORER, features=FEATURE_NAMES)

    live = [r for r in rows if r["net_bps"] > 0 and r["window_end"] >= FOLDS[1]]
    features = np.array([online_features(r) for r in live])
    scores = loaded.model.predict_proba(features)[:, 1]
    points = [{**r, "model": R.SCORER, "version": version, "score": float(s),
               "features": dict(zip(FEATURE_NAMES, f, strict=True))}
              for r, s, f in zip(live, scores, features, strict=True)]
    assert write_ml_scores(influx, points) == len(points)

    middle = datetime(2023, 3, 11, 5, 30, tzinfo=UTC)
    [first] = evaluate_live(registry, influx, R.SCORER, until=middle)
    assert first["since"] is None and first["until"] == middle
    expect = independent(live, scores, rows, None, middle)
    assert (first["scores"], first["labeled"]) == (expect["scores"], expect["labeled"])
    assert first["labeled"] > 100 and first["unlabeled"] == first["scores"] - first["labeled"]
    assert first["metrics"]["brier"] == pytest.approx(expect["brier"])
    assert first["metrics"]["auc_pr"] == pytest.approx(expect["auc_pr"])
    assert first["metrics"]["positive_rate"] == pytest.approx(expect["positive_rate"])
    assert "hour" in first["drifted"] and first["drift"]["hour"] > PSI_DRIFTED
    assert set(first["drift"]) == set(FEATURE_NAMES)
    assert evaluate_live(registry, influx, R.SCORER, until=middle) == []  # nothing new

    [second] = evaluate_live(registry, influx, R.SCORER, until=END + timedelta(hours=1))
    latest = max(r["window_end"] for r in rows)
    cut = latest - timedelta(seconds=HORIZON_S + 5) + timedelta(milliseconds=1)
    assert second["since"] == middle and second["until"] == cut  # labels may still come
    expect = independent(live, scores, rows, middle, cut)
    assert (second["scores"], second["labeled"]) == (expect["scores"], expect["labeled"])
    assert second["metrics"]["brier"] == pytest.approx(expect["brier"])
    stored = evals(registry.mongo, R.SCORER)
    assert [d["until"] for d in stored] == [cut, middle]
    assert {k: v for k, v in stored[0].items() if k != "_id"} == second


def independent(live: list[dict[str, Any]], scores: np.ndarray, rows: list[dict[str, Any]],
                since: datetime | None, until: datetime) -> dict[str, Any]:
    """Labels by ``merge_asof`` (forward, 5 s) of each scored window at t + 60 s on the
    pair's spread rows, and the scorer's metrics on them."""
    scored = pd.DataFrame(live)[[*PAIR, "window_end"]].assign(score=scores)
    scored = scored[(scored.window_end < until)
                    & ((scored.window_end >= since) if since else True)]
    scored = scored.assign(at=scored.window_end + pd.Timedelta(seconds=HORIZON_S))
    spread = pd.DataFrame(rows)[[*PAIR, "window_end", "net_bps"]].rename(
        columns={"window_end": "at", "net_bps": "realized"})
    joined = pd.merge_asof(scored.sort_values("at"), spread.sort_values("at"), on="at",
                           by=PAIR, direction="forward", tolerance=pd.Timedelta(seconds=5))
    labeled = joined.dropna(subset=["realized"])
    label = (labeled.realized > 0).astype(float).to_numpy()
    return {"scores": len(scored), "labeled": len(labeled),
            "brier": float(np.mean((labeled.score.to_numpy() - label) ** 2)),
            "auc_pr": float(average_precision_score(label, labeled.score)),
            "positive_rate": float(label.mean())}
