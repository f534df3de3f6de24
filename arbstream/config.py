"""The single place arbstream's configuration lives, validated at start-up.

Sources, highest priority first: keyword arguments, ``ARB_*`` environment variables, a ``.env``
file in the working directory, secret files (:func:`secrets_dir`), the TOML or YAML file named
by ``ARB_CONFIG_FILE``, then the defaults below. Every variable is documented in
``.env.example``. Secrets (passwords, tokens, Kafka SASL credentials) come from the environment
or from secret files (Docker/Kubernetes ``secrets``), and never appear in logs or errors.

Long module: every setting of every component is declared and cross-validated here, by rule
(one validated ``Settings``); each section is a flat list of fields.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SecretsSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
    YamlConfigSettingsSource,
)

from arbstream.fees import DEFAULT_TAKER_FEES

EXCHANGE_ID = r"^[a-z][a-z0-9_]*$"
#: A plain e-mail address (``local@domain``), without display name.
EMAIL_RE = r"^[^@\s<>,;\"]+@[^@\s<>,;\"]+$"


def _all_match(values: list[str], pattern: str | re.Pattern[str], what: str) -> list[str]:
    """``values`` when each matches ``pattern``; else ValueError ``"<what>, got [bad...]"``."""
    bad = [v for v in values if not re.match(pattern, v)]
    if bad:
        raise ValueError(f"{what}, got {bad}")
    return values


#: Fields of an episode rule that a pair-trading rule (``min_abs_pair_z``) may not set.
PAIR_RULE_FORBIDDEN = frozenset({
    "symbols", "buy_exchanges", "sell_exchanges", "cross_quote", "min_net_bps",
    "min_profit_usd", "min_duration_s", "digest", "opportunity_stage", "min_score",
    "min_predicted_bps",
})
#: A pair leg: ``<exchange id>:<BASE-QUOTE>``.
PAIR_LEG = r"^[a-z][a-z0-9_]*:[A-Z0-9]{2,12}-[A-Z0-9]{2,12}$"


class PairSpec(BaseModel):
    """One pair of the pair-trading job (``ARB_PAIRS``): the dependent leg ``y`` regressed on
    the independent leg ``x``, each ``<exchange>:<BASE-QUOTE>`` (``coinbase:BTC-USD``).

    Raises:
        pydantic.ValidationError: a bad name or leg, or the same leg twice.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$",
                      description="Unique pair name (lower-case letters, digits, _ . -)")
    y: str = Field(pattern=PAIR_LEG, description="Dependent leg, exchange:SYMBOL")
    x: str = Field(pattern=PAIR_LEG, description="Independent leg (hedge), exchange:SYMBOL")

    @model_validator(mode="after")
    def _distinct(self) -> PairSpec:
        if self.y == self.x:
            raise ValueError(f"pair {self.name}: y and x are the same leg {self.y}")
        return self

    @staticmethod
    def leg(text: str) -> tuple[str, str]:
        """``(exchange, symbol)`` of a leg ``exchange:SYMBOL``."""
        exchange, _, symbol = text.partition(":")
        return exchange, symbol

    @property
    def exchanges(self) -> tuple[str, str]:
        """The exchange ids of ``y`` and ``x``."""
        return self.leg(self.y)[0], self.leg(self.x)[0]


#: ``ARB_PAIRS`` default: the issue's three pairs.
DEFAULT_PAIRS = (
    PairSpec(name="btcusd-coinbase-kraken", y="coinbase:BTC-USD", x="kraken:BTC-USD"),
    PairSpec(name="btc-binance-usdt-coinbase-usd", y="binance:BTC-USDT",
             x="coinbase:BTC-USD"),
    PairSpec(name="btcusdt-binance-perp-spot", y="binanceusdm:BTC-USDT",
             x="binance:BTC-USDT"),
)


