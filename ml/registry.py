"""The retraining job's side of the model registry: a training result becomes a card and a
registered version (then the promotion rule decides), and the scores the alert worker logged
since the last retrain are labeled with what happened and evaluated (MongoDB ``ml_eval``).

**Training result** (a dict, what the trainer hands to :func:`register_result`):

============== ==========================================================================
key            value
============== ==========================================================================
``model``      the fitted scikit-learn estimator (pickled with joblib)
``target``     ``{"kind": "classification"|"regression", "horizon_s": L or h in seconds,
               "threshold_bps": label threshold (classification), "description": ...}``
``data``       ``{"start", "end"`` (aware datetimes, event time), ``"rows"``, and
               ``"table_sha256"`` or ``"table_path"`` (a file or a Parquet directory,
               hashed here)``}``
``folds``      walk-forward folds, each ``{"fold", "train_start", "train_end", "test_start",
               "test_end", "rows", "metrics": {"model": {...}, <baseline>: {...},
               "champion": {...}}, "champion_version"}``; metrics ``rmse``, ``mae`` (bps),
               ``brier``, ``auc_pr``; baselines as :data:`ml.promotion.BASELINES`
``predictions`` out-of-sample predictions, a ``pyarrow.Table``
``features``   optional: the ordered feature names or ``(name, type)`` pairs (default
               :data:`arbstream.features.FEATURE_NAMES`, all ``float``)
``train_features`` optional: the training rows' feature matrix (rows x features, NaN =
               missing), for the drift reference (:func:`reference_bins`)
``params``     optional: hyper-parameters (default ``model.get_params()``; non-JSON values
               as their ``repr``)
``mllib_dir``  optional: a saved MLlib ``PipelineModel`` directory
``code_version``, ``libraries`` optional: default ``git describe --always --dirty`` and
               the installed versions of the ML libraries
============== ==========================================================================

**Live evaluation** (:func:`evaluate_live`): the ``ml_score`` points of a model since the
last evaluation are labeled with the realized net spread of their pair at ``t + horizon_s``
(the first ``spread`` point of the pair in ``[t + h, t + h + tolerance]``); scores whose
label may still arrive are left for the next run.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import math
import platform
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from arbstream.features import FEATURE_NAMES
from arbstream.store.config import InfluxConfig
from arbstream.store.influx.lines import ML_FEATURE_PREFIX
from arbstream.store.influx.queries import PAIR_TAGS, last_time, ml_scores, net_bps_series
from arbstream.store.influx.schema import SPREAD
from arbstream.store.models import (
    Card,
    FeatureBins,
    RegistryConfig,
    feature_schema_hash,
    feature_specs,
    file_sha256,
    read_card,
    register,
)
from arbstream.store.mongo.ml_eval import last_eval, record_eval
from arbstream.timestamps import from_ms, to_ms
from ml.promotion import DEFAULT_K, Decision, promote

#: Packages whose versions go into a card by default.
LIBRARIES = ("scikit-learn", "numpy", "pandas", "pyarrow", "pyspark", "joblib", "scipy")
#: Bins of a drift reference (deciles).
REFERENCE_BINS = 10
#: Probability floor of a bin in the PSI (an empty bin would make it infinite).
PSI_FLOOR = 1e-4
#: PSI above which a feature counts as drifted (the usual rule of thumb: > 0.25 major shift).
PSI_DRIFTED = 0.25


# --- the card ----------------------------------------------------------------------------------

def table_sha256(path: Path) -> str:
    """sha256 (hex) of a training table: of the file's bytes, or for a directory (a Parquet
    data set) of its sorted ``<relative path> <file sha256>`` lines."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    lines = [f"{p.relative_to(path).as_posix()} {file_sha256(p)}"
             for p in sorted(path.rglob("*")) if p.is_file()]
    if not lines:
        raise FileNotFoundError(f"no training table at {path}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def code_version() -> str:
    """``git describe --always --dirty`` of this repository, or ``unknown``."""
    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"],
                              cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else "unknown"


def library_versions(names: Iterable[str] = LIBRARIES) -> dict[str, str]:
    """Installed version of each package (missing ones left out) and ``python``."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def json_params(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with every value a JSON scalar: finite numbers, text, booleans and ``None``
    kept, anything else (estimators, NaN, arrays) as its ``repr``."""
    def plain(value: Any) -> Any:
        if value is None or isinstance(value, bool | str | int):
            return value
        if isinstance(value, float) and math.isfinite(value):
            return value
        return repr(value)

    return {str(k): plain(v) for k, v in params.items()}


def reference_bins(values: Sequence[float] | np.ndarray, bins: int = REFERENCE_BINS
                   ) -> FeatureBins:
    """The drift reference of one feature's training values: edges at the inner quantiles
    (``1/bins .. (bins-1)/bins``, duplicates merged) and the fraction of values per bin and
    missing (NaN)."""
    arr = np.asarray(values, dtype=float)
    finite = arr[np.isfinite(arr)]
    edges = (sorted(set(np.quantile(finite, np.arange(1, bins) / bins).tolist()))
             if finite.size else [])
    counts, missing = _bin_counts(arr, edges)
    total = max(arr.size, 1)
    return FeatureBins(edges=edges, fractions=[c / total for c in counts],
                       missing=missing / total)


def _bin_counts(values: np.ndarray, edges: list[float]) -> tuple[list[int], int]:
    """Values per bin of ``edges`` (``(e_{i-1}, e_i]``) and missing ones."""
    finite = values[np.isfinite(values)]
    index = np.searchsorted(np.asarray(edges, dtype=float), finite, side="left")
    counts = np.bincount(index, minlength=len(edges) + 1)
    return [int(c) for c in counts], int(values.size - finite.size)


def psi(reference: FeatureBins, values: Sequence[float] | np.ndarray) -> float | None:
    """Population stability index of ``values`` against ``reference``: Σ (a − e)·ln(a / e)
    over its bins and the missing bin, each fraction floored at :data:`PSI_FLOOR`; ``None``
    without live values. 0 = same distribution; > 0.25 = a major shift."""
    arr = np.asarray(values, dtype=float)
    if arr.size == 0:
        return None
    counts, missing = _bin_counts(arr, reference.edges)
    actual = np.maximum(np.array([*counts, missing]) / arr.size, PSI_FLOOR)
    expected = np.maximum(np.array([*reference.fractions, reference.missing]), PSI_FLOOR)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def card_from_result(name: str, result: Mapping[str, Any]) -> Card:
    """The card of a training result (see the module docstring).

    Raises:
        KeyError: a required key is missing.
        pydantic.ValidationError: a value does not make a valid card.
    """
    features = list(result.get("features") or FEATURE_NAMES)
    specs = feature_specs(features)
    data = dict(result["data"])
    if "table_sha256" not in data:
        data["table_sha256"] = table_sha256(Path(data.pop("table_path")))
    data.pop("table_path", None)
    reference = {}
    if result.get("train_features") is not None:
        matrix = np.asarray(result["train_features"], dtype=float)
        reference = {s.name: reference_bins(matrix[:, i]) for i, s in enumerate(specs)}
    model = result["model"]
    params = result.get("params")
    if params is None:
        params = model.get_params() if hasattr(model, "get_params") else {}
    return Card.model_validate({
        "name": name, "target": result["target"], "data": data,
        "features": [s.model_dump() for s in specs],
        "feature_schema_hash": feature_schema_hash(features),
        "code_version": result.get("code_version") or code_version(),
        "libraries": result.get("libraries") or library_versions(),
        "params": json_params(params), "folds": result["folds"], "reference": reference,
    })


def register_result(cfg: RegistryConfig, name: str, result: Mapping[str, Any],
                    k: int = DEFAULT_K) -> tuple[int, Decision]:
    """Register a training result as a new version of ``name`` and apply the promotion rule
    (:func:`ml.promotion.promote`).

    Returns:
        The version and the promotion decision.

    Raises:
        As :func:`card_from_result`, :func:`arbstream.store.models.register` and
        :func:`ml.promotion.promote`.
    """
    card = card_from_result(name, result)
    new = register(cfg, name, card, result["model"], result["predictions"],
                   result.get("mllib_dir"))
    return new, promote(cfg, name, new, k)


# --- live evaluation ---------------------------------------------------------------------------

def _series(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], tuple[list[int], list[float]]]:
    """Spread rows grouped by pair: (times ascending, net bps)."""
    by_pair: dict[tuple[str, ...], list[tuple[int, float]]] = {}
    for row in rows:
        if row.get("net_bps") is not None:
            key = tuple(row[t] for t in PAIR_TAGS)
            by_pair.setdefault(key, []).append((int(row["time"]), float(row["net_bps"])))
    out = {}
    for key, points in by_pair.items():
        points.sort()
        out[key] = ([t for t, _ in points], [v for _, v in points])
    return out


