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
# # 3. The registered models
#
# What the model registry (`arbstream.store.models`, written by `spark-submit ml/retrain.py`)
# holds for the two models the alert worker serves (`ml.result.REGISTERED`):
#
# * `opportunity_scorer`: P(the opportunity is still executable after the latency L), i.e.
#   net spread at t + L above the threshold (a random forest, `rf`);
# * `net_bps_regressor`: the net spread at t + h, bps (gradient boosting on the online
#   features, `gbr_online`).
#
# For each, the chosen version (the champion, else the latest; or `version`):
#
# 1. **The model card**: target, training data, status and the promotion rule's reason.
# 2. **Skill per walk-forward fold** from the card: the regressor's MSE skill score against
#    persistence, 1 − MSE / MSE(persistence) (Murphy 1988), and the scorer's Brier skill score
#    against the training base rate, 1 − Brier / Brier(base rate) (Wilks, *Statistical Methods
#    in the Atmospheric Sciences*, 8.4). Above 0: better than the baseline.
# 3. **Calibration** of the scorer: the reliability curve (observed frequency against mean
#    predicted probability in 10 equal-width bins, `sklearn.calibration.calibration_curve`)
#    and the expected calibration error (`ml.walkforward.ece`), on the version's
#    out-of-sample walk-forward predictions (`predictions.parquet` of the version).
# 4. **Permutation importance** (Breiman 2001; `sklearn.inspection.permutation_importance`):
#    the drop in score when one feature's column is shuffled, on **held-out** rows, the
#    lake's spread rows after the model's training data ended (`heldout_start`, default the
#    card's `data.end`), with the online features of `arbstream.features.online_features`
#    and the labels of `ml.table` (the row L or h steps later of the same pair).
# 5. **Error by regime** (before / during the USDC depeg, `ml.table.regime`) of the
#    out-of-sample predictions, with `ml.walkforward`'s metrics.
#
# With no registered model the notebook says so, writes `{"skipped": ...}` and stops there.

# %% tags=["parameters"]
out_dir = "build/notebooks/03_models"
registry_dir = ""
lake_dir = ""
version = 0
heldout_start = ""
heldout_end = ""
max_heldout_rows = 5000
n_repeats = 5
seed = 0

# %%
import json
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.inspection import permutation_importance

from arbstream.config import Settings
from arbstream.features import FEATURE_NAMES, online_features
from arbstream.store import lake
from arbstream.store import models as R
from arbstream.store.config import MongoConfig
from ml.result import REGISTERED
from ml.table import DATASETS
from ml.walkforward import classification_metrics, ece, regression_metrics

out = Path(out_dir)
out.mkdir(parents=True, exist_ok=True)
settings = Settings()
registry = R.RegistryConfig(
    models_dir=Path(registry_dir) if registry_dir else settings.model_registry_dir,
    mongo=MongoConfig.of(settings))  # only the files are read; MongoDB is not contacted
lake_cfg = lake.LakeConfig(Path(lake_dir)) if lake_dir else lake.LakeConfig.of(settings)
STEP_S = DATASETS["iaqf"].step_seconds

loaded = {}
for name in REGISTERED:
    versions = R.versions(registry, name)
    if not versions:
        print(f"{name}: no version registered in {registry.models_dir}")
        continue
    chosen = version or R.champion_version(registry, name) or versions[-1]
    loaded[name] = R.load(registry, name, chosen, features=list(FEATURE_NAMES))
    print(f"{name}: version {chosen} of {versions} ({loaded[name].card.status})")
if not loaded:
    skipped = f"no model registered in {registry.models_dir}"
    print(f"Nothing to show: {skipped}. Run `spark-submit ml/retrain.py` (docs/ml.md) first.")

# %% [markdown]
# ## Model cards

# %%
cards = {}
for name, model in loaded.items():
    card = model.card
    cards[name] = {
        "version": card.version, "status": card.status, "reason": card.reason,
        "created_at": card.created_at.isoformat(), "kind": card.target.kind,
        "horizon_s": card.target.horizon_s, "threshold_bps": card.target.threshold_bps,
        "description": card.target.description, "data_start": card.data.start.isoformat(),
        "data_end": card.data.end.isoformat(), "rows": card.data.rows,
        "table_sha256": card.data.table_sha256, "code_version": card.code_version,
        "features": card.feature_names, "folds": len(card.folds)}
if cards:
    display(pd.DataFrame(cards).drop(index=["features"]))  # noqa: F821 (IPython)

# %% [markdown]
# ## Skill per walk-forward fold
#
# The card's fold metrics (each fold trained up to its `train_end`, tested after a purge
# gap). Regressor: MSE skill vs persistence (the net spread now as the forecast of t + h).
# Scorer: Brier skill vs the base rate (the training positive rate as the probability).

