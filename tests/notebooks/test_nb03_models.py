"""Notebook 3 (the registered models). Here: an empty registry is skipped cleanly with a
message. With a real registry (the one ``spark-submit ml/retrain.py`` registered into) the
notebook runs in ``tests/ml/test_retrain_job.py``, which calls :func:`check_models_notebook`:
every number re-derived from the version's files and the lake's Parquet with pandas, numpy
and scikit-learn, not through the registry's or the notebook's code."""

from __future__ import annotations

import json
from pathlib import Path

import joblib
import nbformat
import numpy as np
import pandas as pd
import pytest
from sklearn.inspection import permutation_importance
from sklearn.metrics import average_precision_score, brier_score_loss

from testing.notebooks import NOTEBOOKS, run_notebook

SOURCE = NOTEBOOKS / "03_models.py"
#: Registry name -> the ``pred_<model>`` column of its version's predictions.
MODELS = {"opportunity_scorer": "rf", "net_bps_regressor": "gbr_online"}
PAIR = ["symbol", "sell_symbol", "buy_exchange", "sell_exchange"]
#: The online features (``arbstream.features.ONLINE_FEATURES``), in the models' order.
ONLINE = ["net_bps", "gross_bps", "fees_bps", "spread_mean_bps", "spread_std_bps", "spread_z",
          "cross_quote", "conversion_dev_bps", "log_size_usd", "leg_lag_s", "hour", "minute"]
PNGS = ("fold_skill.png", "reliability.png", "permutation_importance.png",
        "error_by_regime.png")


def _no_errors(executed: Path) -> None:
    nb = nbformat.read(executed, as_version=4)
    assert not [o for c in nb.cells for o in c.get("outputs", ())
                if o["output_type"] == "error"]


