"""Fixtures of the retraining tests: a real two-day lake (IAQF bars of 2023-03-09 and
2023-03-10, one day before and one during the USDC depeg) written by the stream's own
backfill with 60 s windows, and one small retrain over it, saved as the job saves it."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from arbstream.config import Settings
from ml.cluster import ClusterParams
from ml.models import ModelParams
from ml.retrain import RetrainParams, retrain
from ml.table import DATASETS

#: The slice: 2023-03-09T00:00 to 2023-03-11T00:00 UTC.
START, END = datetime(2023, 3, 9, tzinfo=UTC), datetime(2023, 3, 11, tzinfo=UTC)
#: Small enough for the suite (10 trees, 3 folds, a small clustering sample).
PARAMS = dict(model=ModelParams(gbr_trees=10, rf_trees=10), folds=3,
              cluster=ClusterParams(k_range=(2, 3), max_rows=20_000, lsh_rows=5_000,
                                    queries=3))


@pytest.fixture(scope="session")
def iaqf_lake(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """The lake of the two days, through :func:`spark_jobs.backfill.backfill`."""
    from arbstream.shell.backfill import Input, read_quotes
    from spark_jobs.backfill import BackfillConfig, backfill

    root = tmp_path_factory.mktemp("lake")
    settings = Settings(data_dir=data_dir, lake_dir=root, window_seconds=60.0,
                        max_quote_age_seconds=60.0, stats_horizon_seconds=3600.0)
    _, quotes = read_quotes(settings, Input.iaqf, START, END)
    backfill((q.to_json() for q in quotes), "iaqf", BackfillConfig.of(settings))
    return root


def params(lake: Path, **over) -> RetrainParams:
    """The tests' retrain parameters over ``lake``."""
    return RetrainParams(lake=str(lake), dataset="iaqf", table=DATASETS["iaqf"],
                         **{**PARAMS, **over})


@pytest.fixture(scope="session")
def saved(spark, iaqf_lake: Path, tmp_path_factory: pytest.TempPathFactory):
    """``(result, directory)``: one retrain over the lake, saved."""
    result = retrain(spark, params(iaqf_lake), progress=False)
    return result, result.save(tmp_path_factory.mktemp("result") / "iaqf")
