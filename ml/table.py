"""The training table: one row per pair and step of the lake's ``spread`` record, with
features that use only the pair's past and present and labels that use only ``t + h``.

Built with Spark operators only (``Window`` functions, joins; no Python UDFs) from the lake
(``<lake_dir>/<record>/date=YYYY-MM-DD/*.parquet``, columns = the tracker's field dicts).

**Steps.** A data set has a step of ``step_seconds`` (IAQF: the 60 s bar; the Binance capture:
1 s): only spread windows ending on a multiple of the step are kept, so a lake written with a
window ``W`` shorter than the step (each quote then shows in several windows) gives the same
table. A lag, lead or moving statistic "k steps" away looks at the pair's row exactly
``k * step`` earlier or later; a missing row (a missing minute) gives null, never a farther row.

**Features** (all double; null when unknown), per row at window end ``t`` of pair
``(symbol, sell_symbol, buy_exchange, sell_exchange)``:

* :data:`arbstream.features.ONLINE_FEATURES`, the event-local ones the alert worker computes
  (:func:`online_columns` is the Spark twin of :func:`arbstream.features.online_features`);
* ``net_lag1..3`` (net bps 1-3 steps before), ``net_ma5``/``net_ma20`` and
  ``net_std5``/``net_std20`` (mean and sample std of net bps over the steps ``(t - n, t]``);
* ``episode_age_s``: seconds the pair's net has been above 0 in the current run of
  consecutive steps (one step for the run's first row, the tracker's ``duration_s``), 0 when
  net <= 0;
* ``usdc_dev_bps``, ``usdt_dev_bps``: (mid - 1) x 10^4 of USDC-USD and USDT-USD (mean over
  exchanges of the ``feature`` rows), as of ``t`` (the latest at or before ``t``);
* per leg, ``buy_*`` (symbol, buy exchange) and ``sell_*`` (sell symbol, sell exchange), from
  the ``feature`` record at ``t``: :data:`LEG_FEATURES`. The seed system's ten per-exchange
  features (price, % change, MA5, MA20, std5, 10-step volatility, bid-ask spread, volume MA,
  hour, minute) are ``mid``, ``pct_change``, ``mid_ma5``, ``mid_ma20``, ``mid_std5``,
  ``vol10``, ``quote_spread_bps``, ``volume_ma5``, ``hour``, ``minute``.

**Labels** (``lead()`` over the pair's rows, null when the row ``h`` or ``L`` steps ahead is
missing): ``y_next_bps`` = net bps at ``t + h`` steps (regression); ``y_exec`` = 1 when the
opportunity is still executable after a latency of ``L`` steps, i.e. net at ``t + L`` (already
after fees and haircuts) > ``min_net``, else 0 (classification).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from arbstream.features import FEATURE_NAMES
from arbstream.fees import BPS
from arbstream.store import lake

#: The pair a spread row belongs to (the tracker's pair identity).
PAIR = ("symbol", "sell_symbol", "buy_exchange", "sell_exchange")
#: Per-(symbol, exchange) features of each leg, from the lake's ``feature`` record.
LEG_FEATURES: dict[str, str] = {
    "mid": "(bid + ask) / 2, quote currency", "pct_change": "mid / mid one step before - 1",
    "mid_ma5": "mean mid over 5 steps", "mid_ma20": "mean mid over 20 steps",
    "mid_std5": "sample std of mid over 5 steps",
    "vol10": "sample std of log returns over 10 steps (per step, not annualised)",
    "volatility": "the tracker's rolling volatility of log returns over its horizon",
    "quote_spread_bps": "(ask - bid) / mid, bps", "imbalance": "top-of-book size imbalance",
    "latency_ms": "mean received - exchange time, ms", "message_rate": "quotes per s",
    "log_return": "ln(mid / previous window's mid)", "volume_ma5": "mean volume over 5 steps",
}
#: Features of the pair's own history (its spread, its run, the stablecoins).
HISTORY_FEATURES = ("net_lag1", "net_lag2", "net_lag3", "net_ma5", "net_ma20", "net_std5",
                    "net_std20", "episode_age_s", "usdc_dev_bps", "usdt_dev_bps")
#: Every model feature, in column order: the online ones first.
FEATURES: tuple[str, ...] = (
    *FEATURE_NAMES, *HISTORY_FEATURES,
    *(f"{leg}_{name}" for leg in ("buy", "sell") for name in LEG_FEATURES),
)
#: Columns that are the spread itself or derived from it (excluded from clustering).
SPREAD_DERIVED = frozenset({"net_bps", "gross_bps", "spread_mean_bps", "spread_std_bps",
                            "spread_z", *HISTORY_FEATURES[:7], "episode_age_s"})
KEYS = ("window_end", "t_ms", "pair", *PAIR, "regime")
LABELS = ("y_next_bps", "y_exec")
#: The USDC depeg (SVB failure): UTC dates of the "during" regime, inclusive.
DEPEG = (date(2023, 3, 10), date(2023, 3, 13))


@dataclass(frozen=True)
class TableParams:
    """How the table is cut and labelled.

    ``step_seconds``: the data set's step, s. ``horizon_steps`` (h) and ``latency_steps``
    (L): label offsets, in steps. ``min_net``: executable threshold on the net spread
    (fraction, after fees). ``start``/``end``: UTC dates kept, inclusive (``None``: all).
    """

    step_seconds: float = 60.0
    horizon_steps: int = 1
    latency_steps: int = 1
    min_net: float = 0.0
    start: date | None = None
    end: date | None = None

    @property
    def step_ms(self) -> int:
        return round(self.step_seconds * 1000)


#: Defaults per data set: IAQF 1-minute bars (next bar), the Binance capture (1 s ahead).
DATASETS: dict[str, TableParams] = {
    "iaqf": TableParams(step_seconds=60.0, horizon_steps=1, latency_steps=1),
    "binance": TableParams(step_seconds=1.0, horizon_steps=1, latency_steps=1),
}


def read_record(spark: SparkSession, lake_dir: str, record: str, params: TableParams
                ) -> DataFrame:
    """One record of the lake, partition-pruned to ``params.start..end`` (``date`` column)."""
    path = str(lake.path(lake.LakeConfig(Path(lake_dir)), record))
    df = spark.read.option("basePath", path).parquet(path)
    if params.start is not None:
        df = df.where(F.col("date") >= F.lit(params.start))
    if params.end is not None:
        df = df.where(F.col("date") <= F.lit(params.end))
    return df


def _ms(col: str) -> Column:
    return F.unix_millis(F.col(col))


def online_columns() -> list[Column]:
    """:data:`arbstream.features.FEATURE_NAMES` as Spark columns over a spread row, the same
    numbers as :func:`arbstream.features.online_features` (null where it gives ``nan``)."""
    fees = sum(F.coalesce(F.col(k), F.lit(0.0)) for k in ("buy_fee", "sell_fee",
                                                           "conversion_fee"))
    usd = F.when(F.col("usd_rate").isNull() | (F.col("usd_rate") == 0), 1.0).otherwise(
        F.col("usd_rate"))
    size_usd = F.when(F.col("size_base").isNotNull() & (F.col("buy_ask") != 0),
                      F.col("size_base") * F.col("buy_ask") * usd)
    end = _ms("window_end")
    cols = {
        "net_bps": F.col("net_bps"), "gross_bps": F.col("gross_bps"), "fees_bps": fees * BPS,
        "spread_mean_bps": F.col("spread_mean_bps"), "spread_std_bps": F.col("spread_std_bps"),
        "spread_z": F.col("spread_z"),
        "cross_quote": F.when(F.coalesce(F.col("cross_quote"), F.lit(False)), 1.0).otherwise(
            0.0),
        "conversion_dev_bps": F.coalesce((F.col("conversion_rate") - 1.0) * BPS, F.lit(0.0)),
        "log_size_usd": F.when(size_usd >= 0, F.log1p(size_usd)),
        "leg_lag_s": F.abs(F.unix_micros("buy_ts") - F.unix_micros("sell_ts")) / 1e6,
        "hour": F.floor(end / 3_600_000) % 24, "minute": F.floor(end / 60_000) % 60,
    }
    assert tuple(cols) == FEATURE_NAMES, "online_columns out of step with ONLINE_FEATURES"
    return [c.cast("double").alias(name) for name, c in cols.items()]


def _at(col: str, k: int, w: Window, step_ms: int) -> Column:
    """``col`` of the pair's row exactly ``k`` steps away (k < 0: before), else null."""
    fn = F.lead if k > 0 else F.lag
    return F.when(fn("t_ms", abs(k)).over(w) == F.col("t_ms") + k * step_ms,
                  fn(col, abs(k)).over(w))


