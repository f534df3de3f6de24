"""Market states: Spark MLlib ``KMeans`` with k chosen by silhouette, and
``BucketedRandomProjectionLSH`` for "the past windows most like now", with its recall and
speed measured against exact nearest neighbours.

Both work on :data:`CLUSTER_FEATURES`, the table's features without the spread itself, its
lags, moving statistics and run (:data:`ml.table.SPREAD_DERIVED`) and without the time of day,
median-imputed and standardized (``Imputer → VectorAssembler → StandardScaler``, mean 0 and
standard deviation 1 per column; a constant column stays 0).

* k in 2..8, each ``KMeans(k, seed)``; the k with the highest silhouette
  (``ClusteringEvaluator``, squared Euclidean; Rousseeuw 1987) wins.
* LSH (Datar et al. 2004, p-stable projections): on a sample, for ``queries`` rows drawn from
  it, the 10 nearest other rows by ``approxNearestNeighbors`` (hashes precomputed and cached)
  against the exact 10 by brute force with numpy; recall@10 = |LSH ∩ exact| / 10, averaged.
  Speed-up = time per query of an exact top-10 scan in Spark (distance expression over every
  row, then ``orderBy().limit()``) / time per query of the LSH look-up, same data, same
  session; the numpy brute-force time is reported beside them.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import numpy as np
from pyspark.ml import Pipeline, PipelineModel
from pyspark.ml.clustering import KMeans, KMeansModel
from pyspark.ml.evaluation import ClusteringEvaluator
from pyspark.ml.feature import (
    BucketedRandomProjectionLSH,
    BucketedRandomProjectionLSHModel,
    Imputer,
    StandardScaler,
    VectorAssembler,
)
from pyspark.ml.functions import vector_to_array
from pyspark.ml.linalg import Vectors
from pyspark.sql import DataFrame
from pyspark.sql import functions as F
from tqdm import tqdm

from ml.models import present
from ml.table import FEATURES, SPREAD_DERIVED

CLUSTER_FEATURES = tuple(c for c in FEATURES if c not in SPREAD_DERIVED | {"hour", "minute"})


@dataclass(frozen=True)
class ClusterParams:
    """``k_range``: candidate k; ``max_rows``: rows sampled for KMeans; ``lsh_rows`` and
    ``queries``: the LSH sample and its query count; ``bucket_length``, ``hash_tables``: LSH
    parameters (in standard deviations); ``neighbours``: k of k-NN."""

    k_range: tuple[int, ...] = tuple(range(2, 9))
    max_rows: int = 200_000
    lsh_rows: int = 50_000
    queries: int = 20
    bucket_length: float = 2.0
    hash_tables: int = 5
    neighbours: int = 10
    seed: int = 42


@dataclass
class ClusterResult:
    """The chosen k, every k's silhouette, the LSH measurements and the fitted models."""

    features: list[str]
    k: int
    silhouettes: dict[int, float]
    recall_at_k: float
    lsh_s_per_query: float
    exact_spark_s_per_query: float
    numpy_s_per_query: float
    rows: int
    models: dict[str, object] = field(default_factory=dict, repr=False)

    @property
    def speedup(self) -> float:
        return self.exact_spark_s_per_query / self.lsh_s_per_query

    def summary(self) -> dict:
        """The measurements as JSON-ready values."""
        return {"features": self.features, "k": self.k, "rows": self.rows,
                "silhouettes": {str(k): v for k, v in self.silhouettes.items()},
                "recall_at_10": self.recall_at_k, "lsh_s_per_query": self.lsh_s_per_query,
                "exact_spark_s_per_query": self.exact_spark_s_per_query,
                "numpy_s_per_query": self.numpy_s_per_query, "speedup": self.speedup}


def _sample(df: DataFrame, rows: int, seed: int) -> DataFrame:
    n = df.count()
    return df if n <= rows else df.sample(fraction=rows / n, seed=seed)


def standardize(table: DataFrame, seed: int, rows: int) -> tuple[PipelineModel, DataFrame]:
    """The fitted ``Imputer → VectorAssembler → StandardScaler`` and the sampled rows with
    ``scaled`` (a vector of the present :data:`CLUSTER_FEATURES`)."""
    data = _sample(table, rows, seed)
    cols = present(data, list(CLUSTER_FEATURES))
    imputed = [f"{c}__imp" for c in cols]
    prep = Pipeline(stages=[
        Imputer(inputCols=cols, outputCols=imputed, strategy="median"),
        VectorAssembler(inputCols=imputed, outputCol="raw"),
        StandardScaler(inputCol="raw", outputCol="scaled", withMean=True, withStd=True),
    ]).fit(data)
    return prep, prep.transform(data).select("t_ms", "pair", "scaled").cache()


