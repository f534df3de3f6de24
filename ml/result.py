"""What one retraining run produced (:class:`TrainingResult`), its hashes, and how it is
kept: registered in the model registry (:mod:`ml.registry`) as the opportunity scorer and
the net-bps regressor the alert worker serves, and always written to a directory.

Hashes:

* **training table**: sha256 of the table's canonical Arrow serialization: the labelled rows
  sorted by ``(t_ms, pair)``, the columns of :data:`ml.table.KEYS`, :data:`ml.table.FEATURES`
  and :data:`ml.table.LABELS` in that order, no schema metadata, one contiguous chunk written
  as an Arrow IPC stream in record batches of :data:`HASH_BATCH` rows (the same rows give the
  same bytes whatever Spark's partitioning was);
* **feature schema**: :func:`arbstream.store.models.feature_schema_hash`, sha256 of the
  ordered ``[[name, type], ...]`` list as compact JSON.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from arbstream.features import FEATURE_NAMES
from arbstream.records import finite_or_none
from ml.walkforward import Fold, classification_metrics, proba, regression_metrics

#: Rows per record batch of the canonical serialization.
HASH_BATCH = 65_536
#: Registry names and (model, who in the fold metrics) of what the alert worker serves.
REGISTERED = {"opportunity_scorer": ("rf", "classification"),
              "net_bps_regressor": ("gbr_online", "regression")}
#: Baselines the registry's promotion rule compares against, by task.
REGISTRY_BASELINES = {"regression": ("persistence",),
                      "classification": ("threshold_rule", "base_rate")}
REGISTRY_METRICS = {"regression": ("rmse", "mae"), "classification": ("brier", "auc_pr")}


def table_sha256(table: pd.DataFrame, columns: list[str]) -> str:
    """sha256 (hex) of ``table[columns]`` in its canonical Arrow form (module docstring)."""
    rows = table.sort_values(["t_ms", "pair"], kind="stable", ignore_index=True)[columns]
    arrow = pa.Table.from_pandas(rows, preserve_index=False).replace_schema_metadata(None)
    arrow = arrow.combine_chunks()
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, arrow.schema) as writer:
        writer.write_table(arrow, max_chunksize=HASH_BATCH)
    return hashlib.sha256(sink.getvalue().to_pybytes()).hexdigest()


def model_sha256(model: Any) -> str:
    """sha256 (hex) of a fitted scikit-learn model's pickle bytes (protocol 5)."""
    return hashlib.sha256(pickle.dumps(model, protocol=5)).hexdigest()


