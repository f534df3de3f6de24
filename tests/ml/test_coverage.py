"""The coverage check on real recorded quotes (IAQF bars): 2023-03-09 as replayed against
the week before is not flagged; the same replay with 90 % of one exchange's quotes dropped
is. Statistics are recomputed here from their textbook formulas with numpy and scipy's
distribution functions."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from arbstream.config import Settings
from arbstream.shell.backfill import Input, read_quotes
from ml.coverage import check_coverage, hour_independence, hourly_table, quote_counts
from producers.replay.iaqf import load_iaqf_quotes

DAY = datetime(2023, 3, 9, tzinfo=UTC), datetime(2023, 3, 10, tzinfo=UTC)
WEEK_BEFORE = datetime(2023, 3, 2, tzinfo=UTC), datetime(2023, 3, 9, tzinfo=UTC)


@pytest.fixture(scope="module")
def replayed(data_dir: Path) -> pd.DataFrame:
    """The quotes a replay of 2023-03-09 publishes, in its order."""
    _, quotes = read_quotes(Settings(data_dir=data_dir), Input.iaqf, *DAY)
    return pd.DataFrame([q.model_dump(include={"exchange", "symbol", "exchange_ts"})
                         for q in quotes])


@pytest.fixture(scope="module")
def reference(data_dir: Path) -> pd.DataFrame:
    return load_iaqf_quotes(data_dir, *WEEK_BEFORE)


def _drop(quotes: pd.DataFrame, exchange: str, fraction: float, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    keep = (quotes["exchange"] != exchange) | (rng.random(len(quotes)) >= fraction)
    return quotes[keep]


@pytest.mark.parametrize("by", [("exchange",), ("exchange", "symbol")])
def test_recorded_day_is_not_flagged(replayed: pd.DataFrame, reference: pd.DataFrame,
                                     by: tuple[str, ...]) -> None:
    check = check_coverage(quote_counts(replayed, by), quote_counts(reference, by))
    assert check.flagged == []
    # Kraken really misses minutes: the mix differs significantly, but not materially
    assert check.p_value < 0.01 and check.table["ratio"].min() > 0.9
    # independent recomputation: Pearson's X² = Σ (o − e)² / e, e = N·p from the reference
    obs = replayed.groupby(list(by)).size()
    ref = reference.groupby(list(by)).size()
    exp = ref / ref.sum() * obs.sum()
    x2 = float((((obs - exp) ** 2) / exp).sum())
    assert check.statistic == pytest.approx(x2, rel=1e-9)
    assert check.p_value == pytest.approx(stats.chi2.sf(x2, len(ref) - 1), rel=1e-6)
    assert check.dof == len(ref) - 1


def test_ninety_percent_drop_of_one_exchange_is_flagged(
        replayed: pd.DataFrame, reference: pd.DataFrame) -> None:
    dropped = _drop(replayed, "kraken", 0.9, seed=20230309)
    kraken = (replayed["exchange"] == "kraken").sum()
    assert (dropped["exchange"] == "kraken").sum() == pytest.approx(0.1 * kraken, rel=0.1)
    check = check_coverage(quote_counts(dropped), quote_counts(reference))
    assert check.flagged == ["kraken"]
    row = check.table.loc["kraken"]
    # the exact one-sided binomial p-value, from the distribution function
    n, total, share = int(row["observed"]), len(dropped), row["share"]
    assert share == pytest.approx((reference["exchange"] == "kraken").mean())
    assert row["p_value"] == pytest.approx(stats.binom.cdf(n, total, share), rel=1e-6, abs=1e-300)
    assert row["ratio"] == pytest.approx(n / (share * total)) and row["ratio"] < 0.2
    by_symbol = check_coverage(quote_counts(dropped, ("exchange", "symbol")),
                               quote_counts(reference, ("exchange", "symbol")))
    assert {e for e, _ in by_symbol.flagged} == {"kraken"}
    assert len(by_symbol.flagged) == dropped.query("exchange == 'kraken'")["symbol"].nunique()


def test_small_loss_is_not_material_and_outage_is_flagged(
        replayed: pd.DataFrame, reference: pd.DataFrame) -> None:
    # 20 % of coinbase lost: significant, not material (ratio above 0.5)
    check = check_coverage(quote_counts(_drop(replayed, "coinbase", 0.2, seed=1)),
                           quote_counts(reference))
    assert check.table.loc["coinbase", "p_value"] < 1e-6 and check.flagged == []
    # a whole exchange missing counts 0 and is flagged, not dropped from the check
    outage = check_coverage(quote_counts(replayed[replayed["exchange"] != "binance"]),
                            quote_counts(reference))
    assert outage.flagged == ["binance"] and outage.table.loc["binance", "observed"] == 0
    with pytest.raises(ValueError, match="no reference coverage"):
        check_coverage(quote_counts(replayed), quote_counts(reference).drop("kraken"))
    with pytest.raises(ValueError, match="missing"):
        quote_counts(replayed.drop(columns="symbol"))


def test_hour_independence(replayed: pd.DataFrame) -> None:
    res = hour_independence(replayed)
    table = hourly_table(replayed)
    assert table.shape == (3, 24) and table.to_numpy().sum() == len(replayed)
    obs = pd.crosstab(replayed["exchange"],
                      pd.to_datetime(replayed["exchange_ts"], unit="ms", utc=True).dt.hour)
    o = obs.to_numpy(dtype=float)
    e = np.outer(o.sum(axis=1), o.sum(axis=0)) / o.sum()
    x2 = float(((o - e) ** 2 / e).sum())
    assert res.statistic == pytest.approx(x2, rel=1e-9) and res.dof == 2 * 23
    assert res.p_value == pytest.approx(stats.chi2.sf(x2, 46), rel=1e-6)


def test_cli(data_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """``arbstream privacy coverage``: exit 0 and the table for the recorded day."""
    from typer.testing import CliRunner

    from arbstream.config import get_settings
    from arbstream.shell.cli import app

    for name in [n for n in os.environ if n.startswith("ARB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ARB_DATA_DIR", str(data_dir))
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, [
            "privacy", "coverage", "--from", "2023-03-09", "--to", "2023-03-10",
            "--reference-from", "2023-03-08", "--reference-to", "2023-03-09"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "│ kraken │ 5,568 │" in text and "flag rule: p < 0.01/3 and ratio < 0.5" in text