def _moving(w: Window, step_ms: int, n: int) -> Window:
    """The steps ``(t - n, t]`` of an ordered-by-``t_ms`` window."""
    return w.rangeBetween(-(n - 1) * step_ms, 0)


def leg_features(feature: DataFrame, step_ms: int) -> DataFrame:
    """Per (symbol, exchange, t_ms) on the step grid: :data:`LEG_FEATURES` from the
    ``feature`` record."""
    w = Window.partitionBy("symbol", "exchange").orderBy("t_ms")
    f = feature.select("symbol", "exchange", _ms("window_end").alias("t_ms"), "mid",
                       "log_return", "volatility", "quote_spread_bps", "imbalance",
                       "latency_ms", "message_rate", "volume").where(F.col("t_ms") % step_ms == 0)
    prev = _at("mid", -1, w, step_ms)
    return f.select(
        "symbol", "exchange", "t_ms", "mid", (F.col("mid") / prev - 1.0).alias("pct_change"),
        F.avg("mid").over(_moving(w, step_ms, 5)).alias("mid_ma5"),
        F.avg("mid").over(_moving(w, step_ms, 20)).alias("mid_ma20"),
        F.stddev_samp("mid").over(_moving(w, step_ms, 5)).alias("mid_std5"),
        F.stddev_samp("log_return").over(_moving(w, step_ms, 10)).alias("vol10"),
        "volatility", "quote_spread_bps", "imbalance", "latency_ms", "message_rate",
        "log_return", F.avg("volume").over(_moving(w, step_ms, 5)).alias("volume_ma5"),
    )