class AlertRule(BaseModel):
    """One e-mail alert rule of the ``alerts`` worker (``ARB_ALERT_RULES``).

    An episode matches when every filter given matches and its figures reach every minimum
    (see ``alerts/README.md``). Empty filter lists match everything. Units: ``min_net_bps`` in
    basis points, ``min_profit_usd`` in USD, ``min_duration_s`` in seconds. ``min_score``
    (probability 0..1) and ``min_predicted_bps`` (bps) are checked against the champion models
    of the registry; when one is set and no champion is available the rule does not fire (and
    the worker logs why).

    Raises:
        pydantic.ValidationError: an invalid name, symbol, exchange id or address, or no
            recipient.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                      description="Unique rule name (letters, digits, _ . -)")
    symbols: list[str] = Field(
        default_factory=list,
        description="Canonical symbols; matches the buy or the sell leg's symbol. Empty: any",
    )
    buy_exchanges: list[str] = Field(default_factory=list, description="Empty: any")
    sell_exchanges: list[str] = Field(default_factory=list, description="Empty: any")
    cross_quote: bool = Field(True, description="Also match cross-quote pairs")
    min_net_bps: float = Field(0.0, description="Minimum net spread, bps")
    min_profit_usd: float = Field(0.0, ge=0, description="Minimum expected profit, USD")
    min_duration_s: float = Field(0.0, ge=0, description="Minimum episode duration so far, s")
    recipients: list[str] = Field(min_length=1, description="E-mail addresses")
    digest: bool = Field(False, description="Batch matches into one e-mail per digest interval")
    opportunity_stage: Literal["early", "final"] = Field(
        "early", description="Opportunity events the rule fires on: early = the first matching "
        "early or final window, final = final windows only")
    min_score: float | None = Field(
        None, ge=0, le=1, description="Minimum champion opportunity-scorer probability (0..1) "
        "that the window is still executable after the model's latency; None: not checked")
    min_predicted_bps: float | None = Field(
        None, description="Minimum champion regressor prediction of the net spread at the "
        "model's horizon, bps; None: not checked")
    min_abs_pair_z: float | None = Field(
        None, gt=0, description="Makes this a pair-trading rule: fires on the pairs job's "
        "pair_signal events whose latest |z-score| (standard deviations) reaches it, never on "
        "opportunities or episodes; None: an episode rule (docs/pairs.md)")
    pairs: list[str] = Field(
        default_factory=list, description="Pair names (ARB_PAIRS) a pair rule watches. Empty: "
        "any; only with min_abs_pair_z")

    @model_validator(mode="after")
    def _pair_rule(self) -> AlertRule:
        if self.min_abs_pair_z is None:
            if self.pairs:
                raise ValueError("pairs filters a pair-trading rule: set min_abs_pair_z too")
            return self
        episode_only = sorted(PAIR_RULE_FORBIDDEN & self.model_fields_set)
        if episode_only:
            raise ValueError(f"a pair-trading rule (min_abs_pair_z) cannot set the episode "
                             f"fields {episode_only}")
        return self

    @field_validator("symbols")
    @classmethod
    def _symbols(cls, value: list[str]) -> list[str]:
        from arbstream.schemas import SYMBOL_RE

        return _all_match(value, SYMBOL_RE, "symbols must be canonical BASE-QUOTE")

    @field_validator("buy_exchanges", "sell_exchanges")
    @classmethod
    def _exchanges(cls, value: list[str]) -> list[str]:
        return _all_match(value, EXCHANGE_ID, "exchange ids must be lower-case identifiers")

    @field_validator("recipients")
    @classmethod
    def _recipients(cls, value: list[str]) -> list[str]:
        return _all_match(value, EMAIL_RE,
                          "recipients must be plain addresses like ops@example.com")


class Settings(BaseSettings):
    """Validated runtime configuration. Durations are seconds, fees and thresholds fractions."""

    model_config = SettingsConfigDict(
        env_prefix="ARB_", env_file=".env", extra="forbid", validate_default=True,
        env_ignore_empty=True,  # ARB_X= (e.g. an unset ${VAR:-} in compose) means "not set"
        hide_input_in_errors=True,  # a model-level error would otherwise print every secret
    )

    # --- where things live -------------------------------------------------------------
    state_dir: Path = Field(Path(".state"), description="Local services' data, checkpoints, logs")
    data_dir: Path = Field(Path("../shared/data"), description="Recorded market data root")
    config_file: Path | None = Field(None, description="Optional TOML or YAML settings file")
    models_dir: Path | None = Field(
        None, description="Model registry root (<models_dir>/<name>/<version>/); None: "
        "<state_dir>/models"
    )
    lake_dir: Path | None = Field(
        None, description="Parquet history of the stream's records (<lake_dir>/<record>/"
        "date=YYYY-MM-DD/<key>.parquet); None: <state_dir>/lake"
    )
    ml_output_dir: Path = Field(
        Path(".state/ml"), description="Where `ml/retrain.py` writes each result "
        "(<ml_output_dir>/<dataset>/), registered or not"
    )
    ml_folds: int = Field(5, ge=1, le=50, description="Walk-forward folds of a retrain")
    ml_seed: int = Field(42, ge=0, description="Seed of every random choice of a retrain")
    ml_promotion_folds: int = Field(
        3, ge=1, le=50, description="K of the promotion rule: a new model version becomes "
        "champion only if it beats persistence (or the scorer baselines) and the current "
        "champion on each of the last K walk-forward folds"
    )
    ml_retrain_every_seconds: float = Field(
        86_400.0, gt=0, description="`arbstream ml retrain --every` default interval, s"
    )

    # --- exchanges and fees ------------------------------------------------------------
    exchanges: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TAKER_FEES),
        description="Exchange ids whose topics are created and read",
    )
    fees: dict[str, float] = Field(
        default_factory=dict, description="Taker-fee overrides, fractions, merged over the table"
    )

    # --- live producers -----------------------------------------------------------------
    feeds: dict[str, list[str]] = Field(
        default_factory=lambda: {
            "coinbase": ["BTC-USD", "ETH-USD"],
            "binance": ["BTC-USDT", "ETH-USDT"],
            "bitstamp": ["BTC-USD", "ETH-USD"],
            "kraken": ["BTC-USD", "ETH-USD"],
            "bitfinex": ["BTC-USD", "ETH-USD"],
            "gemini": ["BTC-USD", "ETH-USD"],
        },
        description="Exchange id -> canonical symbols streamed by `arbstream produce --all`",
    )
    feed_channels: list[Literal["bbo", "trades", "book"]] = Field(
        default_factory=lambda: ["bbo", "trades"], description="Channels each feed streams"
    )
    book_depth: int = Field(10, ge=1, le=1000, description="Levels per md.<exchange>.book record")
    feed_stale_seconds: float = Field(30.0, gt=0, description="Watchdog: reconnect after silence")
    producer_queue_size: int = Field(10_000, ge=1, description="Bounded in-memory queue")
    health_interval_seconds: float = Field(5.0, gt=0, description="md.health period")
    producer_close_timeout_seconds: float = Field(
        30.0, gt=0, description="Shutdown deadline to deliver what is held, then exit code 3"
    )
    producer_spool_dir: Path | None = Field(
        None, description="On-disk spool of records not yet delivered (None: memory only)"
    )
    producer_spool_fsync: Literal["never", "batch"] = Field(
        "never", description="Spool fsync: never (page cache) or batch (each batch)"
    )
    feed_ws_urls: dict[str, str] = Field(
        default_factory=dict, description="Exchange id -> websocket URL override"
    )
    feed_rest_urls: dict[str, str] = Field(
        default_factory=dict, description="Exchange id -> REST base URL override"
    )
    feed_ca_file: Path | None = Field(None, description="Extra CA bundle for overridden URLs")
    feed_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Exchange id -> extra cryptofeed feed keyword options"
    )

    # --- Kafka ---------------------------------------------------------------------------
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_partitions: int = Field(3, ge=1, description="Partitions of each md.* topic")
    kafka_replication: int = Field(1, ge=1)
    kafka_min_insync_replicas: int | None = Field(
        None, ge=1, description="min.insync.replicas of the topics arbstream creates "
        "(<= kafka_replication); None: the broker's default"
    )
    kafka_config: dict[str, SecretStr] = Field(
        default_factory=dict, description="More librdkafka settings for every client (JSON "
        "object: TLS files, client.id, OAUTHBEARER...), also kafka.* options of Spark's source"
    )
    kafka_security_protocol: str = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None

    # --- InfluxDB ------------------------------------------------------------------------
    influx_url: str = "http://127.0.0.1:8086"
    influx_api: Literal["v1", "v2"] = "v1"
    influx_db: str = Field("arbstream", description="v1 database or v2 bucket")
    influx_org: str = "arbstream"
    influx_token: SecretStr | None = None
    influx_username: str | None = None
    influx_password: SecretStr | None = None

    # --- MongoDB -------------------------------------------------------------------------
    mongo_uri: SecretStr = SecretStr("mongodb://127.0.0.1:27017")
    mongo_db: str = "arbstream"

    # --- Spark job -----------------------------------------------------------------------
    spark_master: str = "local[2]"
    spark_kafka_source: Literal["python", "builtin"] = "python"
    spark_driver_memory: str = Field(
        "4g", pattern=r"^\d+[mg]$", description="JVM heap of the driver (local mode: also the "
        "executors'); ignored under spark-submit, which sets its own"
    )
    spark_shuffle_partitions: int = Field(
        2, ge=1, description="Shuffle partitions: the cores (measured on local[2]: 4 -> 2 took "
        "early-event latency at 10k quotes/s from p50 4.2 s to 2.5 s)"
    )
    trigger_seconds: float = Field(0.5, gt=0, description="Micro-batch trigger interval")
    max_offsets_per_trigger: int | None = Field(200_000, ge=1)
    max_bytes_per_trigger: int | None = Field(
        64 << 20, ge=1024, description="Cap on the bytes a micro-batch reads (Python Kafka "
        "source; estimated per partition from its newest record)"
    )
    starting_offsets: Literal["earliest", "latest"] = "earliest"
    fail_on_data_loss: bool = True
    stream_max_restarts: int = Field(
        10, ge=0, description="Failed queries restarted from their checkpoint within "
        "stream_restart_window_seconds before `arbstream stream` gives up (exit 1); 0: never"
    )
    stream_restart_window_seconds: float = Field(
        900.0, gt=0, description="Window over which query restarts are counted, s"
    )
    stream_restart_backoff_seconds: float = Field(
        2.0, gt=0, description="Wait before a query's first restart, s; doubles per "
        "consecutive restart up to stream_restart_backoff_max_seconds"
    )
    stream_restart_backoff_max_seconds: float = Field(
        60.0, gt=0, description="Longest wait between restarts of a query, s"
    )
    watermark_seconds: float = Field(
        10.0, ge=0, description="Allowed lateness behind each exchange's own event-time clock"
    )
    idle_timeout_seconds: float = Field(
        5.0, gt=0, description="An exchange silent this long (processing time) stops holding "
        "back the combined watermark; when all are, every window closes"
    )
    max_clock_skew_seconds: float = Field(
        10.0, ge=0, description="exchange_ts may lead received_ts (and received_ts the "
        "processing clock) by this much; more is dead-lettered as future_timestamp"
    )
    max_event_time_jump_seconds: float = Field(
        900.0, gt=0, description="Event time may jump ahead of every exchange clock by this "
        "much; more is dead-lettered as future_timestamp"
    )
    max_record_bytes: int = Field(
        262_144, ge=1024, description="Larger market-data records are dead-lettered"
    )
    stream_buckets: int = Field(
        2, ge=1, le=1024, description="Keys of the stateful operator (bases hashed into them)"
    )
    window_seconds: float = Field(1.0, gt=0, description="Snapshot window W")
    max_quote_age_seconds: float = Field(5.0, gt=0, description="Quote staleness bound")
    min_net: float = Field(0.0, description="Opportunity threshold on net spread, fraction")
    slippage_bps: float = Field(1.0, ge=0, description="Haircut on net for slippage, bps")
    latency_haircut_bps: float = Field(
        1.0, ge=0, description="Haircut on net for prices moving during execution, bps"
    )
    notional_usd: float = Field(
        10_000.0, gt=0, description="Notional to fill for VWAP and when sizes are unknown, USD"
    )
    usd_quotes: list[str] = Field(
        default_factory=lambda: ["USD", "USDT", "USDC"],
        description="Quote currencies treated as USD-like for cross-quote spreads",
    )
    episode_gap_seconds: float = Field(
        10.0, gt=0, description="An episode closes after this long without an opportunity"
    )
    stats_horizon_seconds: float = Field(
        300.0, gt=0, description="Rolling horizon of spread and volatility statistics"
    )
    anomaly_sigma: float = Field(3.0, gt=0, description="Anomaly threshold, standard deviations")

    # --- storage -------------------------------------------------------------------------
    influx_raw_retention: str = Field(
        "30d", pattern=r"^(INF|\d+[hdw])$", description="InfluxDB retention of raw quotes/trades"
    )
    influx_features_retention: str = Field(
        "180d", pattern=r"^(INF|\d+[hdw])$", description="InfluxDB retention of features"
    )
    mongo_ttl_days: float = Field(
        30.0, gt=0, description="TTL of high-volume MongoDB collections (opportunities, features)"
    )

    # --- Grafana -------------------------------------------------------------------------
    grafana_url: str = Field(
        "http://127.0.0.1:3000", description="Grafana base URL for `arbstream grafana publish`"
    )
    grafana_token: SecretStr | None = Field(
        None, description="Grafana service-account token (Bearer); wins over user/password"
    )
    grafana_username: str | None = Field(None, description="Grafana basic-auth user")
    grafana_password: SecretStr | None = Field(None, description="Grafana basic-auth password")
    grafana_folder: str = Field(
        "arbstream", min_length=1, max_length=40, pattern=r"^[A-Za-z0-9][A-Za-z0-9 _.-]*$",
        description="Grafana folder title (its uid is the slug of the title)",
    )
    grafana_influx_url: str | None = Field(
        None, description="InfluxDB URL as the Grafana server reaches it (default influx_url)"
    )

    # --- alerts ----------------------------------------------------------------------------
    alert_rules: list[AlertRule] = Field(
        default_factory=list, description="E-mail alert rules of `arbstream alerts run`"
    )
    alert_topic: str = Field("arb.opportunities", description="Topic the alert worker reads")
    alert_deadletter_topic: str = Field(
        "md.deadletter", description="Where the alert worker sends invalid events"
    )
    alert_group_id: str = Field("arbstream-alerts", min_length=1,
                                description="Kafka consumer group of the alert worker")
    alert_starting_offsets: Literal["earliest", "latest"] = Field(
        "latest", description="Where a new consumer group starts reading"
    )
    alert_session_timeout_seconds: float = Field(
        10.0, ge=1, le=300, description="Consumer group session timeout"
    )
    alert_cooldown_seconds: float = Field(
        900.0, ge=0, description="Per rule, symbol and pair: event time between two alerts"
    )
    alert_digest_seconds: float = Field(
        300.0, gt=0, description="Digest rules: wall-clock interval batched into one e-mail"
    )
    alert_from: str = Field("arbstream <alerts@arbstream.local>", description="From header")
    alert_model_reload_seconds: float = Field(
        10.0, gt=0, description="How often the alert worker looks for a newly promoted "
        "champion model (wall clock)"
    )
    # --- pair trading (ml/pairs.py, docs/pairs.md) ------------------------------------------
    pairs: list[PairSpec] = Field(
        default_factory=lambda: list(DEFAULT_PAIRS),
        description="Pairs of `arbstream pairs run` (JSON list of {name, y, x}); the default "
        "keeps those whose exchanges are in ARB_EXCHANGES",
    )
    pairs_window: int = Field(
        60, ge=10, le=100_000, description="Rolling window of the hedge ratio (RollingOLS) "
        "and of the return correlation, observations (common window ends of the two legs)")
    pairs_z_window: int = Field(
        60, ge=10, le=100_000, description="Rolling window of the spread z-score, observations")
    pairs_test_lookback: int = Field(
        1440, ge=50, le=1_000_000, description="Latest observations the ADF and Engle-Granger "
        "tests and the AR(1) half-life use")
    pairs_topic: str = Field(
        "arb.pair_signals", min_length=1, description="Topic the pairs job publishes "
        "pair_signal events to and the alert worker reads (pair-trading rules)")
    smtp_host: str = Field("127.0.0.1", min_length=1)
    smtp_port: int = Field(587, ge=1, le=65535)
    smtp_security: Literal["starttls", "tls", "none"] = Field(
        "starttls", description="STARTTLS, implicit TLS (port 465) or none (local relay only)"
    )
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_ca_file: Path | None = Field(None, description="Extra CA bundle for the SMTP server")
    smtp_timeout_seconds: float = Field(10.0, gt=0, description="Per SMTP connection/command")
    smtp_retry_attempts: int = Field(5, ge=1, le=20, description="Attempts per e-mail")
    smtp_retry_initial_seconds: float = Field(1.0, gt=0, description="First backoff delay")
    smtp_retry_max_seconds: float = Field(60.0, gt=0, description="Backoff delay cap")

    # --- privacy (docs/privacy.md) ----------------------------------------------------------
    id_hash_key: SecretStr | None = Field(
        None, description="HMAC-SHA256 key (>= 32 bytes) of the tokens identifiers leave the "
        "platform as; None: exports holding identifiers are refused"
    )
    id_hash_key_file: Path | None = Field(
        None, description="File holding id_hash_key (a mounted secret); not with id_hash_key"
    )
    dp_enabled: bool = Field(
        False, description="Allow differentially private releases (`arbstream privacy release`)"
    )
    dp_epsilon_total: float = Field(
        1.0, gt=0, le=100, description="Privacy budget: total epsilon of all DP releases "
        "(sequential composition), fixed when the first release spends from it"
    )

    # --- backtests (backtest/, docs/backtest.md) --------------------------------------------
    backtest_capital_usd: float = Field(
        10_000.0, gt=0, description="Starting capital of a backtest, USD, split across venues"
    )
    backtest_position_cap: float = Field(
        0.10, gt=0, le=1, description="Largest trade of a backtest, fraction of the capital"
    )
    backtest_decision_latency_ms: float = Field(
        840.0, ge=0, description="Signal (window end) to decision, ms; default: the stream "
        "benchmark's early-opportunity latency p50 (bench/README.md)"
    )
    backtest_order_latency_ms: float | Literal["recorded"] = Field(
        100.0, description="Decision to order arrival per venue, ms, or `recorded`: each "
        "venue's median received - exchange time in the recording"
    )
    backtest_legs: Literal["concurrent", "sequential"] = Field(
        "concurrent", description="Send both legs at once, or the sell leg after the buy fill"
    )
    backtest_bar_impact_bps: float = Field(
        1.0, ge=0, description="Impact model on bars (no recorded size): fill price moved "
        "against the taker, bps"
    )
    backtest_rebalance_below: float = Field(
        0.5, gt=0, le=1, description="Transfer to a venue whose balance of an asset falls "
        "below this fraction of its start"
    )
    backtest_output_dir: Path | None = Field(
        None, description="Where backtests export trades (default <state_dir>/backtests)"
    )

    @field_validator("exchanges")
    @classmethod
    def _exchange_ids(cls, value: list[str]) -> list[str]:
        _all_match(value, EXCHANGE_ID, "exchange ids must be lower-case identifiers")
        if not value:
            raise ValueError("at least one exchange must be configured")
        return value

    @field_validator("kafka_bootstrap")
    @classmethod
    def _bootstrap(cls, value: str) -> str:
        for hostport in value.split(","):
            host, _, port = hostport.strip().rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"kafka_bootstrap entries must be host:port, got {hostport!r}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        from arbstream.kafka import RESERVED_KEYS

        reserved = sorted(set(self.kafka_config) & RESERVED_KEYS)
        if reserved:
            raise ValueError(f"ARB_KAFKA_CONFIG must not set {reserved}: use ARB_KAFKA_BOOTSTRAP, "
                             "ARB_KAFKA_SECURITY_PROTOCOL and ARB_KAFKA_SASL_*")
        if self.kafka_min_insync_replicas and self.kafka_min_insync_replicas > \
                self.kafka_replication:
            raise ValueError("kafka_min_insync_replicas must be <= kafka_replication (a topic "
                             "with fewer replicas than it requires in sync refuses every write)")
        missing = [e for e in self.exchanges if e not in self.taker_fees]
        if missing:
            raise ValueError(f"no taker fee for exchanges {missing}; add them to ARB_FEES")
        unrouted = [e for e in self.feeds if e not in self.exchanges]
        if unrouted and "feeds" not in self.model_fields_set:  # defaults follow ARB_EXCHANGES
            self.feeds = {e: s for e, s in self.feeds.items() if e in self.exchanges}
        elif unrouted:
            raise ValueError(f"feeds for exchanges {unrouted} not in ARB_EXCHANGES (no topics)")
        from arbstream.schemas import SYMBOL_RE

        bad_symbols = [s for syms in self.feeds.values() for s in syms if not SYMBOL_RE.match(s)]
        if bad_symbols:
            raise ValueError(f"feed symbols must be canonical BASE-QUOTE, got {bad_symbols}")
        bad_fee = {e: f for e, f in self.taker_fees.items() if not 0 <= f < 0.1}
        if bad_fee:
            raise ValueError(f"fees are fractions in [0, 0.1), got {bad_fee}")
        ratio = self.max_quote_age_seconds / self.window_seconds
        if abs(ratio - round(ratio)) > 1e-9:
            raise ValueError(
                "max_quote_age_seconds must be a whole multiple of window_seconds "
                f"(got {self.max_quote_age_seconds} and {self.window_seconds})"
            )
        for name in ("influx_url", "grafana_url", "grafana_influx_url"):
            value = getattr(self, name)
            if value is not None and urlparse(value).scheme not in ("http", "https"):
                raise ValueError(f"{name} must be http(s)://host:port, got {value!r}")
        if self.ml_promotion_folds > self.ml_folds:
            raise ValueError(f"ml_promotion_folds ({self.ml_promotion_folds}) must be <= "
                             f"ml_folds ({self.ml_folds}): a version is judged on its last K "
                             "walk-forward folds")
        self._check_pairs()
        self._check_alerts()
        self._load_id_hash_key()
        return self

    def _load_id_hash_key(self) -> None:
        """``id_hash_key`` from ``id_hash_key_file`` when given (trailing newline stripped);
        either way at least 32 bytes. Errors never show the key."""
        from arbstream.privacy import key_bytes

        if self.id_hash_key_file is not None:
            if self.id_hash_key is not None:
                raise ValueError("set ARB_ID_HASH_KEY or ARB_ID_HASH_KEY_FILE, not both")
            if not self.id_hash_key_file.is_file():
                raise ValueError(f"ARB_ID_HASH_KEY_FILE={self.id_hash_key_file} is not a file")
            text = self.id_hash_key_file.read_text(encoding="utf-8").rstrip("\r\n")
            self.id_hash_key = SecretStr(text)
        if self.id_hash_key is not None:
            key_bytes(self.id_hash_key)

    def _check_pairs(self) -> None:
        """Unique pair names; every leg on a configured exchange (the default list keeps only
        those that are); the test lookback at least the rolling window."""
        names = [p.name for p in self.pairs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"pair names must be unique, repeated: {dupes}")
        if "pairs" not in self.model_fields_set:
            self.pairs = [p for p in self.pairs if set(p.exchanges) <= set(self.exchanges)]
        unknown = {p.name: e for p in self.pairs for e in p.exchanges if e not in self.exchanges}
        if unknown:
            raise ValueError(f"pairs on exchanges not in ARB_EXCHANGES: {unknown}")
        if self.pairs_test_lookback < self.pairs_window:
            raise ValueError(f"pairs_test_lookback ({self.pairs_test_lookback}) must be >= "
                             f"pairs_window ({self.pairs_window})")
        known = set(names)
        for rule in self.alert_rules:
            missing = [p for p in rule.pairs if p not in known]
            if missing:
                raise ValueError(f"alert rule {rule.name!r} watches pairs {missing} not in "
                                 f"ARB_PAIRS {sorted(known)}")

    def _check_alerts(self) -> None:
        """Cross-field checks of the alerts section (unique rule names, From, SMTP auth)."""
        from email.utils import parseaddr

        names = [r.name for r in self.alert_rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"alert rule names must be unique, repeated: {dupes}")
        if not re.match(EMAIL_RE, parseaddr(self.alert_from)[1]):
            raise ValueError(f"alert_from must be an address like 'name <a@b.org>', "
                             f"got {self.alert_from!r}")
        if (self.smtp_username is None) != (self.smtp_password is None):
            raise ValueError("set both ARB_SMTP_USERNAME and ARB_SMTP_PASSWORD, or neither")
        if self.smtp_password is not None and self.smtp_security == "none":
            raise ValueError("ARB_SMTP_SECURITY=none would send ARB_SMTP_PASSWORD in clear "
                             "text: use starttls or tls with a password (none is for a local "
                             "relay without authentication)")
        if self.smtp_retry_max_seconds < self.smtp_retry_initial_seconds:
            raise ValueError("smtp_retry_max_seconds must be >= smtp_retry_initial_seconds")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[Any, ...]:
        def dotenv_arb_only() -> dict[str, Any]:
            # A .env is often shared with docker compose: ignore its variables without the
            # ARB_ prefix, but still reject unknown ARB_ names (typos).
            from dotenv import dotenv_values

            foreign = {k.lower() for k in dotenv_values(".env") if not k.upper().startswith("ARB_")}
            return {k: v for k, v in dotenv_settings().items() if k not in foreign}

        sources: list[Any] = [init_settings, env_settings, dotenv_arb_only]
        folder = secrets_dir()
        if folder is not None:
            files = SecretsSettingsSource(settings_cls, secrets_dir=folder)

            def non_empty_files() -> dict[str, Any]:
                # an empty file is "not set", as an empty variable is (env_ignore_empty)
                return {k: v for k, v in files().items() if v not in ("", None)}

            sources.append(non_empty_files)
        path = os.environ.get("ARB_CONFIG_FILE")
        if path:
            file = Path(path)
            if not file.is_file():
                raise FileNotFoundError(f"ARB_CONFIG_FILE={path} does not exist")
            if file.suffix == ".toml":
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=file))
            elif file.suffix in (".yaml", ".yml"):
                sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=file))
            else:
                raise ValueError(f"ARB_CONFIG_FILE must end in .toml, .yaml or .yml: {path}")
        return tuple(sources)

    # --- derived ---------------------------------------------------------------------------
    @property
    def taker_fees(self) -> dict[str, float]:
        """Default fee table merged with ``fees`` overrides (fractions)."""
        return {**DEFAULT_TAKER_FEES, **self.fees}

    def kafka_client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by every client: :meth:`arbstream.kafka.KafkaConfig.
        client_config` of this configuration's Kafka slice."""
        from arbstream.kafka import KafkaConfig

        return KafkaConfig.of(self).client_config()

    @property
    def checkpoint_dir(self) -> Path:
        return self.state_dir / "checkpoints"

    @property
    def lake_root(self) -> Path:
        """``lake_dir``, or ``<state_dir>/lake`` when it is not set."""
        return self.lake_dir if self.lake_dir is not None else self.state_dir / "lake"

    @property
    def backtest_dir(self) -> Path:
        """``backtest_output_dir``, or ``<state_dir>/backtests`` when it is not set."""
        return (self.backtest_output_dir if self.backtest_output_dir is not None
                else self.state_dir / "backtests")

    @property
    def model_registry_dir(self) -> Path:
        """``models_dir``, or ``<state_dir>/models`` when it is not set."""
        return self.models_dir if self.models_dir is not None else self.state_dir / "models"