# %%
fold_skill = {}
for name, model in loaded.items():
    rows = []
    for f in model.card.folds:
        m = f.metrics
        if model.card.target.kind == "regression":
            mine, base = m["model"]["rmse"], m["persistence"]["rmse"]
            skill = 1 - mine ** 2 / base ** 2 if mine is not None and base else None
            rows.append({"fold": f.fold, "rows": f.rows, "rmse": mine,
                         "rmse_persistence": base, "skill": skill})
        else:
            mine, base = m["model"]["brier"], m["base_rate"]["brier"]
            skill = 1 - mine / base if mine is not None and base else None
            rows.append({"fold": f.fold, "rows": f.rows, "brier": mine, "brier_base_rate": base,
                         "auc_pr": m["model"].get("auc_pr"), "skill": skill})
    fold_skill[name] = rows
    display(pd.DataFrame(rows).set_index("fold").round(4))  # noqa: F821 (IPython)

if loaded:
    fig, axes = plt.subplots(1, len(loaded), figsize=(5 * len(loaded), 3.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], fold_skill.items(), strict=True):
        skills = [r["skill"] if r["skill"] is not None else np.nan for r in rows]
        ax.bar([str(r["fold"]) for r in rows], skills)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xlabel("fold")
        ax.set_ylabel("skill vs baseline")
        ax.set_title(f"{name} v{loaded[name].card.version}")
    fig.tight_layout()
    fig.savefig(out / "fold_skill.png", dpi=100)

# %% [markdown]
# ## Out-of-sample predictions of the version
#
# `predictions.parquet` of the version directory: every walk-forward test row with the
# fold models' predictions (`pred_<model>`), the labels and the regime.

# %%
predictions = {name: pd.read_parquet(m.path / R.PREDICTIONS_FILE) for name, m in
               loaded.items()}
for name, frame in predictions.items():
    print(f"{name}: {len(frame):,} out-of-sample rows, folds {sorted(frame['fold'].unique())}")

# %% [markdown]
# ## Calibration of the scorer
#
# A calibrated scorer's points lie on the diagonal: of the windows scored 0.3, 30 % were still
# executable. Bins with no prediction are left out.

# %%
calibration = {}
scorers = [n for n, m in loaded.items() if m.card.target.kind == "classification"]
for name in scorers:
    frame = predictions[name]
    y = frame["y_exec"].to_numpy(int)
    p = frame[f"pred_{REGISTERED[name][0]}"].to_numpy(float)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="uniform")
    calibration[name] = {"observed": observed.tolist(), "predicted": predicted.tolist(),
                         "ece": ece(y, p), "rows": len(y)}
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", ls=":")
    ax.plot(predicted, observed, marker="o")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"{name}: reliability, ECE {calibration[name]['ece']:.3f}")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=100)
    print(name, {k: v for k, v in calibration[name].items() if k != "observed"})

# %% [markdown]
# ## Permutation importance on held-out rows
#
# Held-out rows: the lake's spread rows from `heldout_start` (default: the card's `data.end`,
# exclusive of that window) to `heldout_end`, on the 60 s step grid, one per pair and step,
# with a label (the same pair's row exactly L or h steps later exists); a sample of
# `max_heldout_rows`. Score: negative Brier (scorer) or negative MSE (regressor), so a
# positive importance is a loss of skill when the feature is shuffled; `n_repeats` shuffles,
# mean ± standard deviation.

# %%
PAIR = ["symbol", "sell_symbol", "buy_exchange", "sell_exchange"]


