"""``spark-submit ml/retrain.py``: the training table from the lake, walk-forward evaluation
of every model against its baselines, the models refitted on all rows, clustering, and the
result registered (:mod:`ml.registry`) and written to a directory.

    spark-submit ml/retrain.py --lake DIR --dataset iaqf [--horizon-steps N] [--folds K] ...

Steps (progress bars on stderr): build the table (:mod:`ml.table`) and keep the rows with
both labels; fold and evaluate (:mod:`ml.walkforward`); refit the models on every labelled
row (:func:`ml.walkforward.fit_models`); KMeans and LSH (:mod:`ml.cluster`); then
:class:`ml.result.TrainingResult`. Deterministic: the same lake, parameters and seed give the
same table hash, the same scikit-learn models (pickle bytes) and the same metrics.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import pandas as pd
from pyspark.sql import SparkSession

from arbstream.features import FEATURE_NAMES
from arbstream.store import lake
from arbstream.store.models import feature_schema_hash
from ml.cluster import ClusterParams, cluster
from ml.models import ModelParams
from ml.result import REGISTERED, TrainingResult, table_sha256
from ml.table import DATASETS, FEATURES, KEYS, LABELS, TableParams, load_table
from ml.walkforward import LONGEST_WINDOW, fit_models, make_folds, metric_table, run_folds


@dataclass(frozen=True)
class RetrainParams:
    """One run: the lake, the data set (its :data:`ml.table.DATASETS` defaults), the table,
    model and clustering parameters (``cluster=None``: no clustering), ``folds`` (K),
    ``gap_steps`` (``None``: h + 20)."""

    lake: str
    dataset: str = "iaqf"
    table: TableParams = field(default_factory=TableParams)
    model: ModelParams = field(default_factory=ModelParams)
    cluster: ClusterParams | None = field(default_factory=ClusterParams)
    folds: int = 5
    gap_steps: int | None = None

    @property
    def gap_ms(self) -> int:
        steps = self.gap_steps
        if steps is None:
            steps = self.table.horizon_steps + LONGEST_WINDOW
        return steps * self.table.step_ms

    def flat(self) -> dict[str, object]:
        """Every parameter as one flat JSON-ready dict."""
        out: dict[str, object] = {"lake": self.lake, "dataset": self.dataset,
                                  "folds": self.folds, "gap_ms": self.gap_ms}
        for prefix, part in (("table", self.table), ("model", self.model),
                             ("cluster", self.cluster)):
            if part is None:
                continue
            for k, v in dataclasses.asdict(part).items():
                out[f"{prefix}.{k}"] = v if isinstance(v, int | float | str | None) else str(v)
        return out


def code_version() -> str:
    """``git rev-parse HEAD`` of the repository, or ``unknown``."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def checkpoint_dir(spark: SparkSession) -> None:
    """Give a local SparkContext a checkpoint directory when it has none (a temporary one,
    removed at exit). MLlib's ``GBTRegressor`` checkpoints its running predictions every
    ``checkpointInterval`` (10) iterations only when one is set; without it the lineage of
    every boosting iteration grows with the iterations before it, and so does its time. On a
    cluster the directory must be on storage every executor shares: set ``spark.checkpoint.dir``
    (``--conf``); without it the job runs without checkpoints."""
    sc = spark.sparkContext
    if sc.getCheckpointDir() is None and sc.master.startswith("local"):
        path = tempfile.mkdtemp(prefix="arb-retrain-checkpoint-")
        atexit.register(shutil.rmtree, path, True)
        sc.setCheckpointDir(path)


def _utc(ts: pd.Timestamp) -> pd.Timestamp:
    """A Spark-collected timestamp (naive, UTC session) as an aware UTC one."""
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def retrain(spark: SparkSession, p: RetrainParams, progress: bool = True) -> TrainingResult:
    """Run every step over the lake ``p.lake``; the result (nothing written).

    The run holds the lake's shared lock (:func:`arbstream.store.lake.locked`), so a
    compaction waits for it.

    Raises:
        ValueError: the lake holds too few labelled windows for ``p.folds`` folds.
    """
    with lake.locked(lake.LakeConfig(Path(p.lake))):  # no compaction while it reads
        return _retrain(spark, p, progress)


