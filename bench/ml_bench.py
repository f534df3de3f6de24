"""Retraining benchmark: ``spark-submit ml/retrain.py`` on a whole lake (the 21 IAQF days by
default), with the wall time of each step, the CPU seconds by process and the out-of-sample
tables, ready for ``ml/README.md``.

    python bench/ml_bench.py                              # backfill the 21 days, retrain
    python bench/ml_bench.py --lake /data/lake/iaqf       # an existing lake: retrain only
    python bench/ml_bench.py --trees 10 --json out.json   # fewer trees; also write a summary

* The lake: ``--lake DIR``; when it holds no ``spread`` record, ``arbstream backfill --input
  iaqf`` (or ``--dataset binance``) fills it first, in a subprocess, timed on its own. Default:
  a temporary directory (removed after the run).
* The job runs through the pyspark distribution's ``spark-submit`` (``--master local[N]``,
  ``--driver-memory``; the training table is collected to the driver), ``--no-register``:
  the figures are the training's, not the registry's. Its progress bars go to stderr.
* Figures: the job's own step times (``result.json`` ``seconds``: table, walk-forward,
  final refit, clustering), wall time, CPU seconds by process (Spark JVM, Python driver,
  where scikit-learn runs, Python workers) from ``/proc`` (:mod:`cpu`), rows, folds; then the
  out-of-sample metrics by regime and overall as Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyspark

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu import CpuSampler  # noqa: E402 (bench/ is not a package)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
REGRESSION = ("mae", "rmse", "skill", "dm_stat", "dm_p")
CLASSIFICATION = ("auc_pr", "brier", "ece")


def backfill(lake: Path, dataset: str, data_dir: Path) -> dict[str, Any]:
    """``arbstream backfill --input <dataset>`` into ``lake``; wall and CPU seconds."""
    env = {**os.environ, "ARB_LAKE_DIR": str(lake), "ARB_DATA_DIR": str(data_dir),
           "PYSPARK_PYTHON": sys.executable}
    sampler = CpuSampler(interval=2.0, root_kind="bench")
    sampler.start()
    start = time.perf_counter()
    subprocess.run([str(Path(sys.executable).with_name("arbstream")), "backfill", "--input",
                    dataset], env=env, check=True)
    return {"seconds": time.perf_counter() - start, "cpu": sampler.delta()}


def retrain(lake: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``spark-submit ml/retrain.py`` on ``lake``; wall and CPU seconds, the job's summary."""
    submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    cmd = [str(submit), "--master", f"local[{args.cores}]", "--driver-memory",
           args.driver_memory, str(REPO / "ml" / "retrain.py"), "--lake", str(lake),
           "--dataset", args.dataset, "--folds", str(args.folds), "--out", str(out),
           "--no-register"]
    if args.trees:
        cmd += ["--trees", str(args.trees)]
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable}
    sampler = CpuSampler(interval=2.0, root_kind="bench")
    sampler.start()
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    wall = time.perf_counter() - start
    return {"seconds": wall, "cpu": sampler.delta(),
            "result": json.loads((out / "result.json").read_text())}


def _fmt(v: float, digits: int = 2) -> str:
    if pd.isna(v):
        return "—"
    return f"{v:.1e}" if v != 0 and abs(v) < 1e-3 else f"{v:.{digits}f}"


def tables(metrics: pd.DataFrame) -> str:
    """The out-of-sample metrics by regime and over all rows, as Markdown tables."""
    lines = []
    for task, cols in (("regression", REGRESSION), ("classification", CLASSIFICATION)):
        sub = metrics[(metrics["task"] == task) & metrics["scope"].isin(["regime", "all"])]
        groups = [g for g in ("before", "during", "after", "all") if g in set(sub["group"])]
        lines += ["", f"{task} (rows: " + ", ".join(
            f"{g} {int(sub[sub['group'] == g]['n'].iloc[0]):,}" for g in groups) + ")", "",
            "| model | " + " | ".join(f"{g} {c}" for g in groups for c in cols) + " |",
            "|" + "---|" * (1 + len(groups) * len(cols))]
        for model in dict.fromkeys(sub["model"]):
            rows = sub[sub["model"] == model].set_index("group")
            lines.append(f"| {model} | " + " | ".join(
                _fmt(rows.loc[g, c], 4 if c in ("brier", "ece") else 2)
                for g in groups for c in cols) + " |")
        if task == "classification":
            rate = sub.groupby("group")["positive_rate"].first()
            lines.append("positive rate: " + ", ".join(f"{g} {rate[g]:.2%}" for g in groups))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lake", type=Path, help="lake directory (default: a temporary one)")
    ap.add_argument("--dataset", choices=("iaqf", "binance"), default="iaqf")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("ARB_DATA_DIR", DATA)))
    ap.add_argument("--trees", type=int, help="trees per ensemble (default: the job's, 100)")
    ap.add_argument("--folds", type=int, default=3, help="walk-forward folds K")
    ap.add_argument("--cores", type=int, default=2, help="local[N]")
    ap.add_argument("--driver-memory", default="8g")
    ap.add_argument("--out", type=Path, help="result directory (default: temporary)")
    ap.add_argument("--json", type=Path, help="also write the summary here")
    args = ap.parse_args()

    temp = Path(tempfile.mkdtemp(prefix="arb-ml-bench-"))
    lake = args.lake or temp / "lake"
    out = args.out or temp / "result"
    summary: dict[str, Any] = {"cores_visible": os.cpu_count(), "load_start": os.getloadavg()[0],
                               "lake": str(lake), "dataset": args.dataset}
    try:
        if not (lake / "spread").is_dir():
            summary["backfill"] = backfill(lake, args.dataset, args.data_dir)
            b = summary["backfill"]
            print(f"backfill: {b['seconds']:.0f} s, CPU " + ", ".join(
                f"{k} {v:.0f} s" for k, v in b["cpu"].items() if v >= 0.5))
        run = retrain(lake, out, args)
        summary["retrain"] = run
        summary["load_end"] = os.getloadavg()[0]
        res = run["result"]
        cpu = run["cpu"]
        print(f"\nmachine: {os.cpu_count()} cores visible, Spark local[{args.cores}]; load "
              f"average {summary['load_start']:.2f} at start, {summary['load_end']:.2f} at end")
        print(f"data: {res['data_start']} .. {res['data_end']}, {res['rows']:,} labelled rows, "
              f"{args.folds} folds, trees {res['params']['model.gbr_trees']}")
        print(f"retrain wall {run['seconds']:.0f} s (job steps: " + ", ".join(
            f"{k} {v:.0f} s" for k, v in res["seconds"].items()) + ")")
        print(f"CPU {sum(cpu.values()):.0f} s: " + ", ".join(
            f"{k} {v:.0f} s" for k, v in cpu.items() if v >= 0.5))
        print(tables(pd.read_csv(out / "metrics.csv")))
        if args.json:
            args.json.write_text(json.dumps(summary, indent=2, default=str))
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # only what was defaulted into it


if __name__ == "__main__":
    main()