def heldout_rows(since: datetime, until: datetime | None, steps: int) -> pd.DataFrame:
    """Spread rows in ``(since, until)`` with the online features and the label ``steps``
    steps ahead (``net_ahead``, ``net_bps_ahead``), sorted by time and pair."""
    table = lake.read(lake_cfg, "spread", since, until).to_pandas()
    step_ms = round(STEP_S * 1000)
    table["t_ms"] = (table["window_end"] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(
        milliseconds=1)
    table = table[(table["t_ms"] % step_ms == 0) & (table["window_end"] > since)]
    table = table.drop_duplicates([*PAIR, "t_ms"])
    ahead = table[[*PAIR, "t_ms", "net", "net_bps"]].assign(
        t_ms=table["t_ms"] - steps * step_ms).rename(
        columns={"net": "net_ahead", "net_bps": "net_bps_ahead"})
    table = table.merge(ahead, on=[*PAIR, "t_ms"], how="inner")
    records = table.astype(object).where(table.notna(), None)  # nulls as None, not NaN
    features = pd.DataFrame([online_features(r) for r in records.to_dict("records")],
                            columns=list(FEATURE_NAMES), index=table.index)
    return pd.concat([table[[*PAIR, "t_ms", "net_ahead", "net_bps_ahead"]], features],
                     axis=1).sort_values(["t_ms", *PAIR], ignore_index=True)


def utc(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


importance, heldout = {}, {}
for name, model in loaded.items():
    card = model.card
    since = utc(heldout_start) if heldout_start else card.data.end
    until = utc(heldout_end) if heldout_end else None
    steps = round(card.target.horizon_s / STEP_S)
    rows = heldout_rows(since, until, steps)
    if rows.empty:
        importance[name] = {"skipped": f"no labelled lake rows after {since.isoformat()} in "
                                       f"{lake_cfg.dir}"}
        print(f"{name}: {importance[name]['skipped']}")
        continue
    if len(rows) > max_heldout_rows:
        rows = rows.sample(n=max_heldout_rows, random_state=seed).sort_values(
            ["t_ms", *PAIR], ignore_index=True)
    x = rows[list(FEATURE_NAMES)]
    if card.target.kind == "classification":
        y = (rows["net_ahead"] > card.target.threshold_bps / 1e4).astype(int).to_numpy()
        scoring = "neg_brier_score"
        p = model.model.predict_proba(x)[:, 1]
        heldout[name] = {"rows": len(rows), "positive_rate": float(y.mean()),
                         "brier": float(np.mean((p - y) ** 2)),
                         "brier_base_rate": float(np.mean((y.mean() - y) ** 2))}
    else:
        y = rows["net_bps_ahead"].to_numpy(float)
        scoring = "neg_mean_squared_error"
        e, e0 = model.model.predict(x) - y, rows["net_bps"].to_numpy(float) - y
        heldout[name] = {"rows": len(rows), "rmse": float(np.sqrt(np.mean(e ** 2))),
                         "rmse_persistence": float(np.sqrt(np.mean(e0 ** 2)))}
    heldout[name] |= {"since": since.isoformat(), "until": until and until.isoformat()}
    result = permutation_importance(model.model, x, y, scoring=scoring, n_repeats=n_repeats,
                                    random_state=seed)
    importance[name] = {"scoring": scoring, "n_repeats": n_repeats,
                        "mean": dict(zip(FEATURE_NAMES, result.importances_mean.tolist(),
                                         strict=True)),
                        "std": dict(zip(FEATURE_NAMES, result.importances_std.tolist(),
                                        strict=True))}
    print(f"{name}: held out {heldout[name]}")

shown = {n: v for n, v in importance.items() if "mean" in v}
if shown:
    fig, axes = plt.subplots(1, len(shown), figsize=(5.5 * len(shown), 4), squeeze=False)
    for ax, (name, imp) in zip(axes[0], shown.items(), strict=True):
        order = sorted(imp["mean"], key=imp["mean"].get)
        ax.barh(order, [imp["mean"][f] for f in order], xerr=[imp["std"][f] for f in order])
        ax.set_xlabel(f"drop in {imp['scoring'].removeprefix('neg_')}")
        ax.set_title(f"{name}: permutation importance (held out)")
    fig.tight_layout()
    fig.savefig(out / "permutation_importance.png", dpi=100)

# %% [markdown]
# ## Error by regime
#
# The version's out-of-sample predictions per regime (`before`, `during`, `after` the USDC
# depeg): the scorer's Brier score, AUC-PR and ECE, the regressor's MAE, RMSE and skill
# against persistence (`ml.walkforward.classification_metrics`, `regression_metrics`).

# %%
by_regime = {}
for name, model in loaded.items():
    frame, who = predictions[name], REGISTERED[name][0]
    h = max(1, round(model.card.target.horizon_s / STEP_S))
    by_regime[name] = {
        regime: {"rows": len(rows), **(classification_metrics(rows, who)
                                        if model.card.target.kind == "classification"
                                        else regression_metrics(rows, who, h))}
        for regime, rows in frame.groupby("regime")}
    display(pd.DataFrame(by_regime[name]).round(4))  # noqa: F821 (IPython)

if by_regime:
    fig, axes = plt.subplots(1, len(by_regime), figsize=(5 * len(by_regime), 3.5),
                             squeeze=False)
    for ax, (name, regimes) in zip(axes[0], by_regime.items(), strict=True):
        metric = "brier" if loaded[name].card.target.kind == "classification" else "rmse"
        ax.bar(list(regimes), [r[metric] for r in regimes.values()])
        ax.set_ylabel(metric)
        ax.set_title(f"{name}: {metric} by regime (out of sample)")
    fig.tight_layout()
    fig.savefig(out / "error_by_regime.png", dpi=100)

# %% [markdown]
# ## Results

# %%
def _clean(value):
    """JSON-ready: NaN → None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


results = ({"skipped": skipped} if not loaded else {
    "registry_dir": str(registry.models_dir), "lake_dir": str(lake_cfg.dir), "cards": cards,
    "fold_skill": fold_skill, "calibration": calibration, "heldout": heldout,
    "permutation_importance": importance, "by_regime": by_regime})
(out / "results.json").write_text(json.dumps(_clean(results), indent=1))
print(f"wrote {out / 'results.json'}")
