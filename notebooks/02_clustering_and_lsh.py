# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 2. Market states: k-means and LSH, tested on a held-out day
#
# The design's clustering, with the platform's own code (`ml/cluster.py` on `ml/table.py`'s
# training table, Spark MLlib in a local session):
#
# 1. **k-means** on the market-state features (`ml.cluster.CLUSTER_FEATURES`: the legs' mids,
#    returns, volatilities, quoted spreads, fees, the stablecoins' deviations; *not* the spread
#    itself, its lags or the time of day), median-imputed and standardized; k chosen by the
#    silhouette (Rousseeuw 1987; squared Euclidean, Spark's `ClusteringEvaluator`), fitted on
#    the **first day** only.
# 2. **LSH** (`BucketedRandomProjectionLSH`, Datar et al. 2004): "the past windows most like
#    now" without a full scan. recall@10 = |LSH top-10 ∩ exact top-10| / 10 averaged over
#    query rows; speed-up = seconds per query of an exact top-10 scan in Spark / of the LSH
#    look-up, same data and session (`ml.cluster.measure_lsh`).
# 3. **Do the states matter?** On the **held-out second day**, every row is assigned to its
#    nearest first-day centre, and the absolute cross-exchange price difference |gross bps|
#    (sell bid over buy ask, before fees; absolute, because the two directions of a route
#    have opposite signs) is compared across clusters with Welch's ANOVA (Welch 1951, unequal
#    variances, `statsmodels.stats.oneway.anova_oneway`), its effect size ω² and the
#    Games-Howell post-hoc test (Games & Howell 1976).
#
# Parameters: `lake_dir` (empty: the user's lake), `fit_day`, `heldout_day` (UTC dates),
# `k_min`..`k_max`, `max_rows` (rows sampled for k-means; the silhouette is O(n²) in the
# test's re-derivation), `lsh_rows`, `queries`, `bucket_length` and `hash_tables` (LSH),
# `seed`, and the local Spark session's `spark_master`, `driver_memory`,
# `shuffle_partitions`.

# %% tags=["parameters"]
out_dir = "build/notebooks/02_clustering_and_lsh"
lake_dir = ""
fit_day = "2023-03-09"
heldout_day = "2023-03-10"
k_min = 2
k_max = 8
max_rows = 20000
lsh_rows = 25000  # > max_rows: the LSH sample is the k-means sample, replayed below
queries = 20
bucket_length = 2.0
hash_tables = 5
seed = 42
spark_master = "local[2]"
driver_memory = "2g"
shuffle_partitions = 2

# %%
import dataclasses
import json
import shutil
import tempfile
from datetime import date
from itertools import combinations
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from pyspark.ml.functions import vector_to_array
from pyspark.ml.linalg import Vectors
from pyspark.sql import functions as F
from scipy import stats
from statsmodels.stats.oneway import anova_oneway

from arbstream.config import Settings
from arbstream.shell.stack import ensure_java
from ml.cluster import ClusterParams, choose_k, measure_lsh, standardize
from ml.table import DATASETS, load_table
from spark_jobs.session import build_session

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
settings = Settings()
lake = lake_dir or str(settings.lake_root)
if not (Path(lake) / "spread").is_dir():
    raise ValueError(f"no spread records in the lake {lake}: run `arbstream backfill` first")
fit, held = date.fromisoformat(fit_day), date.fromisoformat(heldout_day)
if held <= fit:
    raise ValueError(f"the held-out day {held} must come after the fit day {fit}")
params = ClusterParams(k_range=tuple(range(k_min, k_max + 1)), max_rows=max_rows,
                       lsh_rows=lsh_rows, queries=queries, bucket_length=bucket_length,
                       hash_tables=hash_tables, seed=seed)
ensure_java()
spark = build_session(settings.model_copy(update={
    "spark_master": spark_master, "spark_driver_memory": driver_memory,
    "spark_shuffle_partitions": shuffle_partitions,
    "state_dir": (state := Path(tempfile.mkdtemp(prefix="nb02-")))}), app_name="notebook-02")
spark.sparkContext.setLogLevel("ERROR")
print(f"lake {lake}; fit on {fit}, held out {held}; Spark {spark.version} {spark_master}")

