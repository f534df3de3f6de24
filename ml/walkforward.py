"""Walk-forward evaluation in time, with a purge gap, and the metrics of every model and
baseline on the out-of-sample predictions.

**Folds** (expanding window; not Spark's ``CrossValidator``, which splits at random): the
table's distinct window ends, in order, are cut into ``K + 1`` blocks of equal count; fold
``k = 1..K`` tests on block ``k`` and trains on every row with ``t < first test time - gap``,
``gap = (h + 20) steps`` by default (the label horizon plus the longest feature window), so
no training label or feature window reaches into the test block and every test time is
``> last training time + gap``.

**Metrics.** Spread predictor: MAE and RMSE (bps), skill vs persistence ``1 - MSE_model /
MSE_persistence`` (Murphy 1988), and the Diebold-Mariano test of equal squared-error loss vs
persistence (Diebold & Mariano 1995, JBES 13(3)): the loss differential ``d_t`` is averaged
over the pairs of each window end (the pairs of one time are not independent), ``DM =
mean(d) / sqrt(V / n)`` with ``V`` the HAC long-run variance of ``d`` with ``h - 1`` lags and
the rectangular kernel (statsmodels OLS on a constant, ``cov_type="HAC"``), the Harvey,
Leybourne & Newbold (1997, IJF 13(2)) correction ``DM* = DM sqrt((n + 1 - 2h + h(h-1)/n) /
n)``, two-sided p-value from Student's t with ``n - 1`` degrees of freedom. A negative
statistic means the model's loss is lower. Opportunity scorer: AUC-PR (scikit-learn
``average_precision_score``), Brier score, and the expected calibration error over 10 equal
bins of ``[0, 1]`` (Naeini et al. 2015: ``sum_b n_b / N |mean(y)_b - mean(p)_b|``).

Metrics are reported per fold, per regime of the USDC depeg (:func:`ml.table.regime`, pooled
over folds) and over all out-of-sample rows.
"""

from __future__ import annotations

import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pandas as pd
import statsmodels.api as sm
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from scipy import stats
from sklearn.metrics import average_precision_score, brier_score_loss
from tqdm import tqdm

from arbstream.features import FEATURE_NAMES
from ml import models as M
from ml.table import FEATURES, KEYS, LABELS

#: The longest feature window, steps (``net_ma20``, ``mid_ma20``).
LONGEST_WINDOW = 20


@dataclass(frozen=True)
class Fold:
    """One walk-forward fold; times are UTC ms of window ends."""

    index: int
    train_end: int  # last training time
    test_start: int
    test_end: int


def make_folds(times: np.ndarray, k: int, gap_ms: int) -> list[Fold]:
    """``k`` expanding-window folds over the distinct ``times`` (UTC ms), each with at least
    ``gap_ms`` between its last training time and its first test time.

    Raises:
        ValueError: fewer than ``k + 1`` distinct times, or a fold left with no training time.
    """
    uniq = np.unique(times)
    if len(uniq) < k + 1:
        raise ValueError(f"{len(uniq)} distinct times cannot make {k} folds")
    blocks = np.array_split(uniq, k + 1)
    folds = []
    for i, block in enumerate(blocks[1:], 1):
        train = uniq[uniq < block[0] - gap_ms]
        if not len(train):
            raise ValueError(f"fold {i}: no training time {gap_ms} ms before {block[0]}")
        folds.append(Fold(i, int(train[-1]), int(block[0]), int(block[-1])))
    return folds


def diebold_mariano(d: np.ndarray, h: int) -> tuple[float, float]:
    """HLN-corrected Diebold-Mariano statistic and two-sided p-value of the loss
    differential series ``d`` (time order), forecast horizon ``h`` steps; ``nan`` when ``d``
    has fewer than 3 values or no variance."""
    d = np.asarray(d, dtype=float)
    n = len(d)
    if n < 3 or np.allclose(d, d[0]):
        return float("nan"), float("nan")
    fit = sm.OLS(d, np.ones(n)).fit(cov_type="HAC", cov_kwds={
        "maxlags": h - 1, "kernel": "uniform", "use_correction": False})
    dm = float(fit.params[0] / fit.bse[0])
    dm *= np.sqrt((n + 1 - 2 * h + h * (h - 1) / n) / n)
    return dm, float(2 * stats.t.sf(abs(dm), df=n - 1))