@dataclass
class TrainingResult:
    """One retraining run: data, parameters, versions, evaluation and fitted models.

    ``metrics`` is :func:`ml.walkforward.metric_table`; ``predictions`` the out-of-sample
    rows of :func:`ml.walkforward.run_folds`; ``sklearn_models`` and ``mllib_models`` the
    models refitted on every labelled row; ``cluster`` the summary of
    :meth:`ml.cluster.ClusterResult.summary`; ``seconds`` wall time per step.
    """

    dataset: str
    table_sha256: str
    feature_schema_hash: str
    features: list[str]
    data_start: pd.Timestamp
    data_end: pd.Timestamp
    rows: int
    params: dict[str, Any]
    libraries: dict[str, str]
    code_version: str
    folds: list[Fold]
    metrics: pd.DataFrame
    predictions: pd.DataFrame
    sklearn_models: dict[str, Any] = field(repr=False)
    mllib_models: dict[str, Any] = field(repr=False)
    cluster: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    train_online: np.ndarray | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """Everything but the tables and models, JSON-ready."""
        return {
            "dataset": self.dataset, "table_sha256": self.table_sha256,
            "feature_schema_hash": self.feature_schema_hash, "features": self.features,
            "data_start": self.data_start.isoformat(), "data_end": self.data_end.isoformat(),
            "rows": self.rows, "params": self.params, "libraries": self.libraries,
            "code_version": self.code_version, "folds": [vars(f) for f in self.folds],
            "sklearn_sha256": {k: model_sha256(m) for k, m in self.sklearn_models.items()},
            "cluster": self.cluster, "seconds": self.seconds,
        }

    def save(self, directory: Path) -> Path:
        """Write ``result.json``, ``metrics.csv``, ``predictions.parquet``, the scikit-learn
        models (``<name>.joblib``) and the MLlib ones (``mllib/<name>/``) under
        ``directory`` (replaced if it exists); return it."""
        directory = Path(directory)
        if directory.exists():
            shutil.rmtree(directory)
        directory.mkdir(parents=True)
        (directory / "result.json").write_text(json.dumps(self.summary(), indent=2,
                                                          default=str))
        self.metrics.to_csv(directory / "metrics.csv", index=False)
        pq.write_table(pa.Table.from_pandas(self.predictions, preserve_index=False),
                       directory / "predictions.parquet")
        for name, model in self.sklearn_models.items():
            joblib.dump(model, directory / f"{name}.joblib")
        for name, model in self.mllib_models.items():
            model.write().overwrite().save(str(directory / "mllib" / name))
        return directory

    def fold_metrics(self, model: str, task: str, champion: tuple[int, dict] | None = None
                     ) -> list[dict[str, Any]]:
        """The registry's per-fold records of ``model`` (``model``) and its baselines, and
        ``champion`` = (its version, metrics per fold index) when a champion was scored."""
        m = self.metrics[(self.metrics["scope"] == "fold") & (self.metrics["task"] == task)]
        out = []
        for fold in self.folds:
            rows = m[m["group"] == str(fold.index)].set_index("model")
            pick = {"model": model, **{b: b for b in REGISTRY_BASELINES[task]}}
            out.append({
                "fold": fold.index, "train_start": self.data_start.to_pydatetime(),
                "train_end": pd.Timestamp(fold.train_end, unit="ms", tz="UTC"),
                "test_start": pd.Timestamp(fold.test_start, unit="ms", tz="UTC"),
                "test_end": pd.Timestamp(fold.test_end, unit="ms", tz="UTC"),
                "rows": int(rows["n"].iloc[0]) if len(rows) else 0,
                "metrics": {who: {k: finite_or_none(rows.loc[name, k])
                                  for k in REGISTRY_METRICS[task]}
                            for who, name in pick.items()},
            })
            if champion is not None:
                out[-1]["champion_version"] = champion[0]
                out[-1]["metrics"]["champion"] = {
                    k: finite_or_none(champion[1][fold.index][k]) for k in REGISTRY_METRICS[task]}
        return out

    def champion_scores(self, model: Any, version: int, task: str, h: int
                        ) -> tuple[int, dict[int, dict[str, float]]]:
        """The registry's current champion ``model`` scored on every fold's out-of-sample
        rows (the promotion rule compares the candidate with it on the same rows)."""
        x = self.predictions[list(FEATURE_NAMES)]
        pred = proba(model, x) if task == "classification" else model.predict(x)
        rows = self.predictions.assign(pred_champion=pred)
        score = ((lambda r: classification_metrics(r, "champion")) if task == "classification"
                 else (lambda r: regression_metrics(r, "champion", h)))
        return version, {int(k): score(r) for k, r in rows.groupby("fold")}

    def registry_result(self, name: str, horizon_s: float, threshold_bps: float,
                        mllib_dir: Path | None, champion: tuple[int, dict] | None = None
                        ) -> dict[str, Any]:
        """The dict :func:`ml.registry.register_result` takes for ``name`` (a key of
        :data:`REGISTERED`), with the champion's fold metrics when given."""
        model, task = REGISTERED[name]
        what = ("P(net spread at t + L > threshold): still executable after the latency"
                if task == "classification" else "net spread at t + h, bps")
        return {
            "model": self.sklearn_models[model],
            "target": {"kind": task, "horizon_s": horizon_s, "threshold_bps": threshold_bps,
                       "description": what},
            "data": {"start": self.data_start.to_pydatetime(),
                     "end": self.data_end.to_pydatetime(), "rows": self.rows,
                     "table_sha256": self.table_sha256},
            "folds": self.fold_metrics(model, task, champion),
            "predictions": pa.Table.from_pandas(self.predictions, preserve_index=False),
            "features": list(FEATURE_NAMES), "train_features": self.train_online,
            "params": self.sklearn_models[model].get_params(deep=False) | self.params,
            "mllib_dir": mllib_dir if task == "classification" else None,
            "code_version": self.code_version, "libraries": self.libraries,
        }
