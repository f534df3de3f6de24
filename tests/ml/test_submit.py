"""``ml/retrain.py`` through the real ``spark-submit`` of the pyspark distribution, on one day
of the test lake, writing its result directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyspark

REPO = Path(__file__).resolve().parents[2]


def test_spark_submit_runs_retrain_on_a_tiny_slice(iaqf_lake: Path, tmp_path: Path) -> None:
    from arbstream.shell.stack import ensure_java

    ensure_java()
    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    out = tmp_path / "result"
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "ARB_STATE_DIR": str(tmp_path)}
    done = subprocess.run(
        [str(submit), "--master", "local[2]", str(REPO / "ml" / "retrain.py"),
         "--lake", str(iaqf_lake), "--start", "2023-03-10", "--end", "2023-03-10",
         "--folds", "2", "--trees", "3", "--k-max", "2", "--lsh-queries", "2", "--out",
         str(out), "--no-register"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"result: {out}" in done.stdout
    summary = json.loads((out / "result.json").read_text())
    assert summary["data_start"].startswith("2023-03-10")
    assert len(summary["table_sha256"]) == 64 and summary["cluster"]["k"] == 2
    preds = pd.read_parquet(out / "predictions.parquet")
    assert set(preds["fold"]) == {1, 2} and preds["pred_gbr"].notna().all()
    assert (out / "gbr.joblib").is_file() and (out / "mllib" / "mllib_rf").is_dir()
