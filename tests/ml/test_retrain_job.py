"""``ml/retrain.py`` through the real ``spark-submit`` of the pyspark distribution, on the
two-day test lake, registering against the session's MongoDB and a fresh registry directory;
then everything checked from what it saved: out-of-sample times after each fold's training
end plus the purge gap; every reported metric and Diebold-Mariano p-value recomputed
independently; shuffled labels score at the base rate; determinism across processes; MLlib
and scikit-learn agree in direction; the registered versions, their cards, the promotion
decision and the MongoDB mirror; a second retrain scores the champion on its own folds."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pyspark
import pytest
from pymongo import MongoClient
from scipy import stats
from sklearn.metrics import average_precision_score, brier_score_loss

from arbstream.config import Settings
from arbstream.features import FEATURE_NAMES
from arbstream.store import models as R
from arbstream.store.config import MongoConfig
from ml import models as M
from ml.result import table_sha256
from ml.table import DATASETS, FEATURES, KEYS, LABELS, load_table
from ml.walkforward import LONGEST_WINDOW, make_folds
from testing.spark_cluster import standalone_cluster
from testing.support import REPO

P = DATASETS["iaqf"]
TREES = 10  # every ensemble of the job's run (the suite's budget; the bench runs 100)


@dataclass(frozen=True)
class Job:
    """One finished ``spark-submit ml/retrain.py``: its result directory and stdout."""

    out: Path
    stdout: str


@pytest.fixture(scope="module")
def registry(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> R.RegistryConfig:
    """A fresh registry directory and MongoDB database on the session's stack."""
    db = f"t_ml_job_{uuid.uuid4().hex[:8]}"
    with MongoClient(settings.mongo_uri.get_secret_value()) as client:
        client.drop_database(db)
    return R.RegistryConfig(models_dir=tmp_path_factory.mktemp("models"),
                            mongo=MongoConfig.of(settings.model_copy(update={"mongo_db": db})))


def submit(settings: Settings, registry: R.RegistryConfig, lake: Path, out: Path,
           *args: str, master: str = "local[2]") -> Job:
    """``spark-submit --master MASTER ml/retrain.py --lake LAKE --out OUT ARGS`` with the
    stack's settings as ``ARB_*`` variables, from an empty working directory."""
    from arbstream.shell.stack import ensure_java

    ensure_java()
    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ARB_")}
    env |= {"PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1",
            "ARB_STATE_DIR": str(out.parent / "state"),
            "ARB_MONGO_URI": settings.mongo_uri.get_secret_value(),
            "ARB_MONGO_DB": registry.mongo.db, "ARB_INFLUX_URL": settings.influx_url,
            "ARB_MODELS_DIR": str(registry.models_dir), "ARB_ML_PROMOTION_FOLDS": "2"}
    out.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [str(spark_submit), "--master", master, str(REPO / "ml" / "retrain.py"),
         "--lake", str(lake), "--out", str(out), "--k-max", "3", "--lsh-queries", "3",
         "--cluster-rows", "20000", "--lsh-rows", "5000", *args],
        cwd=out.parent, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"result: {out}" in done.stdout, done.stdout
    return Job(out, done.stdout)


@pytest.fixture(scope="module")
def job(settings: Settings, registry: R.RegistryConfig, iaqf_lake: Path,
        tmp_path_factory: pytest.TempPathFactory) -> Job:
    """The whole two-day lake, 3 folds, :data:`TREES` trees, registered (promotion K = 2)."""
    out = tmp_path_factory.mktemp("job") / "iaqf"
    return submit(settings, registry, iaqf_lake, out, "--folds", "3", "--trees", str(TREES))


@pytest.fixture(scope="module")
def saved_files(job: Job):
    return (json.loads((job.out / "result.json").read_text()),
            pd.read_parquet(job.out / "predictions.parquet"),
            pd.read_csv(job.out / "metrics.csv"))


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


def tree_hash(model) -> str:
    """sha256 of what a fitted model computes with: the imputer's medians and every tree's
    node and value arrays (pickle bytes also hold memo layout, which a joblib round trip
    changes)."""
    pipe = getattr(model, "estimator_", model)  # ChangeRegressor wraps the pipeline
    digest = hashlib.sha256(np.asarray(pipe[0].statistics_, float).tobytes())
    for tree in np.asarray(pipe[-1].estimators_, dtype=object).ravel():
        state = tree.tree_.__getstate__()
        nodes = state["nodes"]
        for field in nodes.dtype.names:  # field by field: the record's padding is not data
            digest.update(np.ascontiguousarray(nodes[field]).tobytes())
        digest.update(state["values"].tobytes())
    return digest.hexdigest()