# %% [markdown]
# ## The training table
#
# `ml.table.load_table` over both days: one row per pair and 60 s step, every feature from
# the pair's past and present only (`ml/table.py`), so a held-out row's features may look
# back into the first day but nothing of the held-out day reaches the fit, which uses the
# first day's rows alone.

# %%
table = load_table(spark, lake, dataclasses.replace(DATASETS["iaqf"], start=fit, end=held))
table = table.withColumn("day", F.to_date("window_end")).cache()
fit_table = table.where(F.col("day") == F.lit(fit))
held_table = table.where(F.col("day") == F.lit(held))
counts = {r["day"]: r["count"] for r in table.groupBy("day").count().collect()}
n_fit, n_held = counts.get(fit, 0), counts.get(held, 0)
if not n_fit or not n_held:
    raise ValueError(f"empty table: {n_fit} rows on {fit}, {n_held} on {held} in {lake}")
print(f"{n_fit:,} rows on {fit}, {n_held:,} on {held}")

# %% [markdown]
# ## k-means, k by silhouette (first day)

# %%
prep, scaled = standardize(fit_table, seed, max_rows)
kmeans, silhouettes = choose_k(scaled, params, progress=False)
k = kmeans.getK()
features = list(prep.stages[0].getInputCols())
print(f"{scaled.count():,} rows, {len(features)} features; silhouette by k:",
      {kk: round(v, 4) for kk, v in silhouettes.items()}, f"→ k = {k}")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(list(silhouettes), list(silhouettes.values()), marker="o")
ax.axvline(k, color="k", ls=":", lw=1)
ax.set_xlabel("k")
ax.set_ylabel("silhouette (squared Euclidean)")
ax.set_title(f"k-means on {fit}: silhouette by k")
fig.tight_layout()
fig.savefig(out / "silhouette_by_k.png", dpi=100)

# the standardized sample and its labels, for re-deriving the silhouette outside Spark
assigned = kmeans.transform(scaled).select(
    "pair", "t_ms", "cluster", vector_to_array("scaled").alias("x")).toPandas()
fit_sample = pd.DataFrame(np.stack(assigned["x"].to_numpy()), columns=features)
fit_sample.insert(0, "cluster", assigned["cluster"].to_numpy())
fit_sample.to_parquet(out / "fit_sample.parquet", index=False)

centres = pd.DataFrame(np.array(kmeans.clusterCenters()), columns=features)
fig, ax = plt.subplots(figsize=(12, 0.5 * k + 2))
image = ax.imshow(centres.to_numpy(), aspect="auto", cmap="RdBu_r", vmin=-3, vmax=3)
ax.set_xticks(range(len(features)), features, rotation=90, fontsize=7)
ax.set_yticks(range(k), [f"cluster {c}" for c in range(k)])
fig.colorbar(image, ax=ax, label="centre, standard deviations")
ax.set_title("Cluster centres (standardized features)")
fig.savefig(out / "cluster_centres.png", dpi=100, bbox_inches="tight")
centres.round(2)

# %% [markdown]
# ## LSH: recall@10 and speed-up (first day)
#
# `ml.cluster.measure_lsh` reports recall@10 and the times. Its query rows are then looked up
# again here with the fitted LSH model and written out (`lsh_queries.json`, the sample
# `lsh_sample.parquet`), so recall@10 can be re-derived against exact neighbours outside
# Spark; the replay must give the same recall.

# %%
lsh, recall, t_lsh, t_exact, t_np = measure_lsh(scaled, params, progress=False)
print(f"recall@{params.neighbours} = {recall:.3f}; per query: LSH {t_lsh * 1e3:.1f} ms, "
      f"exact Spark scan {t_exact * 1e3:.1f} ms (speed-up {t_exact / t_lsh:.1f}x), "
      f"numpy brute force {t_np * 1e3:.2f} ms")

if scaled.count() > lsh_rows:
    raise ValueError("lsh_rows < rows: measure_lsh samples; raise lsh_rows to replay it")
data = scaled.select(F.monotonically_increasing_id().alias("id"), "scaled")
hashed = lsh.transform(data).cache()
local = hashed.select("id", vector_to_array("scaled").alias("x")).toPandas()
ids, x = local["id"].to_numpy(), np.stack(local["x"].to_numpy())
picks = np.random.default_rng(seed).choice(len(ids), size=min(queries, len(ids)),
                                           replace=False)