def realized(series: tuple[list[int], list[float]], at_ms: int, tolerance_ms: int
             ) -> float | None:
    """The value of the first point of ``series`` at or after ``at_ms`` and at most
    ``tolerance_ms`` after it, or ``None``."""
    times, values = series
    i = bisect.bisect_left(times, at_ms)
    if i < len(times) and times[i] <= at_ms + tolerance_ms:
        return values[i]
    return None


def live_metrics(card: Card, predictions: np.ndarray, outcomes: np.ndarray
                 ) -> dict[str, float | None]:
    """Metrics of ``predictions`` (scores or bps) against realized net bps ``outcomes``:
    classifier ``auc_pr``, ``brier``, ``positive_rate`` (label: outcome > the target's
    ``threshold_bps``); regressor ``mae``, ``rmse`` (bps). ``None`` when undefined."""
    from sklearn.metrics import average_precision_score

    if predictions.size == 0:
        return {}
    if card.target.kind == "regression":
        errors = predictions - outcomes
        return {"mae": float(np.mean(np.abs(errors))),
                "rmse": float(np.sqrt(np.mean(errors ** 2)))}
    labels = (outcomes > card.target.threshold_bps).astype(float)
    both = 0 < labels.sum() < labels.size
    return {"auc_pr": float(average_precision_score(labels, predictions)) if both else None,
            "brier": float(np.mean((predictions - labels) ** 2)),
            "positive_rate": float(labels.mean())}


