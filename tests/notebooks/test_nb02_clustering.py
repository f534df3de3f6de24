"""Notebook 2 (k-means and LSH, Welch ANOVA on a held-out day) on the real two-day lake, with
a small local Spark session in its kernel: the silhouette re-derived with scikit-learn on the
standardized sample and labels the notebook saved, recall@10 against exact neighbours by
scikit-learn's ``NearestNeighbors``, and Welch's F and p, ω² and the Games-Howell post-hoc
test by their formulas on the held-out rows' |gross bps| read straight from the lake."""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import silhouette_score
from sklearn.neighbors import NearestNeighbors

from testing.notebooks import NOTEBOOKS, run_notebook

pytestmark = pytest.mark.e2e  # Spark runs in the notebook's kernel

SOURCE = NOTEBOOKS / "02_clustering_and_lsh.py"
#: A small, fast slice of the notebook's defaults: k in 2..3, 3,000 rows, 5 LSH queries.
PARAMS = {"fit_day": "2023-03-09", "heldout_day": "2023-03-10", "k_min": 2, "k_max": 3,
          "max_rows": 3000, "lsh_rows": 5000, "queries": 5, "spark_master": "local[1]",
          "driver_memory": "1g", "shuffle_partitions": 1}
PNGS = ("silhouette_by_k.png", "cluster_centres.png", "lsh_speed.png", "heldout_by_cluster.png")
PAIR = ["symbol", "sell_symbol", "buy_exchange", "sell_exchange"]