lookups = {}
for i in picks:
    found = lsh.approxNearestNeighbors(hashed, Vectors.dense(x[i]), params.neighbours + 1)
    lookups[int(ids[i])] = [int(r["id"]) for r in found.select("id").collect()
                            if r["id"] != ids[i]][:params.neighbours]
hashed.unpersist()
pd.DataFrame(x, columns=features).assign(id=ids).to_parquet(out / "lsh_sample.parquet",
                                                            index=False)
(out / "lsh_queries.json").write_text(json.dumps(lookups))
exact = {}
for qid in lookups:
    d = np.sqrt(((x - x[ids == qid][0]) ** 2).sum(axis=1))
    exact[qid] = set(ids[np.argsort(d, kind="stable")[:params.neighbours + 1]]) - {qid}
replayed = float(np.mean([len(set(v) & exact[q]) / params.neighbours
                          for q, v in lookups.items()]))
print(f"replayed recall@{params.neighbours} = {replayed:.3f}")
assert abs(replayed - recall) < 1e-12, (replayed, recall)

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.bar(["LSH", "exact (Spark)", "exact (numpy)"], [t_lsh * 1e3, t_exact * 1e3, t_np * 1e3])
ax.set_ylabel("ms per query")
ax.set_title(f"top-{params.neighbours} look-up: recall {recall:.2f}, "
             f"speed-up {t_exact / t_lsh:.1f}x over a Spark scan")
fig.tight_layout()
fig.savefig(out / "lsh_speed.png", dpi=100)

# %% [markdown]
# ## Held-out day: do the clusters separate the price differences?
#
# Every held-out row goes through the *first day's* imputer, scaler and centres. Welch's
# ANOVA of |gross bps| across clusters (unequal variances). Effect size: ω² estimated from
# Welch's F as (k − 1)(F − 1) / ((k − 1)(F − 1) + N) (Carroll & Nordholm 1975; Albers & Lakens
# 2018), the share of variance the cluster explains, near 0 when the states do not matter.
# Post-hoc: Games-Howell (Games & Howell 1976) for every pair of clusters: the difference of
# means over sqrt(s²ᵢ/nᵢ + s²ⱼ/nⱼ), Welch-Satterthwaite degrees of freedom, p from the
# studentized range distribution with k groups (`scipy.stats.studentized_range`).
#
# First, **distribution shift**: the share of rows with some feature beyond 5 of the first
# day's standard deviations, and the clusters' shares, on each day. When the held-out day
# lies far outside the fit day (the depeg moves the stablecoin deviations by many standard
# deviations of a calm day), the nearest-centre assignment is an extrapolation: the clusters
# then say "unlike anything in the fit", and the ANOVA compares those groups.
#
# Caveats: consecutive windows of a pair are serially correlated, so N overstates the
# independent evidence and the p-values are optimistic; ω² and the mean differences are
# the numbers to read. And look at which pairs fill each cluster (the table below): the
# features include the legs' mids, so a cluster can be an instrument (the stablecoin route,
# mids near 1) rather than a market state; then the ANOVA compares instruments.

# %%
held_rows = kmeans.transform(prep.transform(held_table)).select(
    "symbol", "sell_symbol", "buy_exchange", "sell_exchange", "t_ms", "pair", "cluster",
    "gross_bps", vector_to_array("scaled").alias("z")).toPandas()
held_rows["abs_gross_bps"] = held_rows["gross_bps"].abs()
missing = held_rows["gross_bps"].isna().sum()
if missing:
    raise ValueError(f"{missing} held-out rows without gross_bps")
# distribution shift: the largest |feature| in the first day's standard deviations
held_rows["max_abs_z"] = [float(np.abs(z).max()) for z in held_rows.pop("z")]
held_rows.to_parquet(out / "heldout.parquet", index=False)
fit_max_z = np.abs(fit_sample[features].to_numpy()).max(axis=1)
shift = {
    "fit_beyond_5sd_share": float((fit_max_z > 5).mean()),
    "heldout_beyond_5sd_share": float((held_rows["max_abs_z"] > 5).mean()),
    "fit_cluster_share": {str(c): float(v) for c, v in
                          fit_sample["cluster"].value_counts(normalize=True).items()},
    "heldout_cluster_share": {str(c): float(v) for c, v in
                              held_rows["cluster"].value_counts(normalize=True).items()},
}
print("distribution shift:", shift)