#: Where :func:`secrets_dir` looks when ``ARB_SECRETS_DIR`` is not set: compose and Docker
#: Swarm mount ``secrets:`` there.
DEFAULT_SECRETS_DIR = Path("/run/secrets")
#: ``ARB_*`` variables that are read directly, not :class:`Settings` fields.
EXTRA_ENV_VARS = ("ARB_SECRETS_DIR",)


def secrets_dir(environ: Mapping[str, str] | None = None) -> Path | None:
    """The directory of secret files: ``ARB_SECRETS_DIR``, else ``/run/secrets`` when it
    exists, else ``None``.

    Each file is named like the variable it sets (``ARB_SMTP_PASSWORD``, case-insensitive) and
    holds the bare value (a trailing newline is stripped; an empty file counts as unset, as
    an empty variable does); the environment and ``.env`` take
    precedence over it, and it over ``ARB_CONFIG_FILE``. This is pydantic-settings' secrets
    source, the convention of compose ``secrets:`` and Kubernetes secret volumes.

    Raises:
        FileNotFoundError: ``ARB_SECRETS_DIR`` names no directory.
    """
    env = os.environ if environ is None else environ
    given = env.get("ARB_SECRETS_DIR")
    if given:
        folder = Path(given)
        if not folder.is_dir():
            raise FileNotFoundError(f"ARB_SECRETS_DIR={given} is not a directory")
        return folder
    return DEFAULT_SECRETS_DIR if DEFAULT_SECRETS_DIR.is_dir() else None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Load and validate settings once per process.

    Raises:
        pydantic.ValidationError: with every invalid variable named.
    """
    return Settings()


def unknown_env_vars(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """``ARB_*`` variables of ``environ`` (default ``os.environ``) that name no setting, each
    with the closest setting's variable (``difflib``) or ``None``: a misspelt variable would
    otherwise be ignored without a word."""
    import difflib

    known = {f"ARB_{name.upper()}" for name in Settings.model_fields} | set(EXTRA_ENV_VARS)
    env = os.environ if environ is None else environ
    out = []
    for name in sorted(n for n in env if n.upper().startswith("ARB_")):
        if name.upper() not in known:
            close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=0.75)
            out.append((name, close[0] if close else None))
    return out


def expected_format(field: str) -> str | None:
    """How ``ARB_<FIELD>`` must be written when its type is a list, a mapping or a model
    (pydantic-settings parses those from JSON), with an example; ``None`` for scalars."""
    info = Settings.model_fields.get(field)
    if info is None:
        return None
    text = str(info.annotation)
    examples = {"exchanges": '["coinbase", "kraken"]', "fees": '{"binance": 0.00075}',
                "usd_quotes": '["USD", "USDT", "USDC"]',
                "feeds": '{"binance": ["BTC-USDT"]}',
                "pairs": '[{"name": "cb-kr", "y": "coinbase:BTC-USD", "x": "kraken:BTC-USD"}]',
                "alert_rules": '[{"name": "big", "recipients": ["desk@example.com"]}]'}
    if field in examples or text.startswith(("list", "dict")) or "list[" in text:
        example = examples.get(field, '["..."]' if "list" in text else '{"key": "value"}')
        return f"ARB_{field.upper()} must be JSON, e.g. ARB_{field.upper()}='{example}'"
    return None