def _retrain(spark: SparkSession, p: RetrainParams, progress: bool) -> TrainingResult:
    from ml.registry import library_versions

    seconds: dict[str, float] = {}
    start = time.perf_counter()
    checkpoint_dir(spark)
    # few partitions: MLlib's trees aggregate per partition, and the table is small
    parts = spark.sparkContext.defaultParallelism
    table = (load_table(spark, p.lake, p.table).dropna(subset=list(LABELS))
             .coalesce(parts).cache())
    local = table.toPandas().sort_values(["t_ms", "pair"], kind="stable", ignore_index=True)
    if local.empty:
        raise ValueError(f"no labelled rows in the lake at {p.lake}")
    seconds["table"] = time.perf_counter() - start
    folds = make_folds(local["t_ms"].to_numpy(), p.folds, p.gap_ms)
    step = time.perf_counter()
    preds = run_folds(local, table, folds, p.model, p.table.horizon_steps, p.table.min_net,
                      progress)
    metrics = metric_table(preds, p.table.horizon_steps)
    seconds["walk_forward"] = time.perf_counter() - step
    step = time.perf_counter()
    final = fit_models(local, table, p.model)
    seconds["final_fit"] = time.perf_counter() - step
    step = time.perf_counter()
    clusters = None if p.cluster is None else cluster(table, p.cluster, progress)
    seconds["cluster"] = time.perf_counter() - step
    seconds["total"] = time.perf_counter() - start
    table.unpersist()
    sklearn = {k: v for k, v in final.items() if not k.startswith("mllib")}
    return TrainingResult(
        dataset=p.dataset, table_sha256=table_sha256(local, [*KEYS, *FEATURES, *LABELS]),
        feature_schema_hash=feature_schema_hash(FEATURES), features=list(FEATURES),
        data_start=_utc(local["window_end"].min()), data_end=_utc(local["window_end"].max()),
        rows=len(local), params=p.flat(),
        libraries=library_versions(("scikit-learn", "statsmodels", "scipy", "numpy",
                                    "pandas", "pyarrow", "pyspark", "joblib")),
        code_version=code_version(), folds=folds, metrics=metrics, predictions=preds,
        sklearn_models=sklearn,
        mllib_models={**{k: v for k, v in final.items() if k.startswith("mllib")},
                      **(clusters.models if clusters else {})},
        cluster=clusters.summary() if clusters else {}, seconds=seconds,
        train_online=local[list(FEATURE_NAMES)].to_numpy(float),
    )


def register(result: TrainingResult, out: Path, p: RetrainParams) -> dict[str, str]:
    """Register the served models in the registry (``ARB_MODELS_DIR``); per name, the new
    version and promotion decision, or why registration failed (the result directory
    ``out`` keeps everything either way)."""
    from arbstream.config import get_settings
    from arbstream.store.config import InfluxConfig
    from arbstream.store.models import RegistryConfig, champion_version, load
    from ml.registry import evaluate_live, register_result

    settings = get_settings()
    cfg = RegistryConfig.of(settings)
    step = p.table.step_seconds
    outcome = {}
    for name, (_model, task) in REGISTERED.items():
        lag = p.table.latency_steps if task == "classification" else p.table.horizon_steps
        mllib = out / "mllib" / "mllib_rf" if task == "classification" else None
        try:  # first label the live scores logged since the last retrain (MongoDB ml_eval)
            evals = evaluate_live(cfg, InfluxConfig.of(settings), name)
            outcome[f"{name} live"] = f"{len(evals)} version(s) evaluated"
        except Exception as exc:  # noqa: BLE001 (reported; retraining goes on)
            outcome[f"{name} live"] = f"not evaluated: {type(exc).__name__}: {exc}"
        try:
            current = champion_version(cfg, name)
            scored = None if current is None else result.champion_scores(
                load(cfg, name, current, features=list(FEATURE_NAMES)).model, current, task,
                p.table.horizon_steps)
            version, decision = register_result(cfg, name, result.registry_result(
                name, lag * step, p.table.min_net * 1e4, mllib, scored),
                k=settings.ml_promotion_folds)  # fewer folds than K: never promoted
            verdict = "promoted" if decision.promote else "not promoted"
            outcome[name] = f"v{version}: {verdict}: {decision.reason}"
        except Exception as exc:  # noqa: BLE001 (reported; the directory has the result)
            outcome[name] = f"not registered: {type(exc).__name__}: {exc}"
    return outcome