def evaluate_live(cfg: RegistryConfig, influx: InfluxConfig, name: str,
                  until: dt.datetime | None = None, *, tolerance_s: float = 5.0
                  ) -> list[dict[str, Any]]:
    """Label and evaluate the ``ml_score`` points of ``name`` logged since its last
    evaluation (MongoDB ``ml_eval``), one document per model version scored, stored and
    returned (see :mod:`arbstream.store.mongo.ml_eval` for the fields).

    The window is ``[previous until, until)`` in event time, cut back so that every score in
    it can have its label: to the latest ``spread`` point (of any pair) minus the longest
    horizon and ``tolerance_s``. A score is labeled with the first ``spread`` net bps of its pair in
    ``[t + horizon_s, t + horizon_s + tolerance_s]``; ``unlabeled`` counts the others. Drift:
    PSI (:func:`psi`) of each feature (``f_<name>`` fields) against the card's reference.

    Args:
        until: end of the window, event time (default: now).
        tolerance_s: how late a realized spread point may be, seconds.

    Returns:
        The documents written, by version (``[]`` when nothing could be evaluated).

    Raises:
        InfluxError, InfluxUnavailableError: InfluxDB failures.
        pymongo.errors.PyMongoError: MongoDB failures.
    """
    previous = last_eval(cfg.mongo, name)
    since = previous["until"] if previous else None
    end_ms = to_ms(until or dt.datetime.now(dt.UTC))
    points = ml_scores(influx, name, since, from_ms(end_ms))
    if not points:
        return []
    cards = {v: read_card(cfg, name, v) for v in sorted({int(p["version"]) for p in points})}
    horizon_ms = {v: round(c.target.horizon_s * 1000) for v, c in cards.items()}
    tol_ms = round(tolerance_s * 1000)
    latest = last_time(influx, SPREAD, "net_bps")
    if latest is None:
        return []
    cut_ms = min(end_ms, latest - max(horizon_ms.values()) - tol_ms + 1)
    if since is not None and cut_ms <= to_ms(since):
        return []
    first_ms = min(p["time"] for p in points)
    series = _series(net_bps_series(influx, from_ms(first_ms + min(horizon_ms.values())),
                                     from_ms(cut_ms + max(horizon_ms.values()) + tol_ms)))
    window_end = from_ms(cut_ms)
    docs = []
    for v, card in cards.items():
        field = "predicted_bps" if card.target.kind == "regression" else "score"
        mine = [p for p in points if int(p["version"]) == v and p["time"] < cut_ms
                and p.get(field) is not None]
        if not mine:
            continue
        pairs = [(p, realized(series.get(tuple(p[t] for t in PAIR_TAGS), ([], [])),
                              p["time"] + horizon_ms[v], tol_ms)) for p in mine]
        labeled = [(float(p[field]), y) for p, y in pairs if y is not None]
        drift = {f.name: psi(card.reference[f.name],
                             [np.nan if p.get(ML_FEATURE_PREFIX + f.name) is None
                              else p[ML_FEATURE_PREFIX + f.name] for p in mine])
                 for f in card.features if f.name in card.reference}
        finite = {k: d for k, d in drift.items() if d is not None}
        doc = {
            "name": name, "version": v, "kind": card.target.kind, "since": since,
            "until": window_end, "horizon_s": card.target.horizon_s,
            "threshold_bps": card.target.threshold_bps, "scores": len(mine),
            "labeled": len(labeled), "unlabeled": len(mine) - len(labeled),
            "metrics": live_metrics(card, np.array([x for x, _ in labeled]),
                                    np.array([y for _, y in labeled])),
            "drift": drift, "drift_max": max(finite.values(), default=None),
            "drifted": sorted(k for k, d in finite.items() if d > PSI_DRIFTED),
            "evaluated_at": from_ms(to_ms(dt.datetime.now(dt.UTC))),  # ms, as MongoDB keeps
        }
        record_eval(cfg.mongo, doc)
        docs.append(doc)
    return docs