def test_an_empty_registry_is_skipped_with_a_message(tmp_path: Path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    results = run_notebook(SOURCE, tmp_path / "out", {"registry_dir": str(empty),
                                                      "lake_dir": str(tmp_path / "lake")})
    assert results == {"skipped": f"no model registered in {empty}"}
    _no_errors(tmp_path / "out" / "03_models.ipynb")
    nb = nbformat.read(tmp_path / "out" / "03_models.ipynb", as_version=4)
    text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", ()))
    assert "Nothing to show: no model registered in" in text
    assert not list((tmp_path / "out").glob("*.png"))


def _online_features(s: pd.DataFrame) -> pd.DataFrame:
    """The online features of spread rows, written out from their definitions."""
    fees = s[["buy_fee", "sell_fee", "conversion_fee"]].fillna(0.0).sum(axis=1) * 1e4
    usd = s["usd_rate"].where(s["usd_rate"].notna() & (s["usd_rate"] != 0), 1.0)
    size_usd = (s["size_base"] * s["buy_ask"] * usd).where(
        s["size_base"].notna() & (s["buy_ask"] != 0))
    return pd.DataFrame({
        "net_bps": s["net_bps"], "gross_bps": s["gross_bps"], "fees_bps": fees,
        "spread_mean_bps": s["spread_mean_bps"], "spread_std_bps": s["spread_std_bps"],
        "spread_z": s["spread_z"], "cross_quote": s["cross_quote"].fillna(False).astype(float),
        "conversion_dev_bps": ((s["conversion_rate"] - 1.0) * 1e4).fillna(0.0),
        "log_size_usd": np.log1p(size_usd.where(size_usd >= 0)),
        "leg_lag_s": (s["buy_ts"] - s["sell_ts"]).abs().dt.total_seconds(),
        "hour": s["window_end"].dt.hour.astype(float),
        "minute": s["window_end"].dt.minute.astype(float),
    }, index=s.index).astype(float)


def _heldout(lake: Path, since: pd.Timestamp, steps: int, rows: int, seed: int
             ) -> pd.DataFrame:
    """Labelled held-out rows: spread rows after ``since`` on the 60 s grid whose pair has a
    row ``steps`` steps later; a sample of ``rows`` (pandas' ``sample``), by time and pair."""
    s = pd.read_parquet(lake / "spread").drop(columns="date")
    s["t_ms"] = (s["window_end"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(milliseconds=1)
    s = s[(s["t_ms"] % 60_000 == 0) & (s["window_end"] > since)].drop_duplicates([*PAIR,
                                                                                 "t_ms"])
    later = s[[*PAIR, "t_ms", "net", "net_bps"]].rename(
        columns={"net": "net_ahead", "net_bps": "net_bps_ahead"})
    later["t_ms"] -= steps * 60_000
    s = s.merge(later, on=[*PAIR, "t_ms"])
    s = pd.concat([s[[*PAIR, "t_ms", "net_ahead", "net_bps_ahead"]], _online_features(s)],
                  axis=1).sort_values(["t_ms", *PAIR], ignore_index=True)
    if len(s) > rows:
        s = s.sample(n=rows, random_state=seed).sort_values(["t_ms", *PAIR], ignore_index=True)
    return s


def _ece(y: np.ndarray, p: np.ndarray) -> float:
    """Expected calibration error (Naeini et al. 2015): 10 bins [edge k, edge k+1) of
    ``np.linspace(0, 1, 11)``, the last one closed (``ml.walkforward.ece``'s convention; the
    scores of a 10-tree forest lie on the edges)."""
    which = np.digitize(p, np.linspace(0, 1, 11)[1:-1])
    return sum(abs(y[which == b].mean() - p[which == b].mean()) * (which == b).sum()
               for b in np.unique(which)) / len(y)


def check_models_notebook(results: dict, out: Path, models_dir: Path, lake: Path,
                          version: int, max_rows: int, n_repeats: int, seed: int) -> None:
    """Re-derive notebook 3's ``results.json`` for ``version`` of both registered models."""
    _no_errors(out / "03_models.ipynb")
    for png in PNGS:
        assert (out / png).stat().st_size > 1000, png
    for name, who in MODELS.items():
        root = models_dir / name / str(version)
        card = json.loads((root / "card.json").read_text())
        preds = pd.read_parquet(root / "predictions.parquet")
        got = results["cards"][name]
        assert (got["version"], got["status"], got["kind"], got["rows"]) == (
            version, card["status"], card["target"]["kind"], card["data"]["rows"])
        assert got["features"] == [f["name"] for f in card["features"]] == ONLINE
        classifier = card["target"]["kind"] == "classification"
        # skill per fold, from the out-of-sample predictions
        folds = {r["fold"]: r for r in results["fold_skill"][name]}
        assert sorted(folds) == sorted(preds["fold"].unique())
        for fold, rows in preds.groupby("fold"):
            if classifier:
                y = rows["y_exec"].to_numpy(int)
                mine = brier_score_loss(y, rows[f"pred_{who}"], labels=[0, 1])
                base = brier_score_loss(y, rows["pred_base_rate"], labels=[0, 1])
                assert folds[fold]["brier"] == pytest.approx(mine, rel=1e-9)
                skill = 1 - mine / base
            else:
                y = rows["y_next_bps"].to_numpy(float)
                mse = np.mean((rows[f"pred_{who}"] - y) ** 2)
                skill = 1 - mse / np.mean((rows["pred_persistence"] - y) ** 2)
                assert folds[fold]["rmse"] == pytest.approx(np.sqrt(mse), rel=1e-9)
            assert folds[fold]["rows"] == len(rows)
            assert folds[fold]["skill"] == pytest.approx(skill, rel=1e-9, abs=1e-12)
        # error by regime
        for regime, rows in preds.groupby("regime"):
            g = results["by_regime"][name][regime]
            p = rows[f"pred_{who}"].to_numpy(float)
            assert g["rows"] == len(rows)
            if classifier:
                y = rows["y_exec"].to_numpy(int)
                assert g["brier"] == pytest.approx(np.mean((p - y) ** 2), rel=1e-9)
                assert g["ece"] == pytest.approx(_ece(y, p), rel=1e-9, abs=1e-12)
                if y.any():
                    assert g["auc_pr"] == pytest.approx(average_precision_score(y, p),
                                                        rel=1e-9)
            else:
                e = p - rows["y_next_bps"].to_numpy(float)
                e0 = rows["pred_persistence"].to_numpy(float) - rows["y_next_bps"].to_numpy(
                    float)
                assert g["mae"] == pytest.approx(np.abs(e).mean(), rel=1e-9)
                assert g["rmse"] == pytest.approx(np.sqrt((e ** 2).mean()), rel=1e-9)
                assert g["skill"] == pytest.approx(1 - (e ** 2).mean() / (e0 ** 2).mean(),
                                                   rel=1e-9)
        # calibration of the scorer: 10 equal-width bins, empty ones left out
        if classifier:
            y, p = preds["y_exec"].to_numpy(int), preds[f"pred_{who}"].to_numpy(float)
            which = np.digitize(p, np.linspace(0, 1, 11)[1:-1], right=True)
            bins = np.unique(which)
            cal = results["calibration"][name]
            assert cal["predicted"] == pytest.approx([p[which == b].mean() for b in bins])
            assert cal["observed"] == pytest.approx([y[which == b].mean() for b in bins])
            assert cal["ece"] == pytest.approx(_ece(y, p), rel=1e-9)
        # permutation importance on held-out lake rows, with the version's own model file
        steps = round(card["target"]["horizon_s"] / 60)
        rows = _heldout(lake, pd.Timestamp(card["data"]["end"]), steps, max_rows, seed)
        assert results["heldout"][name]["rows"] == len(rows) > 100
        x = rows[ONLINE]
        model = joblib.load(root / "model.joblib")
        if classifier:
            y = (rows["net_ahead"] > card["target"]["threshold_bps"] / 1e4).astype(int)
            scoring = "neg_brier_score"
            assert results["heldout"][name]["brier"] == pytest.approx(
                brier_score_loss(y, model.predict_proba(x)[:, 1]), rel=1e-9)
        else:
            y = rows["net_bps_ahead"]
            scoring = "neg_mean_squared_error"
            assert results["heldout"][name]["rmse"] == pytest.approx(
                np.sqrt(np.mean((model.predict(x) - y) ** 2)), rel=1e-9)
        expect = permutation_importance(model, x, y, scoring=scoring, n_repeats=n_repeats,
                                        random_state=seed)
        imp = results["permutation_importance"][name]
        assert [imp["mean"][f] for f in ONLINE] == pytest.approx(
            expect.importances_mean.tolist(), rel=1e-9, abs=1e-12)
        assert [imp["std"][f] for f in ONLINE] == pytest.approx(
            expect.importances_std.tolist(), rel=1e-9, abs=1e-12)
