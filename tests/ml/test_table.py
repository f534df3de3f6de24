"""The training table (ml/table.py) on a real two-day lake: the online features Spark
computes equal :func:`arbstream.features.online_features` row by row, and nothing at time t
depends on the rows after t (features) or on any row but t + h (labels)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
from pyspark.sql import functions as F

from arbstream.features import FEATURE_NAMES, online_features
from ml.table import DATASETS, FEATURES, build_table, online_columns, read_record

P = DATASETS["iaqf"]
STEP = P.step_ms


def _nan(values) -> np.ndarray:
    return np.array([math.nan if v is None else float(v) for v in values])


def test_spark_online_features_equal_online_features_row_by_row(spark, iaqf_lake) -> None:
    spread = read_record(spark, str(iaqf_lake), "spread", P)
    rows = (spread.select("*", *[c.alias(f"spark_{c_name}") for c, c_name in
                                 zip(online_columns(), FEATURE_NAMES, strict=True)])
            .orderBy(F.xxhash64("opportunity_id")).limit(3000).collect())
    assert len(rows) == 3000
    for row in rows:
        d = row.asDict()
        spark_values = _nan(d[f"spark_{n}"] for n in FEATURE_NAMES)
        np.testing.assert_allclose(spark_values, online_features(d), rtol=1e-12, atol=1e-9,
                                   equal_nan=True, err_msg=d["opportunity_id"])
    assert {r["cross_quote"] for r in rows} == {True, False}  # both kinds of pair were seen


def test_rows_after_t_change_no_feature_at_t_and_labels_use_only_t_plus_h(spark, iaqf_lake
                                                                          ) -> None:
    spread = read_record(spark, str(iaqf_lake), "spread", P)
    feature = read_record(spark, str(iaqf_lake), "feature", P)
    cut = datetime(2023, 3, 10, 6, 0, tzinfo=UTC)
    later = F.col("window_end") > F.lit(cut)
    spread2 = spread.select(*[
        F.when(later, F.col(c) * 1.7 + 3.0).otherwise(F.col(c)).alias(c)
        if c in ("net", "net_bps", "gross_bps", "spread_mean_bps", "conversion_rate")
        else F.col(c) for c in spread.columns])
    feature2 = feature.select(*[
        F.when(later, F.col(c) * 1.01).otherwise(F.col(c)).alias(c)
        if c in ("mid", "log_return", "volatility") else F.col(c) for c in feature.columns])
    keys = ["pair", "t_ms"]
    a = build_table(spread, feature, P).toPandas().set_index(keys).sort_index()
    b = build_table(spread2, feature2, P).toPandas().set_index(keys).sort_index()
    cut_ms = int(cut.timestamp() * 1000)
    t = a.index.get_level_values("t_ms")
    before = t <= cut_ms
    assert before.sum() > 10_000 and (~before).sum() > 10_000
    np.testing.assert_array_equal(a.loc[before, list(FEATURES)].to_numpy(),
                                  b.loc[before, list(FEATURES)].to_numpy())
    # labels at t read t + h: unchanged while t + h <= cut, changed (where present) after
    known = t + P.horizon_steps * STEP <= cut_ms
    np.testing.assert_array_equal(a.loc[known, "y_next_bps"], b.loc[known, "y_next_bps"])
    np.testing.assert_array_equal(a.loc[known, "y_exec"], b.loc[known, "y_exec"])
    edge = (t > cut_ms - P.horizon_steps * STEP) & before & a["y_next_bps"].notna().to_numpy()
    assert edge.sum() > 0
    np.testing.assert_allclose(b.loc[edge, "y_next_bps"], a.loc[edge, "y_next_bps"] * 1.7 + 3)
    # and the features after t did change (the test would see a leak)
    assert not np.allclose(a.loc[~before, "net_ma5"], b.loc[~before, "net_ma5"])
