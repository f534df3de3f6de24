"""Coverage (fairness) check of the market data: is any exchange or symbol under-covered?

A model or alert rule is only as fair across venues as its input: if one exchange's quotes
go missing, its spreads, episodes and scores are computed from less data and it silently
drops out of the results. This check counts quotes by group (exchange, or exchange and
symbol) and by UTC hour, and compares them with an *expected* coverage taken from a
reference period (e.g. the week before), so a series that is always thin (Kraken BTC-USDC
has bars for about half the minutes: no trade, no bar) is not flagged, but one that loses
its usual quotes is.

* Omnibus: Pearson's χ² goodness-of-fit of the observed counts against the reference
  shares times the observed total (``scipy.stats.chisquare``; k − 1 degrees of freedom).
* Per group g with observed n_g of N quotes and reference share p_g: expected e_g = N·p_g,
  ratio r_g = n_g / e_g, and the one-sided exact binomial test of n_g ~ Binomial(N, p_g)
  against "fewer" (``scipy.stats.binomtest``).
* **Flag rule**: g is flagged when it is both significantly *and* materially below
  expectation: p-value < α / k (Bonferroni over the k groups; α = 0.01 by default) and
  r_g < ``min_ratio`` (0.5 by default: at most half its usual share). With tens of thousands
  of quotes a few missing minutes are significant but not material; a 90 % drop is both.
* By hour: the exchange × hour contingency table and Pearson's χ² test of independence
  (``scipy.stats.chi2_contingency``): do exchanges' hourly coverage profiles differ?

Inputs are quote tables (pandas) with ``exchange``, ``symbol`` and ``exchange_ts`` (UTC ms),
as :func:`producers.replay.iaqf.load_iaqf_quotes` returns them or as read from InfluxDB
``quote``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

#: Columns a quote table must have.
QUOTE_COLUMNS = ("exchange", "symbol", "exchange_ts")
GROUPINGS = ("exchange", "symbol")


def _check(quotes: pd.DataFrame, by: Sequence[str]) -> None:
    missing = [c for c in QUOTE_COLUMNS if c not in quotes.columns]
    if missing:
        raise ValueError(f"a quote table needs columns {list(QUOTE_COLUMNS)}, missing {missing}")
    bad = [c for c in by if c not in GROUPINGS]
    if not by or bad:
        raise ValueError(f"group by one or more of {list(GROUPINGS)}, got {list(by)}")
    nulls = quotes[list(QUOTE_COLUMNS)].isna().any()
    if nulls.any():
        raise ValueError(f"null values in columns {list(nulls[nulls].index)}")


def quote_counts(quotes: pd.DataFrame, by: Sequence[str] = ("exchange",)) -> pd.Series:
    """Quotes per group, a Series indexed by ``by`` (sorted), named ``quotes``.

    Raises:
        ValueError: a required column is missing or null, or ``by`` is not a subset of
            ``exchange``, ``symbol``.
    """
    _check(quotes, by)
    return quotes.groupby(list(by)).size().rename("quotes").sort_index()


def hour_of(exchange_ts: pd.Series) -> pd.Series:
    """The UTC hour (0..23) of ``exchange_ts`` (UTC ms)."""
    return ((exchange_ts.astype("int64") // 3_600_000) % 24).rename("hour")


def hourly_table(quotes: pd.DataFrame, by: Sequence[str] = ("exchange",)) -> pd.DataFrame:
    """Quote counts, one row per group of ``by``, one column per UTC hour 0..23 (0 where a
    group has no quote in an hour).

    Raises:
        ValueError: as :func:`quote_counts`.
    """
    _check(quotes, by)
    frame = quotes[list(by)].assign(hour=hour_of(quotes["exchange_ts"]))
    table = frame.groupby([*by, "hour"]).size().unstack("hour", fill_value=0)
    return table.reindex(columns=range(24), fill_value=0).sort_index()


@dataclass(frozen=True)
class HourTest:
    """Pearson's χ² test of independence of group and hour: ``statistic``, ``p_value``,
    ``dof`` = (rows − 1)(24 − 1), ``table`` (observed), ``expected`` (row total × column
    total / N)."""

    statistic: float
    p_value: float
    dof: int
    table: pd.DataFrame
    expected: pd.DataFrame


def hour_independence(quotes: pd.DataFrame, by: Sequence[str] = ("exchange",)) -> HourTest:
    """χ² test of whether the hourly coverage profile depends on the group
    (``scipy.stats.chi2_contingency`` of :func:`hourly_table`, no continuity correction).

    Raises:
        ValueError: as :func:`hourly_table`; fewer than two groups; an hour without any
            quote (its expected counts would be 0).
    """
    table = hourly_table(quotes, by)
    if len(table) < 2:
        raise ValueError(f"need at least two groups to compare, got {list(table.index)}")
    empty = [h for h in table.columns if table[h].sum() == 0]
    if empty:
        raise ValueError(f"no quote at all in UTC hours {empty}: select whole days")
    res = stats.chi2_contingency(table.to_numpy(), correction=False)
    expected = pd.DataFrame(res.expected_freq, index=table.index, columns=table.columns)
    return HourTest(float(res.statistic), float(res.pvalue), int(res.dof), table, expected)


@dataclass(frozen=True)
class CoverageCheck:
    """Result of :func:`check_coverage`.

    ``table``: one row per group (index as the counts'): ``observed``, ``reference``,
    ``share`` (reference share p_g), ``expected`` (N·p_g), ``ratio`` (observed / expected),
    ``p_value`` (one-sided binomial, "fewer"), ``flagged``. ``statistic``, ``p_value``,
    ``dof``: the omnibus χ² goodness-of-fit; ``alpha``, ``min_ratio``: the rule.
    """

    table: pd.DataFrame
    statistic: float
    p_value: float
    dof: int
    alpha: float
    min_ratio: float

    @property
    def flagged(self) -> list:
        """The groups flagged (index labels: exchange ids, or (exchange, symbol) tuples)."""
        return list(self.table.index[self.table["flagged"]])


def check_coverage(observed: pd.Series, reference: pd.Series, *, alpha: float = 0.01,
                   min_ratio: float = 0.5) -> CoverageCheck:
    """Compare the quote counts of a period with a reference period's (module docstring).

    Args:
        observed: counts per group (:func:`quote_counts`) of the period checked.
        reference: counts per group of the reference period (any length: only the shares
            are used). A group of the reference absent from ``observed`` counts 0 (a full
            outage is flagged, never dropped).
        alpha: family-wise significance level (Bonferroni over the groups).
        min_ratio: the materiality bound on observed / expected.

    Raises:
        ValueError: a group observed but not in the reference (no expectation), a reference
            count <= 0, no quote observed, fewer than two groups, or ``alpha`` / ``min_ratio``
            outside (0, 1).
    """
    if not 0 < alpha < 1 or not 0 < min_ratio < 1:
        raise ValueError(f"alpha and min_ratio must be in (0, 1), got {alpha}, {min_ratio}")
    unknown = observed.index.difference(reference.index)
    if len(unknown):
        raise ValueError(f"no reference coverage for {list(unknown)}: add them to the "
                         "reference period or drop them explicitly")
    if (reference <= 0).any():
        raise ValueError(f"reference counts must be > 0, got {reference[reference <= 0]}")
    if len(reference) < 2:
        raise ValueError("need at least two groups to compare")
    obs = observed.reindex(reference.index, fill_value=0).astype("int64")
    total = int(obs.sum())
    if total == 0:
        raise ValueError("no quote observed")
    share = reference / reference.sum()
    expected = share * total
    chi = stats.chisquare(obs.to_numpy(dtype=float), expected.to_numpy())
    p_low = np.array([stats.binomtest(int(n), total, float(p), alternative="less").pvalue
                      for n, p in zip(obs, share, strict=True)])
    ratio = obs / expected
    table = pd.DataFrame({
        "observed": obs, "reference": reference.astype("int64"), "share": share,
        "expected": expected, "ratio": ratio, "p_value": p_low,
    })
    table["flagged"] = (table["p_value"] < alpha / len(table)) & (table["ratio"] < min_ratio)
    return CoverageCheck(table, float(chi.statistic), float(chi.pvalue), len(table) - 1,
                         alpha, min_ratio)