def stablecoin_asof(times: DataFrame, feature: DataFrame) -> DataFrame:
    """Per ``t_ms`` of ``times``: ``usdc_dev_bps``, ``usdt_dev_bps`` as of ``t`` (the latest
    USDC-USD / USDT-USD mid at or before ``t``, mean over exchanges; null before the first)."""
    mids = (feature.where(F.col("symbol").isin("USDC-USD", "USDT-USD"))
            .groupBy(_ms("window_end").alias("t_ms")).pivot("symbol", ["USDC-USD", "USDT-USD"])
            .agg(F.avg("mid")))
    w = Window.orderBy("t_ms").rowsBetween(Window.unboundedPreceding, 0)
    grid = times.join(mids, "t_ms", "full")
    return times.join(grid.select(
        "t_ms",
        ((F.last("USDC-USD", ignorenulls=True).over(w) - 1.0) * BPS).alias("usdc_dev_bps"),
        ((F.last("USDT-USD", ignorenulls=True).over(w) - 1.0) * BPS).alias("usdt_dev_bps"),
    ), "t_ms")


def regime(t: Column) -> Column:
    """``before`` (< 2023-03-10), ``during`` (2023-03-10 .. 13) or ``after`` the USDC depeg."""
    d = F.to_date(t)
    return (F.when(d < F.lit(DEPEG[0]), "before").when(d <= F.lit(DEPEG[1]), "during")
            .otherwise("after"))


def build_table(spread: DataFrame, feature: DataFrame, params: TableParams) -> DataFrame:
    """The training table from the lake's ``spread`` and ``feature`` records.

    Returns:
        :data:`KEYS`, :data:`FEATURES` (double) and :data:`LABELS` (``y_next_bps`` double,
        ``y_exec`` int), one row per pair and step; labels null where the row ``h``/``L``
        steps ahead is missing.
    """
    step, h, lat = params.step_ms, params.horizon_steps, params.latency_steps
    w = Window.partitionBy(*PAIR).orderBy("t_ms")
    s = (spread.withColumn("t_ms", _ms("window_end"))
         .where(F.col("t_ms") % step == 0)
         .dropDuplicates([*PAIR, "t_ms"]))
    s = s.select("window_end", "t_ms", *PAIR, "net", *online_columns())
    pos = F.col("net") > 0
    s = s.select("*", pos.alias("_pos"),
                 (pos & ~F.coalesce(_at("net", -1, w, step) > 0, F.lit(False))).alias("_start"))
    run_start = F.last(F.when(F.col("_start"), F.col("t_ms")), ignorenulls=True).over(
        w.rowsBetween(Window.unboundedPreceding, 0))
    s = s.select(
        *[F.col(c) for c in ("window_end", "t_ms", *PAIR, *FEATURE_NAMES)],
        *[_at("net_bps", -k, w, step).alias(f"net_lag{k}") for k in (1, 2, 3)],
        *[F.avg("net_bps").over(_moving(w, step, n)).alias(f"net_ma{n}") for n in (5, 20)],
        *[F.stddev_samp("net_bps").over(_moving(w, step, n)).alias(f"net_std{n}")
          for n in (5, 20)],
        F.when(F.col("_pos"), (F.col("t_ms") - run_start + step) / 1000.0).otherwise(
            0.0).alias("episode_age_s"),
        _at("net_bps", h, w, step).alias("y_next_bps"),
        (_at("net", lat, w, step) > params.min_net).cast("int").alias("y_exec"),
    )
    s = s.join(stablecoin_asof(s.select("t_ms").distinct(), feature), "t_ms", "left")
    legs = leg_features(feature, step)
    for leg, symbol in (("buy", "symbol"), ("sell", "sell_symbol")):
        renamed = legs.select(
            F.col("symbol").alias(symbol), F.col("exchange").alias(f"{leg}_exchange"), "t_ms",
            *[F.col(n).alias(f"{leg}_{n}") for n in LEG_FEATURES])
        s = s.join(renamed, [symbol, f"{leg}_exchange", "t_ms"], "left")
    symbols = F.when(F.col("symbol") == F.col("sell_symbol"), F.col("symbol")).otherwise(
        F.concat_ws("/", "symbol", "sell_symbol"))
    pair = F.concat_ws("|", symbols, "buy_exchange", "sell_exchange")
    return s.select(
        "window_end", "t_ms", pair.alias("pair"), *PAIR, regime(F.col("window_end")).alias(
            "regime"), *[F.col(c).cast("double") for c in FEATURES], *LABELS)


def load_table(spark: SparkSession, lake_dir: str, params: TableParams) -> DataFrame:
    """:func:`build_table` over the lake at ``lake_dir``."""
    return build_table(read_record(spark, lake_dir, "spread", params),
                       read_record(spark, lake_dir, "feature", params), params)