def choose_k(scaled: DataFrame, p: ClusterParams, progress: bool = True
             ) -> tuple[KMeansModel, dict[int, float]]:
    """The KMeans model of the best silhouette and every k's silhouette."""
    evaluator = ClusteringEvaluator(featuresCol="scaled", predictionCol="cluster")
    fits, scores = {}, {}
    for k in tqdm(p.k_range, desc="k-means", file=sys.stderr, disable=not progress):
        fits[k] = KMeans(k=k, seed=p.seed, featuresCol="scaled", predictionCol="cluster").fit(
            scaled)
        scores[k] = float(evaluator.evaluate(fits[k].transform(scaled)))
    best = max(scores, key=lambda k: scores[k])
    return fits[best], scores


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure_lsh(scaled: DataFrame, p: ClusterParams, progress: bool = True
                ) -> tuple[BucketedRandomProjectionLSHModel, float, float, float, float]:
    """LSH model, recall@k and seconds per query of LSH, exact Spark and numpy top-k."""
    data = _sample(scaled, p.lsh_rows, p.seed).select(
        F.monotonically_increasing_id().alias("id"), "scaled")
    lsh = BucketedRandomProjectionLSH(inputCol="scaled", outputCol="hashes", seed=p.seed,
                                      bucketLength=p.bucket_length,
                                      numHashTables=p.hash_tables).fit(data)
    hashed = lsh.transform(data).cache()
    local = hashed.select("id", vector_to_array("scaled").alias("x")).toPandas()
    ids, x = local["id"].to_numpy(), np.stack(local["x"].to_numpy())
    rng = np.random.default_rng(p.seed)
    picks = rng.choice(len(ids), size=min(p.queries, len(ids)), replace=False)
    arr, k = vector_to_array("scaled"), p.neighbours
    recalls, t_lsh, t_exact, t_np = [], 0.0, 0.0, 0.0
    for i in tqdm(picks, desc="LSH queries", file=sys.stderr, disable=not progress):
        q = x[i]
        dt, dist = _timed(lambda q=q: np.sqrt(((x - q) ** 2).sum(axis=1)))
        t_np += dt
        exact = set(ids[np.argsort(dist, kind="stable")[:k + 1]]) - {ids[i]}
        lit = F.array(*[F.lit(float(v)) for v in q])
        sq = F.aggregate(F.zip_with(arr, lit, lambda a, b: (a - b) * (a - b)), F.lit(0.0),
                         lambda acc, v: acc + v)
        dt, _ = _timed(lambda sq=sq: hashed.select("id", sq.alias("d")).orderBy("d")
                       .limit(k + 1).collect())
        t_exact += dt
        dt, rows = _timed(lambda q=q: lsh.approxNearestNeighbors(
            hashed, Vectors.dense(q), k + 1).select("id").collect())
        t_lsh += dt
        found = {r["id"] for r in rows} - {ids[i]}
        recalls.append(len(found & exact) / k)
    n = len(picks)
    hashed.unpersist()
    return lsh, float(np.mean(recalls)), t_lsh / n, t_exact / n, t_np / n


def cluster(table: DataFrame, p: ClusterParams, progress: bool = True) -> ClusterResult:
    """KMeans with k by silhouette and the LSH measurements over ``table`` (the training
    table, :data:`ml.table.FEATURES` columns)."""
    prep, scaled = standardize(table, p.seed, p.max_rows)
    kmeans, scores = choose_k(scaled, p, progress)
    lsh, recall, t_lsh, t_exact, t_np = measure_lsh(scaled, p, progress)
    rows = scaled.count()
    scaled.unpersist()
    return ClusterResult(
        features=list(prep.stages[0].getInputCols()), k=kmeans.getK(), silhouettes=scores,
        recall_at_k=recall, lsh_s_per_query=t_lsh, exact_spark_s_per_query=t_exact,
        numpy_s_per_query=t_np, rows=rows,
        models={"cluster_prep": prep, "kmeans": kmeans, "lsh": lsh})
