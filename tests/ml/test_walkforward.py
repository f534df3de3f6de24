"""Walk-forward evaluation, checked from what the job saved: out-of-sample times after each
fold's training end plus the purge gap; every reported metric and Diebold-Mariano p-value
recomputed independently; shuffled labels score at the base rate; determinism; MLlib and
scikit-learn agree in direction."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, brier_score_loss

from arbstream.features import FEATURE_NAMES
from ml import models as M
from ml.result import table_sha256
from ml.table import DATASETS, FEATURES, KEYS, LABELS, load_table
from ml.walkforward import LONGEST_WINDOW, make_folds

P = DATASETS["iaqf"]


@pytest.fixture(scope="module")
def saved_files(saved):
    _, out = saved
    return (json.loads((out / "result.json").read_text()),
            pd.read_parquet(out / "predictions.parquet"), pd.read_csv(out / "metrics.csv"))


def test_every_out_of_sample_time_is_after_its_folds_training_end_plus_gap(saved_files
                                                                           ) -> None:
    summary, preds, _ = saved_files
    gap = summary["params"]["gap_ms"]
    assert gap == (P.horizon_steps + LONGEST_WINDOW) * P.step_ms
    folds = {f["index"]: f for f in summary["folds"]}
    assert sorted(folds) == sorted(preds["fold"].unique()) == [1, 2, 3]
    for index, rows in preds.groupby("fold"):
        assert (rows["t_ms"] > folds[index]["train_end"] + gap).all()
    assert set(preds["regime"]) == {"before", "during"}


def _dm_p(d: np.ndarray, h: int) -> float:
    """Diebold-Mariano (1995) with rectangular HAC (h - 1 lags), HLN (1997) correction."""
    n, dbar = len(d), d.mean()
    gamma = [np.sum((d[k:] - dbar) * (d[:n - k] - dbar)) / n for k in range(h)]
    dm = dbar / np.sqrt((gamma[0] + 2 * sum(gamma[1:])) / n)
    dm *= np.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
    return 2 * stats.t.sf(abs(dm), n - 1)


def _ece(y: np.ndarray, p: np.ndarray) -> float:
    counts, edges = np.histogram(p, bins=10, range=(0, 1))
    which = np.clip(np.digitize(p, edges[1:-1]), 0, 9)
    return sum(abs(y[which == b].mean() - p[which == b].mean()) * counts[b]
               for b in range(10) if counts[b]) / len(y)


def test_every_reported_metric_recomputes_from_the_saved_predictions(saved_files) -> None:
    _, preds, metrics = saved_files
    groups = {("fold", str(k)): g for k, g in preds.groupby("fold")}
    groups |= {("regime", k): g for k, g in preds.groupby("regime")}
    groups[("all", "all")] = preds
    checked = 0
    for (scope, group), rows in groups.items():
        got = metrics[(metrics["scope"] == scope) & (metrics["group"].astype(str) == group)]
        got = got.set_index("model")
        y = rows["y_next_bps"].to_numpy()
        e0 = rows["pred_persistence"].to_numpy() - y
        for model in M.REGRESSORS:
            e = rows[f"pred_{model}"].to_numpy() - y
            expect = {"mae": np.abs(e).mean(), "rmse": np.sqrt((e ** 2).mean()),
                      "skill": 1 - (e ** 2).mean() / (e0 ** 2).mean()}
            if model != "persistence":
                d = (pd.DataFrame({"t": rows["t_ms"], "d": e ** 2 - e0 ** 2})
                     .groupby("t")["d"].mean().sort_index().to_numpy())
                expect["dm_p"] = _dm_p(d, P.horizon_steps)
            for k, v in expect.items():
                assert got.loc[model, k] == pytest.approx(v, rel=1e-6, abs=1e-12), (
                    scope, group, model, k)
                checked += 1
        yc = rows["y_exec"].to_numpy().astype(int)
        for model in M.CLASSIFIERS:
            p = rows[f"pred_{model}"].to_numpy()
            expect = {"brier": brier_score_loss(yc, p), "ece": _ece(yc, p),
                      "positive_rate": yc.mean()}
            if yc.any():
                expect["auc_pr"] = average_precision_score(yc, p)
            for k, v in expect.items():
                assert got.loc[model, k] == pytest.approx(v, rel=1e-6, abs=1e-12), (
                    scope, group, model, k)
                checked += 1
    assert checked > 200


@pytest.fixture(scope="module")
def table(spark, iaqf_lake) -> pd.DataFrame:
    sdf = load_table(spark, str(iaqf_lake), P).dropna(subset=list(LABELS))
    return sdf.toPandas().sort_values(["t_ms", "pair"], ignore_index=True)


def test_a_scorer_on_shuffled_labels_scores_at_the_base_rate(table) -> None:
    shuffled = table.assign(y_exec=np.random.default_rng(0).permutation(table["y_exec"]))
    folds = make_folds(shuffled["t_ms"].to_numpy(), 3, 21 * P.step_ms)
    params = M.ModelParams(rf_trees=30)
    for fold in folds:
        train = shuffled[shuffled["t_ms"] <= fold.train_end]
        test = shuffled[shuffled["t_ms"].between(fold.test_start, fold.test_end)]
        rf = M.sklearn_classifier(params).fit(train[list(FEATURE_NAMES)], train["y_exec"])
        ap = average_precision_score(test["y_exec"],
                                     rf.predict_proba(test[list(FEATURE_NAMES)])[:, 1])
        rate = test["y_exec"].mean()
        assert abs(ap - rate) < 0.25 * rate + 0.005, (fold, ap, rate)


def test_the_same_data_and_seed_give_the_same_table_hash_and_models(saved, table) -> None:
    result, _ = saved
    assert table_sha256(table, [*KEYS, *FEATURES, *LABELS]) == result.table_sha256
    params = M.ModelParams(gbr_trees=10, rf_trees=10)
    for name, fit in (("gbr", lambda: M.sklearn_regressor(params).fit(
            table[list(FEATURES)], table["y_next_bps"])),
                      ("rf", lambda: M.sklearn_classifier(params).fit(
            table[list(FEATURE_NAMES)], table["y_exec"]))):
        again = pickle.dumps(fit(), protocol=5)
        assert again == pickle.dumps(result.sklearn_models[name], protocol=5), name


def test_mllib_and_sklearn_agree_in_direction(saved_files) -> None:
    _, preds, _ = saved_files
    change = preds[["pred_gbr", "pred_mllib_gbt"]].sub(preds["net_bps"], axis=0)
    moved = (change.abs() > 1.0).all(axis=1)
    agree = (np.sign(change.loc[moved, "pred_gbr"]) == np.sign(
        change.loc[moved, "pred_mllib_gbt"])).mean()
    assert moved.sum() > 100 and agree > 0.7, agree
    rho, p = stats.spearmanr(preds["pred_rf"], preds["pred_mllib_rf"])
    assert rho > 0 and p < 1e-3, (rho, p)
    positive = preds["y_exec"] == 1
    for model in ("pred_rf", "pred_mllib_rf"):  # both rank the executable windows higher
        assert preds.loc[positive, model].mean() > preds.loc[~positive, model].mean(), model


def test_the_result_makes_registry_cards_with_the_champion_scored_on_the_same_folds(saved
                                                                                     ) -> None:
    from ml.registry import card_from_result
    from ml.result import REGISTERED

    result, _ = saved
    for name, (model, task) in REGISTERED.items():
        champ = result.champion_scores(result.sklearn_models[model], 1, task, 1)
        card = card_from_result(name, result.registry_result(name, 60.0, 0.0, None, champ))
        assert card.feature_names == list(FEATURE_NAMES)
        assert card.data.table_sha256 == result.table_sha256
        assert [f.fold for f in card.folds] == [1, 2, 3]
        for fold in card.folds:
            assert fold.champion_version == 1
            assert set(fold.metrics) >= {"model", "champion"}
            assert all(v is not None for v in fold.metrics["model"].values() if task ==
                       "regression")