def test_the_same_data_and_seed_give_the_same_table_hash_and_models(saved_files, job: Job,
                                                                    table) -> None:
    """This process rebuilds the table and refits two models: the same table hash and the
    same trees as the spark-submit job's."""
    summary = saved_files[0]
    assert table_sha256(table, [*KEYS, *FEATURES, *LABELS]) == summary["table_sha256"]
    params = M.ModelParams(gbr_trees=TREES, rf_trees=TREES)
    for name, fit in (("gbr", lambda: M.sklearn_regressor(params).fit(
            table[list(FEATURES)], table["y_next_bps"])),
                      ("rf", lambda: M.sklearn_classifier(params).fit(
            table[list(FEATURE_NAMES)], table["y_exec"]))):
        assert tree_hash(fit()) == tree_hash(joblib.load(job.out / f"{name}.joblib")), name


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


def _wins(kind: str, mine: dict, other: dict) -> bool:
    """One fold of the rule: RMSE lower (regressor); Brier lower and AUC-PR not lower."""
    if kind == "regression":
        return mine["rmse"] < other["rmse"]
    return mine["brier"] < other["brier"] and mine["auc_pr"] >= other["auc_pr"]


def _rule(kind: str, folds: pd.DataFrame, model: str, k: int = 2) -> bool:
    """The promotion rule recomputed from ``metrics.csv``: on each of the last ``k`` folds,
    RMSE below persistence's (regressor), or Brier below and AUC-PR at least those of the
    threshold rule and the base rate (scorer)."""
    last = sorted(folds["group"].astype(int).unique())[-k:]
    for fold in last:
        rows = folds[folds["group"].astype(int) == fold].set_index("model")
        bases = ("persistence",) if kind == "regression" else ("threshold_rule", "base_rate")
        if not all(_wins(kind, rows.loc[model], rows.loc[base]) for base in bases):
            return False
    return True


def test_the_job_registers_both_models_and_applies_the_promotion_rule(
    job: Job, registry: R.RegistryConfig, saved_files,
) -> None:
    from ml.result import REGISTERED

    summary, _, metrics = saved_files
    folds = metrics[metrics["scope"] == "fold"]
    decided = {}
    for name, (model, kind) in REGISTERED.items():
        assert R.versions(registry, name) == [1], job.stdout
        card = R.read_card(registry, name, 1)
        assert card.feature_names == list(FEATURE_NAMES)
        assert card.data.table_sha256 == summary["table_sha256"]
        assert card.data.rows == summary["rows"]
        assert [f.fold for f in card.folds] == [1, 2, 3]
        for fold in card.folds:  # the card's fold metrics are the job's metrics.csv
            assert fold.champion_version is None and "champion" not in fold.metrics
            row = folds[(folds["group"].astype(int) == fold.fold)
                        & (folds["model"] == model)].iloc[0]
            for metric, value in fold.metrics["model"].items():
                assert value == pytest.approx(row[metric], rel=1e-9), (name, fold.fold, metric)
        promoted = _rule(kind, folds[folds["task"] == kind], model)
        assert card.status == ("champion" if promoted else "rejected"), card.reason
        assert R.champion_version(registry, name) == (1 if promoted else None)
        assert f"{name}: v1: {card.reason}" in job.stdout
        docs = {d["version"]: d for d in R.mirrored(registry.mongo, name)}
        assert docs[1]["status"] == card.status and docs[1]["champion"] == promoted
        decided[name] = promoted
        if promoted:  # on the last K = 2 folds (ARB_ML_PROMOTION_FOLDS), not all 3
            assert "each of the last 2 folds (2, 3)" in card.reason, card.reason
        if promoted:  # the champion loads, its artifact is the job's model file
            loaded = R.load(registry, name, features=list(FEATURE_NAMES))
            assert R.file_sha256(loaded.path / R.MODEL_FILE) == R.file_sha256(
                job.out / f"{model}.joblib")
            if kind == "classification":  # the scorer's MLlib twin is registered with it
                assert loaded.mllib_path is not None
                assert (loaded.mllib_path / "metadata").is_dir()
    assert any(decided.values()), f"the job promoted nothing: {decided}"