def parse_args(argv: Sequence[str] | None) -> tuple[RetrainParams, Path, bool]:
    """Command-line arguments → parameters, the output directory and ``--no-register``."""
    ap = argparse.ArgumentParser(prog="retrain.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--lake", help="lake directory (default ARB_LAKE_DIR)")
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="iaqf")
    ap.add_argument("--step-seconds", type=float, help="the data set's step, s")
    ap.add_argument("--horizon-steps", type=int, help="h of y_next_bps, steps")
    ap.add_argument("--latency-steps", type=int, help="L of y_exec, steps")
    ap.add_argument("--min-net", type=float, help="executable threshold, fraction")
    ap.add_argument("--start", type=date.fromisoformat, help="first UTC date")
    ap.add_argument("--end", type=date.fromisoformat, help="last UTC date, inclusive")
    ap.add_argument("--folds", type=int, help="walk-forward folds K")
    ap.add_argument("--gap-steps", type=int, help="purge gap, steps (default h + 20)")
    ap.add_argument("--trees", type=int, help="trees of every ensemble (default 100)")
    ap.add_argument("--seed", type=int, help="seed of every random choice")
    ap.add_argument("--k-max", type=int, default=8, help="largest k of KMeans (from 2)")
    ap.add_argument("--lsh-queries", type=int, default=20, help="LSH recall queries")
    ap.add_argument("--cluster-rows", type=int, default=ClusterParams.max_rows,
                    help="rows sampled for KMeans")
    ap.add_argument("--lsh-rows", type=int, default=ClusterParams.lsh_rows,
                    help="rows sampled for the LSH recall and speed-up")
    ap.add_argument("--no-cluster", action="store_true",
                    help="skip KMeans and LSH (they are reported, not registered)")
    ap.add_argument("--out", type=Path, help="result directory (default ARB_ML_OUTPUT_DIR)")
    ap.add_argument("--no-register", action="store_true", help="do not use the registry")
    a = ap.parse_args(argv)
    from arbstream.config import get_settings

    s = get_settings()
    over = {k: v for k, v in (("step_seconds", a.step_seconds), ("horizon_steps",
            a.horizon_steps), ("latency_steps", a.latency_steps), ("min_net", a.min_net),
            ("start", a.start), ("end", a.end)) if v is not None}
    model = ModelParams(seed=a.seed if a.seed is not None else s.ml_seed)
    if a.trees:
        model = dataclasses.replace(model, gbr_trees=a.trees, rf_trees=a.trees)
    if a.folds is not None and a.folds < s.ml_promotion_folds and not a.no_register:
        ap.error(f"--folds {a.folds} is below the promotion rule's K = "
                 f"{s.ml_promotion_folds} (ARB_ML_PROMOTION_FOLDS): no version could be "
                 "promoted; give more folds, a smaller K, or --no-register")
    p = RetrainParams(lake=a.lake or str(s.lake_root), dataset=a.dataset,
                      table=dataclasses.replace(DATASETS[a.dataset], **over), model=model,
                      cluster=None if a.no_cluster else ClusterParams(
                          seed=model.seed, k_range=tuple(range(2, a.k_max + 1)),
                          queries=a.lsh_queries, max_rows=a.cluster_rows, lsh_rows=a.lsh_rows),
                      folds=a.folds or s.ml_folds, gap_steps=a.gap_steps)
    return p, a.out or s.ml_output_dir / a.dataset, a.no_register


def session(master: str | None = None, driver_memory: str = "4g") -> SparkSession:
    """The SparkSession: spark-submit's master and resources, or ``master`` with a driver of
    ``driver_memory`` (the training table is collected to the driver); UTC time."""
    builder = SparkSession.builder
    if master is not None:
        builder = builder.master(master).config("spark.driver.memory", driver_memory)
    return (builder.appName("arbstream-retrain")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.sql.shuffle.partitions", "8")
            .config("spark.sql.execution.arrow.pyspark.enabled", "true")
            .config("spark.ui.showConsoleProgress", "false").getOrCreate())


def main(argv: Sequence[str] | None = None, master: str | None = None,
         driver_memory: str = "4g") -> TrainingResult:
    """Parse, run, save, register; print where the result went. ``master``: run in this
    process on that master (not under spark-submit)."""
    p, out, no_register = parse_args(argv)
    spark = session(master, driver_memory)
    spark.sparkContext.setLogLevel("WARN")
    result = retrain(spark, p)
    result.save(out)
    print(f"result: {out} ({result.rows} rows, {result.seconds['total']:.0f} s, table "
          f"sha256 {result.table_sha256[:12]})")
    if not no_register:
        for name, what in register(result, out, p).items():
            print(f"{name}: {what}")
    all_rows = result.metrics[result.metrics["scope"] == "all"]
    print(all_rows.drop(columns=["scope", "group"]).to_string(index=False))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
