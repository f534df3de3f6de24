"""Pair-trading statistics of configured pairs of legs, from the stream's own mids.

Input: the lake's ``feature`` records (:mod:`arbstream.store.lake`), one mid per (symbol,
exchange, window end). A pair (``ARB_PAIRS``, :class:`arbstream.config.PairSpec`) regresses
the dependent leg ``y`` on the independent leg ``x``; the two mids are aligned on their
**common window ends** (an inner join: a window where either leg has no mid is not an
observation; windows are not filled) and taken as **log prices**, so β is the elasticity of
``y`` to ``x`` (dimensionless, ≈ 1 for one asset on two venues whatever the quote currency's
level), the spread is in log units (≈ a fraction of price; × 10,000 = bps) and the statistics
do not depend on the price level. Every statistic is statsmodels'.

* **Hedge ratio**: OLS ``log y = α + β log x + ε`` (``statsmodels.api.OLS``) with and
  without intercept over the test lookback; rolling ``α_t``, ``β_t`` by ``RollingOLS`` over
  the last ``window`` observations.
* **Spread** ``s_t = log y_t − α_{t−1} − β_{t−1} log x_t`` (the previous window's estimate: no
  look-ahead); **z-score** over the last ``z_window`` spreads (sample std, ddof 1);
  **correlation** of the log returns over ``window`` (pandas ``rolling().corr``, Pearson).
* **ADF** (``statsmodels.tsa.stattools.adfuller``, constant, lag order by AIC) on the static
  OLS residual over the test lookback, and the **Engle-Granger** test
  (``statsmodels.tsa.stattools.coint``, constant, AIC) on the same two log series. Both run
  the same Dickey-Fuller regression on the residual; they differ in the critical values. The
  residual of an *estimated* β is the linear combination that looks most stationary in the
  sample (OLS minimises its variance), so the ADF statistic is biased towards rejection and
  ADF's Dickey-Fuller critical values (for an observed series) reject a unit root too often.
  ``coint`` uses MacKinnon's (1991, 2010) response-surface critical values for residuals of a
  cointegrating regression with N = 2 variables, which account for β being estimated: those
  are the right ones (Engle & Granger 1987; Phillips & Ouliaris 1990). Report ``coint``'s
  p-value; the ADF one is shown for contrast.
* **Half-life** of mean reversion: fit AR(1) ``s_t = c + φ s_{t−1} + ε_t``
  (``statsmodels.tsa.ar_model.AutoReg``, lags 1, constant) to the static residual; the
  expected deviation decays as ``φ^h``, so it halves after ``h = −ln 2 / ln φ`` observations
  (for 0 < φ < 1; otherwise ``None``, no mean reversion). Source: the discrete form of the
  Ornstein-Uhlenbeck half-life, E. Chan, *Algorithmic Trading* (Wiley 2013), ch. 2. In
  seconds: × the median spacing of the observations.
* **Mean-reversion backtest**: :func:`backtest`.

The job (:func:`run`, ``arbstream pairs run``; ``docs/pairs.md``) writes InfluxDB and MongoDB
``pair_stats`` and publishes ``pair_signal`` events; a pair that cannot be computed raises
:class:`PairDataError`, reported by the job, which computes the others.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import statsmodels.api as sm
from statsmodels.regression.rolling import RollingOLS
from statsmodels.tsa.ar_model import AutoReg
from statsmodels.tsa.stattools import adfuller, coint

from arbstream.config import PairSpec
from arbstream.fees import BPS
from arbstream.kafka import KafkaConfig, reliable_producer_config
from arbstream.records import finite_or_none
from arbstream.schemas import PairSignal, now_ms
from arbstream.store import lake
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.lines import LINES
from arbstream.store.influx.schema import PAIR_STATS, ensure_database
from arbstream.store.influx.writer import write_lines_with_rejects
from arbstream.store.mongo import pair_stats as store

if TYPE_CHECKING:
    from arbstream.config import Settings

#: Columns of :attr:`PairStats.series`.
SERIES_COLUMNS = ("y", "x", "alpha", "beta", "spread", "z", "correlation")
#: Fewest common observations a pair needs beyond its rolling window.
MIN_EXTRA_OBSERVATIONS = 20


class PairDataError(ValueError):
    """A pair cannot be computed from the data given (a leg without mids, too few common
    window ends); the message names the pair, the leg and the counts."""


@dataclass(frozen=True)
class PairsConfig:
    """The pairs job's slice of :class:`~arbstream.config.Settings`: ``pairs``, the rolling
    ``window``, ``z_window`` and ``test_lookback`` (observations), the lake, MongoDB, InfluxDB
    and Kafka slices and the ``topic`` of the ``pair_signal`` events."""

    pairs: tuple[PairSpec, ...]
    window: int
    z_window: int
    test_lookback: int
    lake: lake.LakeConfig
    mongo: MongoConfig
    influx: InfluxConfig
    kafka: KafkaConfig
    topic: str

    @classmethod
    def of(cls, settings: Settings) -> PairsConfig:
        """The slice of ``settings`` (``pairs``, ``pairs_*``, lake, MongoDB, InfluxDB,
        Kafka)."""
        return cls(pairs=tuple(settings.pairs), window=settings.pairs_window,
                   z_window=settings.pairs_z_window, test_lookback=settings.pairs_test_lookback,
                   lake=lake.LakeConfig.of(settings), mongo=MongoConfig.of(settings),
                   influx=InfluxConfig.of(settings), kafka=KafkaConfig.of(settings),
                   topic=settings.pairs_topic)


# --- data -------------------------------------------------------------------------------------

def leg_mids(features: pd.DataFrame, leg: str) -> pd.Series:
    """The mids of one leg ``exchange:SYMBOL`` from feature rows (columns ``exchange,
    symbol, window_end, mid``), indexed by ``window_end`` (UTC), sorted, one per window end
    (the last row of a repeated window end, e.g. a backfill and a stream over one period).

    Raises:
        PairDataError: the leg has no row with a positive finite mid.
    """
    exchange, symbol = PairSpec.leg(leg)
    rows = features[(features["exchange"] == exchange) & (features["symbol"] == symbol)]
    mids = pd.Series(rows["mid"].to_numpy(dtype=float),
                     index=pd.DatetimeIndex(rows["window_end"]).tz_convert("UTC"), name=leg)
    mids = mids[np.isfinite(mids) & (mids > 0)].sort_index()
    if mids.empty:
        raise PairDataError(f"leg {leg} has no mid in the feature records "
                            f"({len(rows)} rows of {exchange} {symbol}, none with a positive "
                            f"finite mid)")
    return mids[~mids.index.duplicated(keep="last")]


def align(features: pd.DataFrame, pair: PairSpec) -> pd.DataFrame:
    """The two legs' mids on their common window ends: columns ``y``, ``x`` (quote currency
    of each leg), index ``window_end`` (UTC), sorted.

    Raises:
        PairDataError: a leg has no mid (:func:`leg_mids`), or the legs share no window end.
    """
    try:
        y, x = leg_mids(features, pair.y), leg_mids(features, pair.x)
    except PairDataError as exc:
        raise PairDataError(f"pair {pair.name}: {exc}") from None
    both = pd.concat({"y": y, "x": x}, axis=1, join="inner")
    if both.empty:
        raise PairDataError(f"pair {pair.name}: legs {pair.y} ({len(y)} windows) and {pair.x} "
                            f"({len(x)} windows) share no window end")
    return both


def read_features(conf: lake.LakeConfig, since: dt.datetime | None = None,
                  until: dt.datetime | None = None) -> pd.DataFrame:
    """The lake's feature rows with ``window_end`` in ``[since, until)``: columns
    ``exchange, symbol, window_end, mid``.

    Raises:
        OSError, pyarrow.ArrowInvalid: as :func:`arbstream.store.lake.read`.
    """
    table = lake.read(conf, "feature", since, until)
    return table.select(["exchange", "symbol", "window_end", "mid"]).to_pandas()


# --- statistics -------------------------------------------------------------------------------

def hedge_ratios(log_y: pd.Series, log_x: pd.Series) -> tuple[float, float, float]:
    """Static OLS of ``log_y`` on ``log_x``: ``(alpha, beta, beta_no_intercept)`` — the
    intercept and slope with a constant, and the slope through the origin."""
    with_const = sm.OLS(log_y.to_numpy(), sm.add_constant(log_x.to_numpy())).fit()
    origin = sm.OLS(log_y.to_numpy(), log_x.to_numpy()).fit()
    return float(with_const.params[0]), float(with_const.params[1]), float(origin.params[0])


def rolling_hedge(log_y: pd.Series, log_x: pd.Series, window: int) -> pd.DataFrame:
    """``RollingOLS`` of ``log_y`` on a constant and ``log_x`` over ``window`` observations:
    columns ``alpha``, ``beta`` at each observation (NaN for the first ``window − 1``)."""
    exog = pd.DataFrame({"alpha": 1.0, "beta": log_x.to_numpy()}, index=log_x.index)
    params = RollingOLS(log_y, exog, window=window).fit().params
    return params[["alpha", "beta"]]


def zscore(spread: pd.Series, window: int) -> pd.Series:
    """Rolling z-score over ``window`` observations (sample std, ddof 1; NaN until the window
    is full or when its std is 0)."""
    roll = spread.rolling(window, min_periods=window)
    std = roll.std(ddof=1)
    return (spread - roll.mean()) / std.where(std > 0)


def return_correlation(log_y: pd.Series, log_x: pd.Series, window: int) -> pd.Series:
    """Rolling Pearson correlation of the log returns over ``window`` observations."""
    return log_y.diff().rolling(window, min_periods=window).corr(log_x.diff())


def half_life(spread: pd.Series) -> float | None:
    """AR(1) half-life ``−ln 2 / ln φ`` of ``spread``, observations (``AutoReg``, lags 1,
    constant); ``None`` when φ is not in (0, 1) (no mean reversion)."""
    phi = float(AutoReg(spread.to_numpy(), lags=1, trend="c").fit().params[1])
    return -math.log(2) / math.log(phi) if 0 < phi < 1 else None


def excursion_start(z: pd.Series) -> pd.Timestamp | None:
    """The window end where the z-score last changed sign (the first finite one when it never
    did); ``None`` when no z is finite."""
    finite = z[np.isfinite(z)]
    if finite.empty:
        return None
    sign = np.sign(finite.to_numpy())
    changes = np.flatnonzero(sign[1:] != sign[:-1]) + 1
    return finite.index[changes[-1] if changes.size else 0]


@dataclass
class PairStats:
    """One pair's statistics.

    ``series``: index ``window_end`` (UTC), columns :data:`SERIES_COLUMNS` — ``y``, ``x`` (log
    mids), ``alpha``, ``beta`` (RollingOLS), ``spread`` (log units, previous window's α, β),
    ``z`` (standard deviations), ``correlation`` (of log returns). The rest over the last
    ``test_observations`` observations: ``alpha_ols``, ``beta_ols`` (OLS with a constant),
    ``beta_ols_no_intercept``, ``adf_pvalue`` (ADF on the OLS residual), ``coint_pvalue``
    (Engle-Granger), ``half_life_obs`` / ``half_life_s`` (``None``: no mean reversion);
    ``spacing_s`` the median spacing of the observations (s).
    """

    pair: PairSpec
    series: pd.DataFrame
    alpha_ols: float
    beta_ols: float
    beta_ols_no_intercept: float
    adf_pvalue: float
    coint_pvalue: float
    half_life_obs: float | None
    half_life_s: float | None
    spacing_s: float
    test_observations: int
    excursion_start: pd.Timestamp | None
    windows: dict[str, int] = field(default_factory=dict)

    def latest(self) -> dict[str, Any]:
        """The last observation with a finite z-score: ``window_end`` (UTC datetime),
        ``alpha``, ``beta``, ``spread``, ``z``, ``correlation`` (``None`` when not finite),
        or ``{}`` when no z is finite."""
        ok = self.series[np.isfinite(self.series["z"])]
        if ok.empty:
            return {}
        last = ok.iloc[-1]
        values = {k: finite_or_none(last[k])
                  for k in ("alpha", "beta", "spread", "z", "correlation")}
        return {"window_end": ok.index[-1].to_pydatetime(), **values}

    def document(self, since: dt.datetime | None, until: dt.datetime | None,
                 computed_at: dt.datetime) -> dict[str, Any]:
        """The MongoDB ``pair_stats`` document (:mod:`arbstream.store.mongo.pair_stats`)."""
        start = self.excursion_start
        return {
            "pair": self.pair.name, "y": self.pair.y, "x": self.pair.x, "status": "ok",
            "error": None, "since": since, "until": until,
            "first": self.series.index[0].to_pydatetime(),
            "last": self.series.index[-1].to_pydatetime(),
            "observations": len(self.series), **self.latest(),
            "alpha_ols": self.alpha_ols, "beta_ols": self.beta_ols,
            "beta_ols_no_intercept": self.beta_ols_no_intercept,
            "adf_pvalue": self.adf_pvalue, "coint_pvalue": self.coint_pvalue,
            "half_life_obs": self.half_life_obs, "half_life_s": self.half_life_s,
            "spacing_s": self.spacing_s, "test_observations": self.test_observations,
            "excursion_start": None if start is None else start.to_pydatetime(),
            "windows": self.windows, "computed_at": computed_at,
        }

    def points(self) -> list[dict[str, Any]]:
        """One InfluxDB ``pair_stats`` row per observation (fields ``beta, alpha, spread, z,
        correlation``; NaN left out by the point builder)."""
        frame = self.series[["alpha", "beta", "spread", "z", "correlation"]]
        return [{"pair": self.pair.name, "y": self.pair.y, "x": self.pair.x, "window_end": t,
                 **dict(zip(frame.columns, row, strict=True))}
                for t, row in zip(frame.index, frame.itertuples(index=False), strict=True)]

    def signal(self, emitted_ms: int) -> PairSignal | None:
        """The ``pair_signal`` event of the latest finite z-score (``None`` when there is
        none)."""
        latest = self.latest()
        if not latest or self.excursion_start is None:
            return None
        start = self.excursion_start.to_pydatetime()
        iso = start.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.") + \
            f"{start.microsecond // 1000:03d}Z"
        return PairSignal(
            pair=self.pair.name, y=self.pair.y, x=self.pair.x,
            signal_id=f"{self.pair.name}|{iso}", window_end=latest["window_end"],
            excursion_start=start, z=latest["z"], beta=latest["beta"],
            alpha=latest["alpha"], spread=latest["spread"],
            correlation=latest["correlation"], adf_pvalue=self.adf_pvalue,
            coint_pvalue=self.coint_pvalue, half_life_s=self.half_life_s,
            emitted_ts=emitted_ms,
        )


def compute(mids: pd.DataFrame, pair: PairSpec, window: int, z_window: int,
            test_lookback: int) -> PairStats:
    """Every statistic of one pair (see the module docstring).

    Args:
        mids: :func:`align`'s frame (columns ``y``, ``x``, mids in quote currency; index
            ``window_end`` UTC, sorted).
        window: rolling window of β, α and the correlation, observations.
        z_window: rolling window of the z-score, observations.
        test_lookback: the last observations the static OLS, ADF, coint and half-life use.

    Raises:
        PairDataError: fewer than ``window + z_window + MIN_EXTRA_OBSERVATIONS`` common
            observations.
    """
    need = window + z_window + MIN_EXTRA_OBSERVATIONS
    if len(mids) < need:
        raise PairDataError(f"pair {pair.name}: {len(mids)} common window ends of {pair.y} and "
                            f"{pair.x}, need at least {need} (window {window} + z window "
                            f"{z_window} + {MIN_EXTRA_OBSERVATIONS})")
    log_y, log_x = np.log(mids["y"]), np.log(mids["x"])
    rolling = rolling_hedge(log_y, log_x, window)
    prev = rolling.shift(1)
    spread = log_y - prev["alpha"] - prev["beta"] * log_x
    series = pd.DataFrame({"y": log_y, "x": log_x, "alpha": rolling["alpha"],
                           "beta": rolling["beta"], "spread": spread,
                           "z": zscore(spread, z_window),
                           "correlation": return_correlation(log_y, log_x, window)})
    ty, tx = log_y.iloc[-test_lookback:], log_x.iloc[-test_lookback:]
    alpha, beta, beta0 = hedge_ratios(ty, tx)
    resid = ty - alpha - beta * tx
    hl = half_life(resid)
    spacing = float(np.median(np.diff(ty.index)) / pd.Timedelta(seconds=1))
    return PairStats(
        pair=pair, series=series, alpha_ols=alpha, beta_ols=beta,
        beta_ols_no_intercept=beta0,
        adf_pvalue=float(adfuller(resid.to_numpy(), regression="c", autolag="AIC",
                                  result_object=True).pvalue),
        coint_pvalue=float(coint(ty.to_numpy(), tx.to_numpy(), trend="c", autolag="aic")[1]),
        half_life_obs=hl, half_life_s=None if hl is None else hl * spacing, spacing_s=spacing,
        test_observations=len(ty), excursion_start=excursion_start(series["z"]),
        windows={"beta": window, "z": z_window, "test": test_lookback},
    )


# --- backtest ---------------------------------------------------------------------------------

def backtest(series: pd.DataFrame, fee_y: float, fee_x: float, entry: float = 2.0,
             exit_at: float = 0.0) -> pd.DataFrame:
    """The mean-reversion backtest of one pair's :attr:`PairStats.series`.

    Flat until ``|z_t| > entry`` at an observation ``t``: short the spread when
    ``z_t > entry`` (sell 1 unit of notional of ``y``, buy ``β_{t−1}`` of ``x``; the spread's
    own hedge ratio), long when ``z_t < −entry``; exit at the first later observation where
    ``z`` has crossed ``exit_at`` (``z ≤ exit_at`` for a short, ``≥`` for a long); a trade
    still open at the last observation is closed there (``open_at_end``). Fills at the
    observation's mids. Gross return of a trade: ``side × (Δ log y − β Δ log x)`` over the
    holding, in bps of the notional ``1 + |β|``; fees: each leg pays its taker fee on entry
    and exit, ``2 (fee_y + |β| fee_x) / (1 + |β|)`` (fractions; bps after × 10,000).

    Args:
        series: columns ``y``, ``x`` (log mids), ``beta`` (the rolling hedge ratio; a trade
            entered at ``t`` uses ``β_{t−1}``, as the spread at ``t`` does), ``z``; index
            ``window_end``.
        fee_y, fee_x: taker fees of the legs, fractions (:data:`arbstream.fees.
            DEFAULT_TAKER_FEES`).
        entry, exit_at: thresholds in standard deviations.

    Returns:
        One row per trade: ``entry_time``, ``exit_time``, ``side`` (+1 long, −1 short the
        spread), ``beta``, ``z_entry``, ``z_exit``, ``gross_bps``, ``fee_bps``, ``net_bps``,
        ``open_at_end``.

    Raises:
        ValueError: ``entry`` not above ``exit_at``, or a negative fee.
    """
    if not entry > abs(exit_at) or min(fee_y, fee_x) < 0:
        raise ValueError(f"need entry > |exit_at| and fees >= 0, got entry {entry}, exit "
                         f"{exit_at}, fees {fee_y}, {fee_x}")
    z = series["z"].to_numpy()
    ly, lx = series["y"].to_numpy(), series["x"].to_numpy()
    beta = series["beta"].shift(1).to_numpy()
    times = series.index
    trades: list[dict[str, Any]] = []
    open_at: int | None = None
    side = 0
    for t in range(len(z)):
        if not math.isfinite(z[t]):
            continue
        if open_at is None:
            if abs(z[t]) > entry and math.isfinite(beta[t]):
                open_at, side = t, (-1 if z[t] > 0 else 1)
            continue
        if (side < 0 and z[t] <= exit_at) or (side > 0 and z[t] >= exit_at):
            trades.append(_trade(open_at, t, side, ly, lx, beta, z, times, fee_y, fee_x, False))
            open_at = None
    if open_at is not None and open_at < len(z) - 1:
        last = len(z) - 1
        trades.append(_trade(open_at, last, side, ly, lx, beta, z, times, fee_y, fee_x, True))
    columns = ["entry_time", "exit_time", "side", "beta", "z_entry", "z_exit", "gross_bps",
               "fee_bps", "net_bps", "open_at_end"]
    return pd.DataFrame(trades, columns=columns)


def _trade(i: int, j: int, side: int, ly: np.ndarray, lx: np.ndarray, beta: np.ndarray,
           z: np.ndarray, times: pd.Index, fee_y: float, fee_x: float, open_end: bool
           ) -> dict[str, Any]:
    b = float(beta[i])
    notional = 1 + abs(b)
    gross = side * ((ly[j] - ly[i]) - b * (lx[j] - lx[i])) / notional * BPS
    fees = 2 * (fee_y + abs(b) * fee_x) / notional * BPS
    return {"entry_time": times[i], "exit_time": times[j], "side": side, "beta": b,
            "z_entry": float(z[i]), "z_exit": float(z[j]), "gross_bps": float(gross),
            "fee_bps": float(fees), "net_bps": float(gross - fees), "open_at_end": open_end}


# --- the job ----------------------------------------------------------------------------------

@dataclass
class PairsRun:
    """What a run did: ``stats`` per computed pair, ``errors`` (pair -> why it could not be
    computed), ``points`` written to InfluxDB, ``rejected`` points, ``documents`` written to
    MongoDB, ``signals`` published."""

    stats: dict[str, PairStats] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    points: int = 0
    rejected: int = 0
    documents: int = 0
    signals: int = 0

    def summary(self) -> dict[str, Any]:
        """A JSON-able summary: counts, and per pair its latest values and test p-values or
        its error."""
        pairs: dict[str, Any] = {name: {"error": why} for name, why in self.errors.items()}
        for name, s in self.stats.items():
            latest = {k: (v.isoformat() if isinstance(v, dt.datetime) else v)
                      for k, v in s.latest().items()}
            pairs[name] = {**latest, "observations": len(s.series),
                           "beta_ols": s.beta_ols, "adf_pvalue": s.adf_pvalue,
                           "coint_pvalue": s.coint_pvalue, "half_life_s": s.half_life_s}
        return {"pairs": pairs, "points": self.points, "rejected": self.rejected,
                "documents": self.documents, "signals": self.signals}


def compute_all(conf: PairsConfig, features: pd.DataFrame,
                pairs: Sequence[PairSpec] | None = None) -> PairsRun:
    """:func:`compute` every pair of ``pairs`` (default ``conf.pairs``) on ``features``; a
    pair that raises :class:`PairDataError` goes to :attr:`PairsRun.errors`."""
    result = PairsRun()
    for pair in conf.pairs if pairs is None else pairs:
        try:
            result.stats[pair.name] = compute(align(features, pair), pair, conf.window,
                                              conf.z_window, conf.test_lookback)
        except PairDataError as exc:
            result.errors[pair.name] = str(exc)
    return result


def publish(conf: PairsConfig, signals: Sequence[PairSignal], timeout: float = 15.0) -> int:
    """Publish ``signals`` on ``conf.topic`` (key = pair name) and wait for every delivery.

    Raises:
        RuntimeError: a delivery failed or did not complete within ``timeout`` seconds.
    """
    from confluent_kafka import Producer

    if not signals:
        return 0
    errors: list[str] = []
    producer = Producer(reliable_producer_config(conf.kafka.client_config(), linger_ms=5))
    for signal in signals:
        producer.produce(conf.topic, signal.to_json(), signal.pair.encode(),
                         on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
    left = producer.flush(timeout)
    if left or errors:
        raise RuntimeError(f"pair_signal events not delivered to {conf.topic}: "
                           f"{errors or f'{left} pending'}")
    return len(signals)


def run(settings: Settings, since: dt.datetime | None = None,
        until: dt.datetime | None = None, *, publish_signals: bool = True) -> PairsRun:
    """The pairs job: read the lake's features of ``[since, until)`` (naive = UTC; ``None``
    unbounded), compute every configured pair, write InfluxDB ``pair_stats`` (default RP; the
    database is created when missing, :func:`~arbstream.store.influx.schema.ensure_database`),
    MongoDB ``pair_stats`` (failed pairs marked ``status: error`` with the reason) and, with
    ``publish_signals``, one ``pair_signal`` event per computed pair on ``ARB_PAIRS_TOPIC``
    (created when missing).

    Returns:
        The :class:`PairsRun` (computed pairs, errors, counts).

    Raises:
        InfluxError, InfluxUnavailableError: InfluxDB refused the request or is unreachable.
        pymongo.errors.PyMongoError: MongoDB errors.
        RuntimeError: Kafka unreachable or a signal not delivered.
    """
    from arbstream.topics import ensure_topic

    conf = PairsConfig.of(settings)
    result = compute_all(conf, read_features(conf.lake, since, until))
    now = dt.datetime.now(dt.UTC)
    rows = (row for s in result.stats.values() for row in s.points())
    ensure_database(conf.influx)
    stored, rejected = write_lines_with_rejects(conf.influx, PAIR_STATS,
                                                (LINES[PAIR_STATS](r) for r in rows))
    result.points, result.rejected = stored, len(rejected)
    result.documents = store.upsert_pair_stats(
        conf.mongo, [s.document(since, until, now) for s in result.stats.values()])
    by_name: Mapping[str, PairSpec] = {p.name: p for p in conf.pairs}
    for name, why in result.errors.items():
        store.record_error(conf.mongo, name, by_name[name].y, by_name[name].x, why, now)
    if publish_signals:
        signals = [sig for s in result.stats.values()
                   if (sig := s.signal(now_ms())) is not None]
        if signals:
            ensure_topic(settings, conf.topic)
        result.signals = publish(conf, signals)
    return result