@pytest.fixture(scope="module")
def executed(iaqf_lake: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("nb02")
    return run_notebook(SOURCE, out, {**PARAMS, "lake_dir": str(iaqf_lake)}), out


def test_the_notebook_runs_and_writes_its_plots(executed) -> None:
    results, out = executed
    nb = nbformat.read(out / "02_clustering_and_lsh.ipynb", as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", ())
                if o["output_type"] == "error"]
    for png in PNGS:
        assert (out / png).stat().st_size > 1000, png
    assert sorted(results["silhouettes"]) == ["2", "3"]


def test_silhouette_recomputes_with_scikit_learn(executed) -> None:
    results, out = executed
    sample = pd.read_parquet(out / "fit_sample.parquet")
    x, labels = sample[results["features"]].to_numpy(), sample["cluster"].to_numpy()
    assert len(x) == results["fit_rows"] > 1000
    # the scaler was fitted on exactly these rows: mean 0, sample std 1 (0 if constant)
    assert np.allclose(x.mean(axis=0), 0.0, atol=1e-9)
    std = x.std(axis=0, ddof=1)
    assert np.allclose(std[std > 1e-12], 1.0, atol=1e-9)
    k = results["k"]
    assert str(k) == max(results["silhouettes"], key=results["silhouettes"].get)
    assert len(np.unique(labels)) == k
    ours = silhouette_score(x, labels, metric="sqeuclidean")
    assert ours == pytest.approx(results["silhouettes"][str(k)], abs=1e-6)


def test_lsh_recall_at_10_against_exact_neighbours(executed) -> None:
    results, out = executed
    sample = pd.read_parquet(out / "lsh_sample.parquet")
    lookups = {int(q): v for q, v in json.loads((out / "lsh_queries.json").read_text()).items()}
    ids = sample["id"].to_numpy()
    x = sample[results["features"]].to_numpy()
    assert len(lookups) == results["lsh"]["queries"] == PARAMS["queries"]
    row = {i: n for n, i in enumerate(ids)}
    nn = NearestNeighbors(n_neighbors=12).fit(x)
    recalls = []
    for query, found in lookups.items():
        assert len(found) <= 10 and set(found) <= set(row) and query not in found
        dist, idx = nn.kneighbors(x[[row[query]]])
        others = [(d, ids[i]) for d, i in zip(dist[0], idx[0], strict=True) if ids[i] != query]
        # the exact top 10 is unambiguous: no tie between the 10th and 11th distance
        assert others[9][0] < others[10][0], (query, others[9:11])
        exact = {i for _, i in others[:10]}
        recalls.append(len(set(found) & exact) / 10)
    assert np.mean(recalls) == pytest.approx(results["lsh"]["recall_at_10"], abs=1e-12)
    for key in ("lsh_s_per_query", "exact_spark_s_per_query", "numpy_s_per_query"):
        assert np.isfinite(results["lsh"][key]) and results["lsh"][key] > 0
    assert results["lsh"]["speedup"] == pytest.approx(
        results["lsh"]["exact_spark_s_per_query"] / results["lsh"]["lsh_s_per_query"])


@pytest.fixture(scope="module")
def heldout(executed, iaqf_lake: Path) -> pd.DataFrame:
    """The notebook's held-out assignment joined to the lake's own spread rows of the day."""
    _, out = executed
    rows = pd.read_parquet(out / "heldout.parquet")
    spread = pd.read_parquet(iaqf_lake / "spread", filters=[("date", "=", "2023-03-10")])
    spread["t_ms"] = (spread["window_end"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(
        milliseconds=1)
    joined = rows[[*PAIR, "t_ms", "cluster", "max_abs_z"]].merge(
        spread[[*PAIR, "t_ms", "gross_bps"]], on=[*PAIR, "t_ms"], how="outer", indicator=True)
    assert (joined["_merge"] == "both").all(), joined["_merge"].value_counts()
    return joined


def _welch(groups: list[np.ndarray]) -> tuple[float, float, float]:
    """Welch's (1951) F test of equal means with unequal variances: F, df2, p."""
    k = len(groups)
    n = np.array([len(g) for g in groups])
    m = np.array([g.mean() for g in groups])
    w = n / np.array([g.var(ddof=1) for g in groups])
    mw = (w * m).sum() / w.sum()
    tmp = ((1 - w / w.sum()) ** 2 / (n - 1)).sum()
    f = ((w * (m - mw) ** 2).sum() / (k - 1)) / (1 + 2 * (k - 2) / (k * k - 1) * tmp)
    df2 = (k * k - 1) / (3 * tmp)
    return f, df2, stats.f.sf(f, k - 1, df2)


def test_welch_anova_omega2_and_games_howell_on_the_held_out_day(executed, heldout) -> None:
    results, _ = executed
    got = results["heldout"]
    heldout["abs_gross"] = heldout["gross_bps"].abs()
    groups = {int(c): g.to_numpy() for c, g in heldout.groupby("cluster")["abs_gross"]}
    assert got["rows"] == len(heldout) == sum(got["clusters"].values())
    assert {int(c): n for c, n in got["clusters"].items()} == {c: len(g) for c, g in
                                                               groups.items()}
    for c, g in groups.items():
        assert got["mean_abs_gross_bps"][str(c)] == pytest.approx(g.mean(), rel=1e-9)
    f, df2, p = _welch(list(groups.values()))
    k, n = len(groups), len(heldout)
    assert got["welch_f"] == pytest.approx(f, rel=1e-9)
    assert got["df_num"] == k - 1 and got["df_denom"] == pytest.approx(df2, rel=1e-9)
    assert got["welch_p"] == pytest.approx(p, rel=1e-6, abs=1e-300)
    omega2 = (k - 1) * (f - 1) / ((k - 1) * (f - 1) + n)
    assert got["omega2"] == pytest.approx(omega2, rel=1e-9)
    pairs = list(combinations(sorted(groups), 2))
    assert len(got["games_howell"]) == len(pairs)
    for (a, b), row in zip(pairs, got["games_howell"], strict=True):
        xa, xb = groups[a], groups[b]
        va, vb = xa.var(ddof=1) / len(xa), xb.var(ddof=1) / len(xb)
        df = (va + vb) ** 2 / (va ** 2 / (len(xa) - 1) + vb ** 2 / (len(xb) - 1))
        q = abs(xa.mean() - xb.mean()) / np.sqrt((va + vb) / 2)
        assert (row["a"], row["b"]) == (a, b)
        assert row["mean_diff_bps"] == pytest.approx(xa.mean() - xb.mean(), rel=1e-9)
        assert row["df"] == pytest.approx(df, rel=1e-9)
        assert row["p"] == pytest.approx(stats.studentized_range.sf(q, k, df), rel=1e-6,
                                         abs=1e-15)


def test_distribution_shift_between_the_fit_and_held_out_days(executed, heldout) -> None:
    """The shares of rows beyond 5 fit-day standard deviations and per cluster: the fit
    day's from the saved standardized sample, the held-out day's from the saved per-row
    maximum |z| and clusters (joined to the lake above)."""
    results, out = executed
    shift = results["heldout"]["shift"]
    sample = pd.read_parquet(out / "fit_sample.parquet")
    fit_z = np.abs(sample[results["features"]].to_numpy()).max(axis=1)
    assert shift["fit_beyond_5sd_share"] == pytest.approx((fit_z > 5).mean(), rel=1e-12)
    assert shift["heldout_beyond_5sd_share"] == pytest.approx(
        (heldout["max_abs_z"] > 5).mean(), rel=1e-12)
    for key, labels in (("fit_cluster_share", sample["cluster"]),
                        ("heldout_cluster_share", heldout["cluster"])):
        expect = labels.value_counts(normalize=True)
        assert {int(c): v for c, v in shift[key].items()} == pytest.approx(
            {int(c): v for c, v in expect.items()}, rel=1e-12)
