"""The model registry (arbstream/store/models.py) on real files, the session's real MongoDB
(the ``models`` mirror) and a real MLlib ``PipelineModel``; the ``ml_score`` measurement on
the real InfluxDB, read back by the store and by the Analytics dashboard's panel query.

The models are real scikit-learn estimators fitted on the online features
(:func:`arbstream.features.online_features`) of real IAQF spread rows of the USDC depeg.
"""

from __future__ import annotations

import json
import math
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError
from pymongo import MongoClient
from sklearn.ensemble import RandomForestClassifier

from arbstream.config import Settings
from arbstream.features import FEATURE_NAMES, online_features
from arbstream.store import models as R
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.lines import ml_score_point
from arbstream.store.influx.queries import ml_scores, query
from arbstream.store.influx.writer import write_ml_scores
from testing.alert_events import iaqf_quotes, reference_rows

START = datetime(2023, 3, 11, 4, tzinfo=UTC)
END = datetime(2023, 3, 11, 4, 30, tzinfo=UTC)
NAME = R.SCORER


@pytest.fixture(scope="module")
def rows(data_dir: Path) -> list[dict[str, Any]]:
    """Real spread rows (every pair, every window) of 04:00-04:30 on 2023-03-11."""
    return reference_rows(iaqf_quotes(data_dir, START, END), Settings())


@pytest.fixture(scope="module")
def fitted(rows: list[dict[str, Any]]) -> tuple[RandomForestClassifier, np.ndarray]:
    """A small forest on the online features, label: the window's net spread > 0."""
    x = np.array([online_features(r) for r in rows])
    y = np.array([r["net_bps"] > 0 for r in rows], dtype=int)
    return RandomForestClassifier(n_estimators=8, max_depth=4, random_state=0).fit(x, y), x


@pytest.fixture
def registry(msettings: MongoConfig, tmp_path: Path) -> R.RegistryConfig:
    return R.RegistryConfig(models_dir=tmp_path / "models", mongo=msettings)


def card(**update: Any) -> R.Card:
    """A card of the scorer on :data:`FEATURE_NAMES` with two folds."""
    fold = {"metrics": {"model": {"brier": 0.05, "auc_pr": 0.9},
                        "threshold_rule": {"brier": 0.07, "auc_pr": 0.5},
                        "base_rate": {"brier": 0.1, "auc_pr": 0.1}}}
    values: dict[str, Any] = {
        "name": NAME,
        "target": {"kind": "classification", "horizon_s": 60.0, "threshold_bps": 0.0},
        "data": {"start": START, "end": END, "rows": 100, "table_sha256": "ab" * 32},
        "features": [s.model_dump() for s in R.feature_specs(FEATURE_NAMES)],
        "feature_schema_hash": R.feature_schema_hash(FEATURE_NAMES),
        "code_version": "test", "libraries": {"scikit-learn": "1"},
        "params": {"n_estimators": 8, "max_depth": 4},
        "folds": [{"fold": i, "test_start": START + timedelta(minutes=10 * i),
                   "test_end": START + timedelta(minutes=10 * (i + 1)), "rows": 50, **fold}
                  for i in range(2)],
    }
    values.update(update)
    return R.Card.model_validate(values)


def predictions(n: int = 5) -> pa.Table:
    return pa.table({"time": [START + timedelta(seconds=i) for i in range(n)],
                     "fold": [0] * n, "y_true": [1.0] * n, "y_pred": [0.5] * n})


def mirror_equals_files(registry: R.RegistryConfig) -> list[dict[str, Any]]:
    """The ``models`` documents of :data:`NAME`, checked equal to the cards on disk."""
    docs = R.mirrored(registry.mongo, NAME)
    on_disk = R.cards(registry, NAME)
    assert [d["_id"] for d in docs] == [f"{NAME}|{c.version}" for c in on_disk]
    for doc, c in zip(docs, on_disk, strict=True):
        assert {k: v for k, v in doc.items() if k not in ("_id", "champion")} == c.model_dump()
        assert doc["champion"] is (c.status == "champion")
    return docs


