"""The models and the baselines they must beat, each fitted on one training part and
predicting one test part of :mod:`ml.walkforward`.

Models (fixed seeds, so a refit on the same rows gives the same model):

* spread predictor (``y_next_bps``, bps) on every :data:`ml.table.FEATURES` column
  (``gbr``), and on the online features only (``gbr_online``: the one the alert worker can
  serve); it learns the change ``y_next_bps - net_bps`` and predicts ``net_bps`` + that
  change (:class:`ChangeRegressor`: trees cannot extrapolate a level outside the training
  range, as the depeg's spreads were):
  scikit-learn ``GradientBoostingRegressor(n_estimators=100, max_depth=5,
  learning_rate=0.1)``, and Spark MLlib ``GBTRegressor`` (``maxIter``, ``maxDepth``,
  ``stepSize`` the same; Spark bins features into ``maxBins=32`` where scikit-learn splits
  exactly);
* opportunity scorer (``y_exec``, a probability) on exactly
  :data:`arbstream.features.FEATURE_NAMES`, the features the alert worker computes online:
  ``RandomForestClassifier(n_estimators=100, max_depth=10)`` in both libraries.

Missing values (null/``nan``) are imputed with the training median: scikit-learn
``SimpleImputer`` inside a ``Pipeline`` (a column with no value in the training rows is
dropped by it), MLlib ``Imputer`` → ``VectorAssembler`` → model in a ``Pipeline`` over the
columns that have a value (MLlib's ``Imputer`` fails on an all-null column).

Baselines, on the same folds: persistence (next = now, ``net_bps``), the rolling mean
(``net_ma20``), AR(1) (statsmodels ``AutoReg`` per pair on the training part; h-step forecast
``mu + phi^h (y_t - mu)``, Hamilton 1994 §4.2); for the scorer: the training base rate, the
fixed-threshold rule (executable when net > ``min_net`` now) and a logistic regression on
``net_bps`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.classification import RandomForestClassifier as SparkRF
from pyspark.ml.feature import Imputer, VectorAssembler
from pyspark.ml.functions import vector_to_array
from pyspark.ml.regression import GBTRegressor
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.ensemble import GradientBoostingRegressor, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline as SkPipeline
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from statsmodels.tsa.ar_model import AutoReg

from arbstream.fees import BPS

#: Regression models and baselines (prediction columns ``pred_<name>``), in report order.
REGRESSORS = ("gbr", "gbr_online", "mllib_gbt", "persistence", "ma20", "ar1")
#: Classification models and baselines (``pred_<name>``: probability of ``y_exec = 1``).
CLASSIFIERS = ("rf", "mllib_rf", "base_rate", "threshold_rule", "logit_net")
#: The spread predictors' training target: the change of net bps over the horizon.
DELTA = "y_delta_bps"
#: Fewest training rows of a pair for its own AR(1); fewer: persistence.
AR_MIN_OBS = 30


@dataclass(frozen=True)
class ModelParams:
    """Hyper-parameters (defaults: the seed system's) and the seed of every random choice."""

    gbr_trees: int = 100
    gbr_depth: int = 5
    gbr_rate: float = 0.1
    rf_trees: int = 100
    rf_depth: int = 10
    seed: int = 42
    n_jobs: int = 2


class ChangeRegressor(RegressorMixin, BaseEstimator):
    """Fits ``estimator`` on the change ``y - X[anchor]`` and predicts ``X[anchor]`` + the
    predicted change, so ``predict`` gives the level (net bps at ``t + h``) from the same
    feature frame (``X`` a pandas DataFrame holding ``anchor``). scikit-learn's
    ``TransformedTargetRegressor`` transforms ``y`` alone, not by a feature."""

    def __init__(self, estimator: Any, anchor: str = "net_bps") -> None:
        self.estimator = estimator
        self.anchor = anchor

    def fit(self, X: pd.DataFrame, y: Any) -> ChangeRegressor:  # noqa: N803 (sklearn API)
        anchor = X[self.anchor].to_numpy(float)
        self.estimator_ = clone(self.estimator).fit(X, np.asarray(y, float) - anchor)
        self.feature_names_in_ = np.asarray(X.columns, dtype=object)
        self.n_features_in_ = X.shape[1]
        return self

    def predict(self, X: pd.DataFrame) -> np.ndarray:  # noqa: N803
        return X[self.anchor].to_numpy(float) + self.estimator_.predict(X)


def sklearn_regressor(p: ModelParams) -> ChangeRegressor:
    """Median imputer → ``GradientBoostingRegressor``, on the change of net bps."""
    return ChangeRegressor(make_pipeline(SimpleImputer(strategy="median"),
                                         GradientBoostingRegressor(
        n_estimators=p.gbr_trees, max_depth=p.gbr_depth, learning_rate=p.gbr_rate,
        random_state=p.seed)))


def sklearn_classifier(p: ModelParams) -> SkPipeline:
    """Median imputer → ``RandomForestClassifier``."""
    return make_pipeline(SimpleImputer(strategy="median"), RandomForestClassifier(
        n_estimators=p.rf_trees, max_depth=p.rf_depth, random_state=p.seed, n_jobs=p.n_jobs))


def _mllib(features: list[str], model) -> Pipeline:
    imputed = [f"{c}__imp" for c in features]
    return Pipeline(stages=[
        Imputer(inputCols=features, outputCols=imputed, strategy="median"),
        VectorAssembler(inputCols=imputed, outputCol="features"), model])


def present(train: DataFrame, features: list[str]) -> list[str]:
    """The columns of ``features`` with at least one non-null, non-NaN value in ``train``."""
    counts = train.select([F.count(F.nanvl(F.col(c), F.lit(None))).alias(c)
                           for c in features]).first()
    return [c for c in features if counts[c] > 0]


def with_delta(df: DataFrame) -> DataFrame:
    """``df`` with the regression target :data:`DELTA` = ``y_next_bps - net_bps``."""
    return df.withColumn(DELTA, F.col("y_next_bps") - F.col("net_bps"))


def fit_mllib_regressor(train: DataFrame, features: list[str], p: ModelParams
                        ) -> PipelineModel:
    """MLlib ``Imputer → VectorAssembler → GBTRegressor`` on ``y_next_bps``."""
    gbt = GBTRegressor(labelCol=DELTA, maxIter=p.gbr_trees, maxDepth=p.gbr_depth,
                       stepSize=p.gbr_rate, seed=p.seed)
    return _mllib(present(train, features), gbt).fit(with_delta(train))


def fit_mllib_classifier(train: DataFrame, features: list[str], p: ModelParams
                         ) -> PipelineModel:
    """MLlib ``Imputer → VectorAssembler → RandomForestClassifier`` on ``y_exec``."""
    rf = SparkRF(labelCol="y_exec", numTrees=p.rf_trees, maxDepth=p.rf_depth, seed=p.seed)
    return _mllib(present(train, features), rf).fit(train)


def mllib_predict(model: PipelineModel, test: DataFrame, name: str) -> pd.DataFrame:
    """``pair``, ``t_ms`` and ``pred_<name>``: ``net_bps`` + the predicted change of a
    regressor, or P(y = 1) of a classifier (0 when it was trained on one class, ``y = 0``)."""
    out = model.transform(test)
    pred = (F.coalesce(F.try_element_at(vector_to_array("probability"), F.lit(2)), F.lit(0.0))
            if "probability" in out.columns else F.col("net_bps") + F.col("prediction"))
    return out.select("pair", "t_ms", pred.alias(f"pred_{name}")).toPandas()


def ar1_forecast(train: pd.DataFrame, test: pd.DataFrame, h: int) -> np.ndarray:
    """AR(1) h-step forecasts of ``net_bps`` for ``test``'s rows, one ``AutoReg(1)`` per pair
    fitted on its training rows (time order); a pair with fewer than :data:`AR_MIN_OBS`
    training rows, or a non-stationary fit (|phi| >= 1), gets persistence."""
    out = test["net_bps"].to_numpy(dtype=float).copy()
    for pair, rows in test.groupby("pair", sort=False).groups.items():
        y = train.loc[train["pair"] == pair].sort_values("t_ms")["net_bps"].to_numpy(float)
        if len(y) < AR_MIN_OBS:
            continue
        const, phi = AutoReg(y, lags=1, trend="c").fit().params
        if abs(phi) >= 1:
            continue
        mu = const / (1.0 - phi)
        idx = test.index.get_indexer(rows)
        out[idx] = mu + phi ** h * (out[idx] - mu)
    return out


def classification_baselines(train: pd.DataFrame, test: pd.DataFrame, min_net: float
                             ) -> dict[str, np.ndarray]:
    """``pred_base_rate``, ``pred_threshold_rule``, ``pred_logit_net`` for ``test``'s rows."""
    y = train["y_exec"].to_numpy(int)
    rate = np.full(len(test), y.mean())
    rule = (test["net_bps"].to_numpy(float) > min_net * BPS).astype(float)
    if len(np.unique(y)) < 2:  # one class only: logistic regression is undefined
        logit = rate.copy()
    else:
        lr = make_pipeline(StandardScaler(), LogisticRegression()).fit(train[["net_bps"]], y)
        logit = lr.predict_proba(test[["net_bps"]])[:, 1]
    return {"pred_base_rate": rate, "pred_threshold_rule": rule, "pred_logit_net": logit}