def test_a_second_retrain_scores_the_champion_on_its_own_folds(
    job: Job, settings: Settings, registry: R.RegistryConfig, iaqf_lake: Path,
    tmp_path: Path,
) -> None:
    """Run the job again, on a Spark standalone cluster (a master and a worker started from
    the pyspark distribution: the command a real cluster takes), on the depeg day alone with
    3 trees: each new version's folds carry the current champion's metrics on the same test
    rows, recomputed here from the champion's model and the job's saved features; the
    decision follows the rule."""
    from ml.result import REGISTERED

    champions = {name: R.load(registry, name, features=list(FEATURE_NAMES))
                 for name in REGISTERED if R.champion_version(registry, name) is not None}
    assert champions
    with standalone_cluster(tmp_path / "cluster") as master:
        again = submit(settings, registry, iaqf_lake, tmp_path / "again", "--start",
                       "2023-03-10", "--end", "2023-03-10", "--folds", "2", "--trees", "3",
                       "--no-cluster", master=master)
        apps = list((tmp_path / "cluster" / "work").glob("app-*/*/stderr"))
    assert apps, "no executor ran on the cluster's worker"
    assert json.loads((again.out / "result.json").read_text())["cluster"] == {}  # --no-cluster
    preds = pd.read_parquet(again.out / "predictions.parquet")
    x = preds[list(FEATURE_NAMES)]
    for name, champ in champions.items():
        kind = REGISTERED[name][1]
        card = R.read_card(registry, name, 2)
        scores = (champ.model.predict_proba(x)[:, 1] if kind == "classification"
                  else champ.model.predict(x))
        for fold in card.folds:
            assert fold.champion_version == champ.card.version == 1
            rows = (preds["fold"] == fold.fold).to_numpy()
            got, p = fold.metrics["champion"], scores[rows]
            if kind == "classification":
                y = preds.loc[rows, "y_exec"].to_numpy(int)
                expect = {"brier": brier_score_loss(y, p),
                          "auc_pr": average_precision_score(y, p)}
            else:
                e = p - preds.loc[rows, "y_next_bps"].to_numpy(float)
                expect = {"rmse": np.sqrt(np.mean(e ** 2)), "mae": np.mean(np.abs(e))}
            for metric, value in expect.items():
                assert got[metric] == pytest.approx(value, rel=1e-9), (name, fold.fold, metric)
        others = ("champion", *(("persistence",) if kind == "regression"
                                else ("threshold_rule", "base_rate")))
        wins = all(_wins(kind, f.metrics["model"], f.metrics[o])
                   for f in card.folds for o in others)
        assert card.status == ("champion" if wins else "rejected"), card.reason
        assert R.champion_version(registry, name) == (2 if wins else 1)
        assert f"{name}: v2: {card.reason}" in again.stdout


def test_kmeans_silhouette_recomputes_from_the_saved_models(spark, saved_files, job: Job,
                                                            table) -> None:
    """The job's KMeans (k by silhouette) applied here with numpy: the saved imputer medians,
    scaler and centres; scikit-learn's silhouette (squared Euclidean, as Spark's
    ``ClusteringEvaluator``) on a fresh sample is close to the reported one."""
    from pyspark.ml import PipelineModel
    from pyspark.ml.clustering import KMeansModel
    from sklearn.metrics import silhouette_score

    summary = saved_files[0]["cluster"]
    scores = {int(k): v for k, v in summary["silhouettes"].items()}
    assert sorted(scores) == [2, 3] and summary["k"] == max(scores, key=scores.get)
    assert 0.0 <= summary["recall_at_10"] <= 1.0 and summary["rows"] > 10_000
    prep = PipelineModel.load(str(job.out / "mllib" / "cluster_prep"))
    imputer, _, scaler = prep.stages
    medians = imputer.surrogateDF.first().asDict()
    cols = summary["features"]
    x = table[cols].astype(float).fillna({c: medians[c] for c in cols}).to_numpy()
    std = scaler.std.toArray()  # Spark's scaler maps a constant column to 0
    z = np.where(std > 0, (x - scaler.mean.toArray()) / np.where(std > 0, std, 1.0), 0.0)
    centres = np.array(KMeansModel.load(str(job.out / "mllib" / "kmeans")).clusterCenters())
    assert centres.shape == (summary["k"], len(cols))
    labels = ((z[:, None, :] - centres[None]) ** 2).sum(axis=2).argmin(axis=1)
    assert len(np.unique(labels)) == summary["k"]
    pick = np.random.default_rng(1).choice(len(z), 4000, replace=False)
    ours = silhouette_score(z[pick], labels[pick], metric="sqeuclidean")
    assert ours == pytest.approx(scores[summary["k"]], abs=0.05), (ours, scores)


def test_the_models_notebook_on_the_registered_versions(
    job: Job, registry: R.RegistryConfig, data_dir: Path, tmp_path: Path,
) -> None:
    """Notebook 3 (``notebooks/03_models.py``) on version 1 of both models the job
    registered, its held-out rows from a lake of 2023-03-11 00:00-03:00 (after the training
    data): every number re-derived by ``tests/notebooks/test_nb03_models.py``."""
    from datetime import UTC, datetime

    from testing.notebooks import run_notebook
    from tests.conftest import build_lake
    from tests.notebooks.test_nb03_models import SOURCE, check_models_notebook

    lake = build_lake(tmp_path / "lake", data_dir, datetime(2023, 3, 11, tzinfo=UTC),
                      datetime(2023, 3, 11, 3, tzinfo=UTC))
    params = {"version": 1, "max_heldout_rows": 2000, "n_repeats": 3, "seed": 0}
    results = run_notebook(SOURCE, tmp_path / "nb", {
        **params, "registry_dir": str(registry.models_dir), "lake_dir": str(lake)})
    check_models_notebook(results, tmp_path / "nb", registry.models_dir, lake, params[
        "version"], params["max_heldout_rows"], params["n_repeats"], params["seed"])