welch = anova_oneway(held_rows["abs_gross_bps"], groups=held_rows["cluster"],
                     use_var="unequal", welch_correction=True)
groups = {c: g.to_numpy() for c, g in held_rows.groupby("cluster")["abs_gross_bps"]}
n_groups, n_total = len(groups), len(held_rows)
omega2 = (n_groups - 1) * (welch.statistic - 1) / (
    (n_groups - 1) * (welch.statistic - 1) + n_total)
print(f"Welch F({welch.df_num:.0f}, {welch.df_denom:.1f}) = {welch.statistic:.2f}, "
      f"p = {welch.pvalue:.3g}, ω² = {omega2:.3f} over {n_total:,} rows, {n_groups} clusters")


def games_howell(groups: dict) -> pd.DataFrame:
    """Games-Howell pairwise comparisons of ``groups`` (label -> values)."""
    rows = []
    for a, b in combinations(sorted(groups), 2):
        xa, xb = groups[a], groups[b]
        va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
        diff = xa.mean() - xb.mean()
        df = (va + vb) ** 2 / (va ** 2 / (len(xa) - 1) + vb ** 2 / (len(xb) - 1))
        q = abs(diff) / np.sqrt((va + vb) / 2)
        rows.append({"a": a, "b": b, "mean_diff_bps": diff, "df": df,
                     "p": float(stats.studentized_range.sf(q, len(groups), df))})
    return pd.DataFrame(rows)


posthoc = games_howell(groups) if n_groups > 1 else pd.DataFrame()
by_cluster = held_rows.groupby("cluster")["abs_gross_bps"].agg(["size", "mean", "std",
                                                                "median"])
fig, ax = plt.subplots(figsize=(7, 4))
ax.boxplot([groups[c] for c in sorted(groups)], showfliers=False)
ax.set_xticks(range(1, n_groups + 1), [f"{c} (n={len(groups[c]):,})" for c in sorted(groups)])
ax.set_xlabel("cluster (fitted on the first day)")
ax.set_ylabel("|gross spread|, bps")
ax.set_title(f"Held-out {held}: Welch F = {welch.statistic:.1f}, ω² = {omega2:.3f}")
fig.tight_layout()
fig.savefig(out / "heldout_by_cluster.png", dpi=100)
by_cluster["top_pairs"] = held_rows.groupby("cluster")["pair"].agg(
    lambda s: ", ".join(f"{p} ({n})" for p, n in s.value_counts().head(3).items()))
display(by_cluster.round(2))  # noqa: F821 (IPython)
posthoc.round(4)

# %% [markdown]
# ## Results

# %%
results = {
    "lake_dir": lake, "fit_day": fit.isoformat(), "heldout_day": held.isoformat(),
    "features": features, "fit_rows": int(scaled.count()), "k": int(k),
    "silhouettes": {str(kk): float(v) for kk, v in silhouettes.items()},
    "lsh": {"rows": len(ids), "queries": len(lookups), "recall_at_10": recall,
            "lsh_s_per_query": t_lsh, "exact_spark_s_per_query": t_exact,
            "numpy_s_per_query": t_np, "speedup": t_exact / t_lsh},
    "heldout": {"rows": n_total, "clusters": {str(c): int(n) for c, n in
                                              by_cluster["size"].items()},
                "mean_abs_gross_bps": {str(c): float(v) for c, v in
                                       by_cluster["mean"].items()},
                "welch_f": float(welch.statistic), "welch_p": float(welch.pvalue),
                "df_num": float(welch.df_num), "df_denom": float(welch.df_denom),
                "omega2": float(omega2), "shift": shift,
                "games_howell": posthoc.to_dict(orient="records")},
}
(out / "results.json").write_text(json.dumps(results, indent=1, default=float))
scaled.unpersist()
table.unpersist()
spark.stop()
shutil.rmtree(state, ignore_errors=True)
print(f"wrote {out / 'results.json'}")