def test_register_versions_statuses_and_the_mongo_mirror(
    registry: R.RegistryConfig, fitted: tuple[RandomForestClassifier, np.ndarray], spark,
    tmp_path: Path,
) -> None:
    from pyspark.ml import Pipeline, PipelineModel
    from pyspark.ml.classification import LogisticRegression
    from pyspark.ml.feature import VectorAssembler

    model, x = fitted
    frame = spark.createDataFrame([(float(a), float(b), float(a > 0)) for a, b in x[:200, :2]],
                                  ["net_bps", "gross_bps", "label"])
    pipeline = Pipeline(stages=[VectorAssembler(inputCols=["net_bps", "gross_bps"],
                                                outputCol="features"),
                                LogisticRegression(maxIter=5)]).fit(frame)
    saved = tmp_path / "pipeline"
    pipeline.save(str(saved))

    v1 = R.register(registry, NAME, card(), model, predictions(), saved)
    v2 = R.register(registry, NAME, card(), model, predictions())
    assert (v1, v2) == (1, 2) and R.versions(registry, NAME) == [1, 2]
    root = registry.models_dir / NAME / "1"
    stored = R.read_card(registry, NAME, 1)
    paths = [a.path for a in stored.artifacts]
    assert {"model.joblib", "predictions.parquet"} <= set(paths)
    assert any(p.startswith("mllib/stages/") for p in paths)
    for a in stored.artifacts:  # the card's hashes are the files'
        assert a.sha256 == R.file_sha256(root / a.path) and a.bytes == (root / a.path).stat(
            ).st_size
    assert json.loads((root / "card.json").read_text())["version"] == 1
    assert stored.status == "challenger" and R.champion(registry, NAME) is None
    assert not [p for p in (registry.models_dir / NAME).iterdir() if p.name.startswith(".tmp")]
    docs = mirror_equals_files(registry)
    assert [d["champion"] for d in docs] == [False, False]
    with MongoClient(registry.mongo.uri.get_secret_value()) as client:
        indexes = client[registry.mongo.db]["models"].index_information()
    assert indexes["uniq_name_version"]["unique"]

    R.set_status(registry, NAME, 1, "champion", "first")
    assert R.champion_version(registry, NAME) == 1
    R.set_status(registry, NAME, 2, "champion", "better")
    assert R.champion_version(registry, NAME) == 2
    old = R.read_card(registry, NAME, 1)
    assert (old.status, old.reason) == ("challenger", "replaced by version 2")
    assert [d["champion"] for d in mirror_equals_files(registry)] == [False, True]

    loaded = R.load(registry, NAME, features=FEATURE_NAMES)  # the champion
    assert loaded.card.version == 2 and loaded.mllib_path is None
    assert (loaded.model.predict_proba(x[:50]) == model.predict_proba(x[:50])).all()
    first = R.load(registry, NAME, 1, features=[(n, "float") for n in FEATURE_NAMES])
    assert first.mllib_path == root / "mllib"
    again = PipelineModel.load(str(first.mllib_path))
    assert again.transform(frame).count() == frame.count()

    R.set_status(registry, NAME, 2, "rejected", "withdrawn by hand")
    assert R.champion_version(registry, NAME) is None and R.champion(registry, NAME) is None
    with pytest.raises(R.ModelNotFoundError, match="no champion"):
        R.load(registry, NAME, features=FEATURE_NAMES)
    mirror_equals_files(registry)


def test_load_refuses_a_tampered_artifact(
    registry: R.RegistryConfig, fitted: tuple[RandomForestClassifier, np.ndarray],
) -> None:
    model, _ = fitted
    R.register(registry, NAME, card(), model, predictions())
    R.set_status(registry, NAME, 1, "champion", "test")
    root = registry.models_dir / NAME / "1"
    blob = (root / "model.joblib").read_bytes()

    def refused(match: str) -> None:
        with pytest.raises(R.ModelIntegrityError, match=match):
            R.load(registry, NAME, features=FEATURE_NAMES)

    (root / "model.joblib").write_bytes(blob[:-1] + bytes([blob[-1] ^ 1]))  # one bit
    refused(r"model\.joblib has sha256 [0-9a-f]{64}, the card says")
    (root / "model.joblib").write_bytes(blob)
    assert R.load(registry, NAME, features=FEATURE_NAMES).card.version == 1
    (root / "extra.py").write_text("import os\n")
    refused(r"files not in the card: \['extra.py'\]")
    (root / "extra.py").unlink()
    (root / "predictions.parquet").rename(root / "p")
    refused(r"files not in the card: \['p'\]")
    (root / "p").unlink()
    refused(r"predictions\.parquet is missing")