def ece(y: np.ndarray, p: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-width bins of ``[0, 1]``."""
    edges = np.linspace(0.0, 1.0, bins + 1)  # bin b = [edges[b], edges[b + 1]), last closed
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    total = 0.0
    for b in np.unique(idx):
        sel = idx == b
        total += sel.sum() * abs(np.mean(y[sel]) - np.mean(p[sel]))
    return total / len(y)


def regression_metrics(rows: pd.DataFrame, model: str, h: int) -> dict[str, float]:
    """MAE, RMSE, skill and DM vs persistence of ``pred_<model>`` on ``rows``."""
    y = rows["y_next_bps"].to_numpy(float)
    e = rows[f"pred_{model}"].to_numpy(float) - y
    e0 = rows["pred_persistence"].to_numpy(float) - y
    d = pd.Series(e ** 2 - e0 ** 2).groupby(rows["t_ms"].to_numpy()).mean().sort_index()
    dm, p = diebold_mariano(d.to_numpy(), h)
    mse0 = float(np.mean(e0 ** 2))
    return {"mae": float(np.mean(np.abs(e))), "rmse": float(np.sqrt(np.mean(e ** 2))),
            "skill": 1.0 - float(np.mean(e ** 2)) / mse0 if mse0 > 0 else float("nan"),
            "dm_stat": dm, "dm_p": p}


def classification_metrics(rows: pd.DataFrame, model: str) -> dict[str, float]:
    """AUC-PR (``nan`` without a positive), Brier score, ECE of ``pred_<model>``."""
    y = rows["y_exec"].to_numpy(int)
    p = rows[f"pred_{model}"].to_numpy(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ap = float(average_precision_score(y, p)) if y.any() else float("nan")
    return {"positive_rate": float(y.mean()), "auc_pr": ap,
            "brier": float(brier_score_loss(y, p, labels=[0, 1])), "ece": ece(y, p)}


def metric_table(preds: pd.DataFrame, h: int) -> pd.DataFrame:
    """Every model's metrics per fold, per regime and over all rows: one row per (scope,
    group, task, model) with ``n`` and the task's metrics."""
    out = []
    scopes = [("fold", preds.groupby("fold")), ("regime", preds.groupby("regime")),
              ("all", [("all", preds)])]
    for scope, groups in scopes:
        for group, rows in groups:
            for model in M.REGRESSORS:
                out.append({"scope": scope, "group": str(group), "task": "regression",
                            "model": model, "n": len(rows),
                            **regression_metrics(rows, model, h)})
            for model in M.CLASSIFIERS:
                out.append({"scope": scope, "group": str(group), "task": "classification",
                            "model": model, "n": len(rows),
                            **classification_metrics(rows, model)})
    return pd.DataFrame(out)


def proba(model, x: pd.DataFrame) -> np.ndarray:
    """P(y = 1) from a fitted scikit-learn classifier (0 or 1 when it saw one class)."""
    classes = list(model.classes_)
    p = model.predict_proba(x)
    return p[:, classes.index(1)] if 1 in classes else np.zeros(len(x))


def _fit_sklearn(train: pd.DataFrame, p: M.ModelParams) -> tuple:
    """The scikit-learn spread predictors (all features, online ones) and opportunity scorer
    fitted on ``train``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # all-null columns dropped
        y, online = train["y_next_bps"], list(FEATURE_NAMES)
        return (M.sklearn_regressor(p).fit(train[list(FEATURES)], y),
                M.sklearn_regressor(p).fit(train[online], y),
                M.sklearn_classifier(p).fit(train[online], train["y_exec"]))


def fit_models(train: pd.DataFrame, s_train: DataFrame, p: M.ModelParams) -> dict:
    """The four models fitted on the same rows (``train`` in pandas, ``s_train`` in Spark):
    ``gbr``, ``gbr_online``, ``rf`` (scikit-learn), ``mllib_gbt``, ``mllib_rf`` (PipelineModels).
    scikit-learn (one core, the GIL released in its tree code) runs in a thread while MLlib
    uses the JVM's."""
    with ThreadPoolExecutor(1) as pool:
        local = pool.submit(_fit_sklearn, train, p)
        gbt = M.fit_mllib_regressor(s_train, list(FEATURES), p)
        mrf = M.fit_mllib_classifier(s_train, list(FEATURE_NAMES), p)
        gbr, gbr_online, rf = local.result()
    return {"gbr": gbr, "gbr_online": gbr_online, "rf": rf, "mllib_gbt": gbt,
            "mllib_rf": mrf}


def run_folds(table: pd.DataFrame, spark_table: DataFrame, folds: list[Fold],
              p: M.ModelParams, h: int, min_net: float, progress: bool = True
              ) -> pd.DataFrame:
    """Fit every model and baseline per fold; the out-of-sample predictions.

    Args:
        table: the labelled training table (pandas, rows with both labels).
        spark_table: the same rows as a (cached) Spark DataFrame, for MLlib.
        folds: from :func:`make_folds`.
        p: hyper-parameters. h: horizon, steps. min_net: executable threshold, fraction.

    Returns:
        :data:`ml.table.KEYS`, ``fold``, the online features (to score other models on the
        same rows, e.g. the registry's champion), the labels and ``pred_<name>`` of every
        model in :data:`ml.models.REGRESSORS` and :data:`ml.models.CLASSIFIERS`, sorted by
        ``(t_ms, pair)``.
    """
    parts = []
    for fold in tqdm(folds, desc="walk-forward folds", file=sys.stderr, disable=not progress):
        train = table[table["t_ms"] <= fold.train_end]
        test = table[(table["t_ms"] >= fold.test_start) & (table["t_ms"] <= fold.test_end)]
        out = test[[*KEYS, *FEATURE_NAMES, *LABELS]].assign(fold=fold.index).reset_index(
            drop=True)
        s_test = spark_table.where(F.col("t_ms").between(fold.test_start, fold.test_end))
        fitted = fit_models(train, spark_table.where(F.col("t_ms") <= fold.train_end), p)
        out["pred_gbr"] = fitted["gbr"].predict(test[list(FEATURES)])
        out["pred_gbr_online"] = fitted["gbr_online"].predict(test[list(FEATURE_NAMES)])
        out["pred_rf"] = proba(fitted["rf"], test[list(FEATURE_NAMES)])
        for name in ("mllib_gbt", "mllib_rf"):
            pred = M.mllib_predict(fitted[name], s_test, name)
            out = out.merge(pred, on=["pair", "t_ms"], how="left")
        out["pred_persistence"] = out["net_bps"]
        out["pred_ma20"] = test["net_ma20"].to_numpy()
        out["pred_ar1"] = M.ar1_forecast(train, test.reset_index(drop=True), h)
        for name, values in M.classification_baselines(train, test, min_net).items():
            out[name] = values
        parts.append(out)
    return pd.concat(parts, ignore_index=True).sort_values(["t_ms", "pair"],
                                                           ignore_index=True)