def test_load_refuses_a_mismatching_feature_schema(
    registry: R.RegistryConfig, fitted: tuple[RandomForestClassifier, np.ndarray],
) -> None:
    model, _ = fitted
    R.register(registry, NAME, card(), model, predictions())
    names = list(FEATURE_NAMES)
    for expected in (names[::-1], names[:-1], [*names, "extra"],
                     [(n, "int" if n == "hour" else "float") for n in names]):
        with pytest.raises(R.ModelIntegrityError, match="was trained on features"):
            R.load(registry, NAME, 1, features=expected)
    # a card edited by hand (features without their hash) does not even validate
    path = registry.models_dir / NAME / "1" / "card.json"
    doc = json.loads(path.read_text())
    doc["features"] = doc["features"][::-1]
    path.write_text(json.dumps(doc))
    with pytest.raises(ValidationError, match="feature_schema_hash"):
        R.load(registry, NAME, 1, features=names[::-1])


def test_card_validation() -> None:
    assert R.feature_schema_hash(FEATURE_NAMES) == R.feature_schema_hash(
        [(n, "float") for n in FEATURE_NAMES])
    assert R.feature_schema_hash(["a", "b"]) != R.feature_schema_hash(["b", "a"])
    with pytest.raises(ValidationError, match="not the hash"):
        card(feature_schema_hash="0" * 64)
    bad_fold = {"fold": 0, "metrics": {"model": {"rmse": math.nan}}}
    with pytest.raises(ValidationError, match="give None when undefined"):
        card(folds=[bad_fold])
    with pytest.raises(ValidationError, match="name"):
        card(name="Bad Name")
    c = card(created_at=datetime(2024, 1, 1, 12, 0, 0, 123456, tzinfo=UTC))
    assert c.created_at.microsecond == 123000  # ms, as MongoDB keeps it


def test_concurrent_registrations_get_distinct_versions(
    registry: R.RegistryConfig, fitted: tuple[RandomForestClassifier, np.ndarray],
) -> None:
    model, _ = fitted
    got: list[int] = []
    threads = [threading.Thread(target=lambda: got.append(
        R.register(registry, NAME, card(), model, predictions()))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(got) == [1, 2, 3, 4] == R.versions(registry, NAME)
    mirror_equals_files(registry)
    with pytest.raises(ValueError, match="not 'net_bps_regressor'"):
        R.register(registry, R.REGRESSOR, card(), model, predictions())
    with pytest.raises(ValueError, match="no row|none"):
        R.register(registry, NAME, card(), model, predictions(0))


def test_ml_score_points_are_read_back_and_feed_the_dashboard_panel(
    isettings: InfluxConfig, rows: list[dict[str, Any]],
    fitted: tuple[RandomForestClassifier, np.ndarray],
) -> None:
    """``ml_score`` points of real opportunity windows, scored by a real model, written by
    the store writer: the store reads them back, and the Analytics panel "Predicted vs
    realized net spread" finds them through its own ``ml_score`` query alone."""
    import grafana as G

    model, _ = fitted
    windows = [r for r in rows if r["net_bps"] > 0][:40]
    points = []
    for r in windows:
        features = online_features(r)
        base = {**r, "features": dict(zip(FEATURE_NAMES, features, strict=True))}
        points.append({**base, "model": R.SCORER, "version": 3,
                       "score": float(model.predict_proba([features])[0][1])})
        points.append({**base, "model": R.REGRESSOR, "version": 2,
                       "predicted_bps": r["net_bps"] - 1.0})
    line = ml_score_point(points[0]).to_line_protocol()
    assert line.startswith("ml_score,buy_exchange=") and ",model=opportunity_scorer," in line
    assert "f_spread_z" not in line  # NaN features are left out
    assert write_ml_scores(isettings, points) == len(points)

    got = ml_scores(isettings, R.SCORER)
    assert len(got) == len({(p["window_end"], p["symbol"], p["sell_symbol"], p["buy_exchange"],
                             p["sell_exchange"]) for p in points[::2]})
    first = got[0]
    assert first["version"] == "3" and first["pair"].count("|") == 2
    assert 0 <= first["score"] <= 1 and first.get("predicted_bps") is None
    assert first["f_net_bps"] == first["net_bps"] and first.get("f_spread_z") is None
    assert {g["model"] for g in ml_scores(isettings, R.REGRESSOR)} == {R.REGRESSOR}

    board = G.load_dashboards()["arbstream-analytics"]
    [panel] = [p for p in G.iter_panels(board) if p["title"] == "Predicted vs realized net spread"]
    [target] = [t for t in panel["targets"] if '"ml_score"' in t["query"]]
    pair = windows[0]
    rng = G.TimeRange(int(START.timestamp() * 1000), int(END.timestamp() * 1000))
    influxql = G.render_query(
        target["query"], G.variables(board),
        {"symbol": pair["symbol"], "exchange": [pair["buy_exchange"], pair["sell_exchange"]]},
        rng, G.panel_interval(panel, rng))
    assert len(query(isettings, influxql)) > 0
