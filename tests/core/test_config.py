"""Settings: defaults, validation, sources (env, .env, TOML/YAML file), secrets, .env.example.

Pure and fast: no services. Every test runs in an empty temporary working directory with no
``ARB_*`` variable in the environment, so a developer's ``.env`` or shell cannot leak in.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from arbstream.config import EXTRA_ENV_VARS, Settings, get_settings, secrets_dir
from arbstream.fees import DEFAULT_TAKER_FEES

REPO = Path(__file__).resolve().parents[2]
ENV_EXAMPLE = REPO / ".env.example"
#: ``ARB_NAME=value`` or ``# ARB_NAME=value`` (a documented but unset variable).
VAR_LINE = re.compile(r"^(?P<comment>#\s*)?(?P<name>ARB_[A-Z0-9_]+)=(?P<value>.*)$")
SECRETS = ("ARB_KAFKA_SASL_PASSWORD", "ARB_INFLUX_TOKEN", "ARB_INFLUX_PASSWORD",
           "ARB_SMTP_PASSWORD", "ARB_GRAFANA_TOKEN", "ARB_GRAFANA_PASSWORD")


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Empty cwd (no stray ``.env``), no ``ARB_*`` variables, fresh ``get_settings`` cache."""
    for name in list(os.environ):
        if name.startswith("ARB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def env_names() -> set[str]:
    """Every variable arbstream reads: the Settings fields and ``ARB_SECRETS_DIR``."""
    return {f"ARB_{name.upper()}" for name in Settings.model_fields} | set(EXTRA_ENV_VARS)


# --- defaults and fees --------------------------------------------------------------------
def test_defaults_load() -> None:
    s = Settings()
    assert s.state_dir == Path(".state")
    assert s.checkpoint_dir == Path(".state") / "checkpoints"
    assert s.data_dir == Path("../shared/data")
    assert s.config_file is None
    assert s.exchanges == list(DEFAULT_TAKER_FEES)
    assert s.fees == {}
    assert s.kafka_bootstrap == "127.0.0.1:9092"
    assert s.influx_api == "v1"
    assert s.mongo_uri.get_secret_value() == "mongodb://127.0.0.1:27017"
    assert (s.window_seconds, s.max_quote_age_seconds, s.watermark_seconds) == (1.0, 5.0, 10.0)
    assert s.min_net == 0.0
    assert get_settings() is get_settings()


def test_fee_table() -> None:
    expected = {
        "coinbase": 0.006,
        "kraken": 0.0026,
        "binance": 0.001,
        "bitstamp": 0.004,
        "bitfinex": 0.002,
        "gemini": 0.004,
        "binanceusdm": 0.0005,
    }
    assert dict(DEFAULT_TAKER_FEES) == expected
    assert Settings().taker_fees == expected


def test_fee_override_merges_over_table() -> None:
    s = Settings(fees={"binance": 0.00075})
    assert s.taker_fees["binance"] == 0.00075
    assert s.taker_fees["coinbase"] == 0.006
    assert len(s.taker_fees) == len(DEFAULT_TAKER_FEES)
    # A new exchange is accepted once it has a fee.
    s = Settings(exchanges=["coinbase", "okx"], fees={"okx": 0.001})
    assert s.taker_fees["okx"] == 0.001


def test_exchange_without_fee_rejected() -> None:
    with pytest.raises(ValidationError, match=r"no taker fee for exchanges \['okx'\].*ARB_FEES"):
        Settings(exchanges=["coinbase", "okx"])


@pytest.mark.parametrize("fee", [0.1, 0.5, -0.001])
def test_fee_out_of_range_rejected(fee: float) -> None:
    with pytest.raises(ValidationError, match=r"fees are fractions in \[0, 0\.1\)"):
        Settings(fees={"binance": fee})


def test_max_quote_age_must_be_multiple_of_window() -> None:
    with pytest.raises(ValidationError, match="whole multiple of window_seconds"):
        Settings(max_quote_age_seconds=2.5, window_seconds=1.0)
    assert Settings(max_quote_age_seconds=3.0, window_seconds=0.5).max_quote_age_seconds == 3.0
    # Float rounding (0.3 / 0.1 = 2.9999999999999996) is tolerated.
    assert Settings(max_quote_age_seconds=0.3, window_seconds=0.1).window_seconds == 0.1


@pytest.mark.parametrize("bootstrap", ["localhost", "host:abc", ":9092", "a:1,b"])
def test_bad_kafka_bootstrap_rejected(bootstrap: str) -> None:
    with pytest.raises(ValidationError, match="kafka_bootstrap entries must be host:port"):
        Settings(kafka_bootstrap=bootstrap)


def test_kafka_bootstrap_list_accepted() -> None:
    assert Settings(kafka_bootstrap="b1:9092, b2:9093").kafka_bootstrap == "b1:9092, b2:9093"


@pytest.mark.parametrize("exchange", ["Coinbase", "coin-base", "1inch", ""])
def test_bad_exchange_id_rejected(exchange: str) -> None:
    with pytest.raises(ValidationError, match="exchange ids must be lower-case identifiers"):
        Settings(exchanges=[exchange], fees={exchange: 0.001})


def test_no_exchange_rejected() -> None:
    with pytest.raises(ValidationError, match="at least one exchange"):
        Settings(exchanges=[])


def test_bad_influx_url_rejected() -> None:
    with pytest.raises(ValidationError, match="influx_url must be http"):
        Settings(influx_url="influxdb:8086")


def test_unknown_setting_rejected() -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings(kafka_bootstrapp="127.0.0.1:9092")


# --- environment ------------------------------------------------------------------------
def test_env_vars_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARB_EXCHANGES", '["coinbase","kraken"]')
    monkeypatch.setenv("ARB_FEES", '{"binance":0.00075}')
    monkeypatch.setenv("ARB_KAFKA_BOOTSTRAP", "kafka:9092")
    monkeypatch.setenv("ARB_KAFKA_PARTITIONS", "6")
    monkeypatch.setenv("ARB_FAIL_ON_DATA_LOSS", "false")
    monkeypatch.setenv("ARB_TRIGGER_SECONDS", "0.75")
    monkeypatch.setenv("ARB_STATE_DIR", "/state")
    monkeypatch.setenv("ARB_INFLUX_API", "v2")
    monkeypatch.setenv("ARB_MIN_NET", "-0.001")
    s = Settings()
    assert s.exchanges == ["coinbase", "kraken"]
    assert s.taker_fees["binance"] == 0.00075
    assert s.kafka_bootstrap == "kafka:9092"
    assert s.kafka_partitions == 6
    assert s.fail_on_data_loss is False
    assert s.trigger_seconds == 0.75
    assert s.checkpoint_dir == Path("/state/checkpoints")
    assert s.influx_api == "v2"
    assert s.min_net == -0.001


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        ("ARB_KAFKA_PARTITIONS", "0", "kafka_partitions"),
        ("ARB_INFLUX_API", "v3", "influx_api"),
        ("ARB_STARTING_OFFSETS", "newest", "starting_offsets"),
        ("ARB_EXCHANGES", "coinbase,kraken", "exchanges"),
    ],
)
def test_bad_env_value_names_the_field(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises((ValidationError, ValueError), match=field):
        Settings()


def test_dotenv_in_cwd_read_and_env_wins(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    (isolated / ".env").write_text("ARB_KAFKA_PARTITIONS=5\nARB_MONGO_DB=fromdotenv\n")
    assert Settings().kafka_partitions == 5
    monkeypatch.setenv("ARB_KAFKA_PARTITIONS", "7")
    s = Settings()
    assert (s.kafka_partitions, s.mongo_db) == (7, "fromdotenv")


def test_dotenv_unknown_key_rejected(isolated: Path) -> None:
    (isolated / ".env").write_text("ARB_KAFKA_PARTITONS=5\n")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        Settings()


def test_dotenv_variables_without_prefix_are_ignored(isolated: Path) -> None:
    (isolated / ".env").write_text("COMPOSE_PROJECT_NAME=arb\nARB_MIN_NET=0.001\n")
    assert Settings().min_net == 0.001


# --- config file -------------------------------------------------------------------------
TOML = """\
exchanges = ["coinbase", "kraken", "okx"]
kafka_partitions = 6
window_seconds = 2.0
max_quote_age_seconds = 6.0

[fees]
okx = 0.001
kraken = 0.002
"""

YAML = """\
exchanges: [coinbase, kraken, okx]
kafka_partitions: 6
window_seconds: 2.0
max_quote_age_seconds: 6.0
fees:
  okx: 0.001
  kraken: 0.002
"""


@pytest.mark.parametrize(("suffix", "text"), [(".toml", TOML), (".yaml", YAML), (".yml", YAML)])
def test_config_file(
    monkeypatch: pytest.MonkeyPatch, isolated: Path, suffix: str, text: str
) -> None:
    path = isolated / f"arbstream{suffix}"
    path.write_text(text)
    monkeypatch.setenv("ARB_CONFIG_FILE", str(path))
    s = Settings()
    assert s.config_file == path
    assert s.exchanges == ["coinbase", "kraken", "okx"]
    assert s.kafka_partitions == 6
    assert (s.window_seconds, s.max_quote_age_seconds) == (2.0, 6.0)
    assert s.taker_fees["okx"] == 0.001
    assert s.taker_fees["kraken"] == 0.002
    assert s.taker_fees["coinbase"] == 0.006


def test_env_and_dotenv_override_config_file(
    monkeypatch: pytest.MonkeyPatch, isolated: Path
) -> None:
    path = isolated / "arbstream.toml"
    path.write_text('kafka_partitions = 6\nmongo_db = "fromfile"\ninflux_db = "fromfile"\n')
    (isolated / ".env").write_text("ARB_INFLUX_DB=fromdotenv\n")
    monkeypatch.setenv("ARB_CONFIG_FILE", str(path))
    monkeypatch.setenv("ARB_KAFKA_PARTITIONS", "9")
    s = Settings()
    assert s.kafka_partitions == 9
    assert s.influx_db == "fromdotenv"
    assert s.mongo_db == "fromfile"


def test_config_file_validated(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    path = isolated / "arbstream.yaml"
    path.write_text("exchanges: [coinbase, okx]\n")
    monkeypatch.setenv("ARB_CONFIG_FILE", str(path))
    with pytest.raises(ValidationError, match="no taker fee for exchanges"):
        Settings()


@pytest.mark.parametrize(
    ("name", "text"),
    [("arbstream.toml", "kafka_partitons = 6\n"), ("arbstream.yaml", "kafka_partitons: 6\n")],
)
def test_config_file_unknown_key_rejected(
    monkeypatch: pytest.MonkeyPatch, isolated: Path, name: str, text: str
) -> None:
    path = isolated / name
    path.write_text(text)
    monkeypatch.setenv("ARB_CONFIG_FILE", str(path))
    with pytest.raises(ValidationError, match=r"kafka_partitons\s+Extra inputs are not permitted"):
        Settings()


def test_config_file_missing(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    monkeypatch.setenv("ARB_CONFIG_FILE", str(isolated / "nope.toml"))
    with pytest.raises(FileNotFoundError, match=r"ARB_CONFIG_FILE=.*nope\.toml does not exist"):
        Settings()


def test_config_file_bad_suffix(monkeypatch: pytest.MonkeyPatch, isolated: Path) -> None:
    path = isolated / "arbstream.json"
    path.write_text("{}")
    monkeypatch.setenv("ARB_CONFIG_FILE", str(path))
    with pytest.raises(ValueError, match=r"must end in \.toml, \.yaml or \.yml"):
        Settings()


# --- secrets and Kafka client configuration ------------------------------------------------
def test_secrets_hidden() -> None:
    s = Settings(
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="alice",
        kafka_sasl_password="kafka-pw-123",
        influx_token="influx-token-456",
        influx_username="bob",
        influx_password="influx-pw-789",
        mongo_uri="mongodb://carol:mongo-pw-000@db.example:27017",
    )
    for secret in ("kafka-pw-123", "influx-token-456", "influx-pw-789", "mongo-pw-000"):
        assert secret not in repr(s)
        assert secret not in str(s)
        assert secret not in s.model_dump_json()
    assert isinstance(s.influx_token, SecretStr)
    assert s.influx_token.get_secret_value() == "influx-token-456"
    assert s.mongo_uri.get_secret_value().endswith("@db.example:27017")


def test_kafka_client_config_plaintext() -> None:
    assert Settings(kafka_bootstrap="b1:9092,b2:9092").kafka_client_config() == {
        "bootstrap.servers": "b1:9092,b2:9092",
        "security.protocol": "PLAINTEXT",
    }


def test_kafka_client_config_sasl_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARB_KAFKA_BOOTSTRAP", "broker.example:9093")
    monkeypatch.setenv("ARB_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("ARB_KAFKA_SASL_MECHANISM", "SCRAM-SHA-512")
    monkeypatch.setenv("ARB_KAFKA_SASL_USERNAME", "arb")
    monkeypatch.setenv("ARB_KAFKA_SASL_PASSWORD", "s3cret")
    s = Settings()
    assert "s3cret" not in repr(s)
    assert s.kafka_client_config() == {
        "bootstrap.servers": "broker.example:9093",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "arb",
        "sasl.password": "s3cret",
    }


def test_spark_kafka_options_sasl() -> None:
    """The JVM connector gets the same credentials as a JAAS line; arbkafka gets librdkafka's."""
    arbitrage = pytest.importorskip("spark_jobs.arbitrage")
    sasl = dict(
        kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="PLAIN",
        kafka_sasl_username="arb",
        kafka_sasl_password="s3cret",
    )
    builtin = arbitrage.kafka_options(Settings(spark_kafka_source="builtin", **sasl))
    assert builtin["kafka.sasl.jaas.config"] == (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        'username="arb" password="s3cret";'
    )
    assert "kafka.sasl.password" not in builtin
    python = arbitrage.kafka_options(Settings(spark_kafka_source="python", **sasl))
    assert python["kafka.sasl.password"] == "s3cret"
    assert python["kafka.security.protocol"] == "SASL_SSL"


# --- .env.example ------------------------------------------------------------------------
def example_lines() -> list[str]:
    return ENV_EXAMPLE.read_text().splitlines()


def example_vars() -> dict[str, list[tuple[bool, str]]]:
    """Every variable line of ``.env.example``: name -> [(active, value)]."""
    found: dict[str, list[tuple[bool, str]]] = {}
    for line in example_lines():
        m = VAR_LINE.match(line)
        if m:
            found.setdefault(m["name"], []).append((m["comment"] is None, m["value"]))
    return found


def active_values() -> dict[str, str]:
    """Uncommented, non-empty assignments, shell-unquoted."""
    out = {}
    for name, entries in example_vars().items():
        for active, value in entries:
            if active and value:
                (out[name],) = shlex.split(value)
    return out


def test_env_example_covers_exactly_the_settings() -> None:
    documented = set(example_vars())
    assert env_names() - documented == set(), "Settings fields missing from .env.example"
    assert documented - env_names() == set(), "stale variables in .env.example"


def test_env_example_each_variable_once_and_commented() -> None:
    lines = example_lines()
    defined: list[str] = []
    for i, line in enumerate(lines):
        m = VAR_LINE.match(line)
        if not m or line.startswith("#  "):  # indented header examples are not definitions
            continue
        defined.append(m["name"])
        above = lines[i - 1]
        assert above.startswith("#") and not VAR_LINE.match(above), (
            f"{m['name']} has no description comment above it"
        )
    assert sorted(defined) == sorted(env_names()), "each variable is defined exactly once"


def test_env_example_secrets_unset() -> None:
    found = example_vars()
    for name in SECRETS:
        assert all(not active and not value for active, value in found[name]), name


def test_env_example_unset_variables_default_to_none() -> None:
    """Commented-out variables are exactly the settings without a default value."""
    active = set(active_values())
    for name in env_names() - active - set(EXTRA_ENV_VARS):
        field = name.removeprefix("ARB_").lower()
        assert Settings.model_fields[field].default is None, f"{name} should be set"


def test_env_example_loads_as_dotenv_with_the_defaults(tmp_path: Path) -> None:
    dotenv = tmp_path / "example.env"
    dotenv.write_bytes(ENV_EXAMPLE.read_bytes())
    loaded = Settings(_env_file=dotenv)
    assert loaded == Settings(), ".env.example values differ from the Settings defaults"


def test_env_example_loads_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    defaults = Settings()
    values = active_values()
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    loaded = Settings()
    assert loaded == defaults
    for name in values:
        assert name.removeprefix("ARB_").lower() in loaded.model_fields_set


def test_env_example_documents_syntax() -> None:
    text = ENV_EXAMPLE.read_text()
    assert """ARB_EXCHANGES='["coinbase","kraken"]'""" in text
    assert """ARB_FEES='{"binance":0.00075}'""" in text
    assert "ARB_CONFIG_FILE" in text and "YAML" in text and "TOML" in text


# --- live feeds ------------------------------------------------------------------------------
def test_default_feeds_follow_the_configured_exchanges(isolated: Path) -> None:
    conf = Settings(exchanges=["coinbase", "kraken"])
    assert set(conf.feeds) == {"coinbase", "kraken"}
    assert conf.feed_channels == ["bbo", "trades"] and conf.book_depth == 10


def test_explicit_feed_for_an_unrouted_exchange_is_rejected(isolated: Path) -> None:
    with pytest.raises(ValidationError, match=r"feeds for exchanges \['okx'\] not in ARB_EXCH"):
        Settings(feeds={"okx": ["BTC-USDT"]})
    conf = Settings(exchanges=["okx", "binance"], fees={"okx": 0.001},
                    feeds={"okx": ["BTC-USDT"]})
    assert conf.feeds == {"okx": ["BTC-USDT"]}


def test_feed_symbols_must_be_canonical(isolated: Path) -> None:
    with pytest.raises(ValidationError, match="canonical BASE-QUOTE"):
        Settings(feeds={"kraken": ["XBT/USD"]})


def test_feed_settings_from_the_environment(isolated: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ARB_FEEDS", '{"binance": ["BTC-USDT", "ETH-USDT"]}')
    monkeypatch.setenv("ARB_FEED_CHANNELS", '["bbo", "book"]')
    monkeypatch.setenv("ARB_FEED_OPTIONS", '{"bitstamp": {"snapshot_delay": 1}}')
    conf = Settings()
    assert conf.feeds == {"binance": ["BTC-USDT", "ETH-USDT"]}
    assert conf.feed_channels == ["bbo", "book"]
    assert conf.feed_options == {"bitstamp": {"snapshot_delay": 1}}
    monkeypatch.setenv("ARB_FEED_CHANNELS", '["quotes"]')
    with pytest.raises(ValidationError, match="feed_channels"):
        Settings()


def test_empty_variable_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ARB_X=`` (what compose's ``${ARB_X:-}`` gives when the shell has no value) is unset:
    the default applies, and an optional credential stays None."""
    monkeypatch.setenv("ARB_SMTP_USERNAME", "")
    monkeypatch.setenv("ARB_SMTP_PASSWORD", "")
    monkeypatch.setenv("ARB_WINDOW_SECONDS", "")
    s = Settings()
    assert s.smtp_username is None and s.smtp_password is None and s.window_seconds == 1.0


def test_promotion_folds_cannot_exceed_the_folds() -> None:
    assert Settings(ml_folds=3, ml_promotion_folds=3).ml_promotion_folds == 3
    with pytest.raises(ValidationError, match=r"ml_promotion_folds \(4\) must be <= ml_folds"):
        Settings(ml_folds=3, ml_promotion_folds=4)


def test_misspelt_variables_are_named_with_the_closest_setting(monkeypatch, tmp_path) -> None:
    """An ``ARB_*`` variable that names no setting is reported (with the likely intended one)
    instead of being silently ignored."""
    from typer.testing import CliRunner

    from arbstream.config import get_settings, unknown_env_vars
    from arbstream.shell.cli import app

    assert unknown_env_vars({"ARB_EXCHANGE": "x", "ARB_MIN_NET": "0", "ARB_ZZZ": "1"}) == [
        ("ARB_EXCHANGE", "ARB_EXCHANGES"), ("ARB_ZZZ", None)]
    monkeypatch.setenv("ARB_EXCHANGE", '["coinbase"]')
    monkeypatch.setenv("ARB_STATE_DIR", str(tmp_path))
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["lake", "compact", "--dry-run"])
    get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())  # rich wraps at the terminal width
    assert "ARB_EXCHANGE is not an arbstream setting" in out
    assert "did you mean ARB_EXCHANGES?" in out


@pytest.mark.parametrize(("name", "value", "hint"), [
    ("ARB_EXCHANGES", "coinbase", """ARB_EXCHANGES='["coinbase", "kraken"]'"""),
    ("ARB_FEES", "0.1", """ARB_FEES='{"binance": 0.00075}'"""),
])
def test_config_errors_name_the_expected_format(monkeypatch, name, value, hint) -> None:
    from typer.testing import CliRunner

    from arbstream.config import get_settings
    from arbstream.shell.cli import app

    monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["lake", "compact", "--dry-run"])
    get_settings.cache_clear()
    assert result.exit_code == 2
    assert "must be JSON" in result.output and hint in result.output.replace("\n", "")


def test_password_over_plain_smtp_is_refused_without_showing_it() -> None:
    secret = "abcd efgh ijkl mnop"
    with pytest.raises(ValidationError, match="clear text") as info:
        Settings(smtp_security="none", smtp_username="desk", smtp_password=secret)
    assert secret not in str(info.value)
    assert Settings(smtp_security="starttls", smtp_username="desk",
                    smtp_password=secret).smtp_password.get_secret_value() == secret


def test_jaas_line_survives_quotes_and_backslashes(spark) -> None:
    """A password with a quote, a backslash and a semicolon, read back with the JVM's
    ``java.io.StreamTokenizer`` configured as Kafka's ``JaasConfig`` configures it, is the
    password: it cannot end the value early or add options."""
    from spark_jobs import arbitrage

    password = 'p"a\\ss; evil="1'
    line = arbitrage.kafka_options(Settings(
        spark_kafka_source="builtin", kafka_security_protocol="SASL_SSL",
        kafka_sasl_mechanism="PLAIN", kafka_sasl_username="arb",
        kafka_sasl_password=password))["kafka.sasl.jaas.config"]
    jvm = spark.sparkContext._jvm
    tok = jvm.java.io.StreamTokenizer(jvm.java.io.StringReader(line))
    tok.slashSlashComments(True)
    tok.slashStarComments(True)
    for c in "-_$":
        tok.wordChars(ord(c), ord(c))
    from py4j.java_gateway import get_field

    tokens = []
    while tok.nextToken() != -1:  # StreamTokenizer.TT_EOF
        sval = get_field(tok, "sval")
        tokens.append(sval if sval is not None else chr(get_field(tok, "ttype")))
        assert len(tokens) < 20
    assert tokens == ["org.apache.kafka.common.security.plain.PlainLoginModule", "required",
                      "username", "=", "arb", "password", "=", password, ";"]


def test_unreachable_broker_is_one_error_not_hundreds_of_log_lines(capfd) -> None:
    """librdkafka logs every reconnection to an unreachable broker on stderr; the admin
    calls behind `arbstream topics` and `up` keep those off and raise one error instead."""
    from arbstream.topics import partition_counts

    with pytest.raises(RuntimeError, match="127.0.0.1:1 unreachable.*Broker transport failure"):
        partition_counts(Settings(kafka_bootstrap="127.0.0.1:1"), timeout=3.0)
    captured = capfd.readouterr()
    assert "FAIL" not in captured.err and len(captured.err.splitlines()) == 0


def test_stream_with_the_broker_down_is_one_error_naming_it(monkeypatch) -> None:
    from typer.testing import CliRunner

    from arbstream.config import get_settings
    from arbstream.shell.cli import app

    monkeypatch.setenv("ARB_KAFKA_BOOTSTRAP", "127.0.0.1:1")
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["stream"])
    get_settings.cache_clear()
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "Kafka is not available" in out and "arbstream up" in out
    assert "Traceback" not in out


#: A distinct value for every secret setting (the MongoDB URI carries a password).
SECRET_VALUES = {
    "ARB_KAFKA_SASL_PASSWORD": "kafka-Secret-1f2e", "ARB_INFLUX_TOKEN": "influx-Token-8c7d",
    "ARB_INFLUX_PASSWORD": "influx-Pass-3b4a",
    "ARB_MONGO_URI": "mongodb://desk:mongo-Pass-9e0f@127.0.0.1:1/?serverSelectionTimeoutMS=500",
    "ARB_GRAFANA_TOKEN": "grafana-Token-5a6b", "ARB_GRAFANA_PASSWORD": "grafana-Pass-7c8d",
    "ARB_SMTP_PASSWORD": "smtp-Pass-1a2b", "ARB_ID_HASH_KEY": "hash-Key-0123456789abcdef012345",
}


def _commands(group: object, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path of the CLI (Click's view of the Typer app)."""
    out = [path]
    for name, cmd in (getattr(group, "commands", None) or {}).items():
        out.extend(_commands(cmd, (*path, name)))
    return out


def test_no_secret_in_help_errors_or_logs(monkeypatch, caplog) -> None:
    """With every secret set: no ``--help`` page, configuration error or failing command
    shows any of them (or the MongoDB URI's password)."""
    import typer.main
    from typer.testing import CliRunner

    from arbstream.config import get_settings
    from arbstream.shell.cli import app

    for name, value in SECRET_VALUES.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ARB_SMTP_USERNAME", "desk")
    monkeypatch.setenv("ARB_INFLUX_USERNAME", "desk")
    monkeypatch.setenv("ARB_GRAFANA_USERNAME", "desk")
    monkeypatch.setenv("ARB_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("ARB_KAFKA_SASL_USERNAME", "desk")
    runner = CliRunner()
    outputs = []
    paths = _commands(typer.main.get_command(app))
    assert len(paths) > 30
    for path in paths:
        outputs.append(runner.invoke(app, [*path, "--help"]).output)
    get_settings.cache_clear()
    # a configuration error (bad value next to the secrets) and commands whose service is down
    monkeypatch.setenv("ARB_ALERT_FROM", "not-an-address")
    outputs.append(runner.invoke(app, ["alerts", "rules"]).output)
    monkeypatch.delenv("ARB_ALERT_FROM")
    monkeypatch.setenv("ARB_SMTP_SECURITY", "none")
    get_settings.cache_clear()
    outputs.append(runner.invoke(app, ["lake", "compact", "--dry-run"]).output)
    monkeypatch.setenv("ARB_SMTP_SECURITY", "starttls")
    for args in (["opportunities", "list"], ["backtest", "show"], ["privacy", "budget"]):
        get_settings.cache_clear()
        outputs.append(runner.invoke(app, args).output)
    get_settings.cache_clear()
    text = "\n".join(outputs) + "\n".join(r.getMessage() for r in caplog.records)
    assert "invalid configuration" in text and "clear text" in " ".join(text.split())
    for value in [*SECRET_VALUES.values(), "mongo-Pass-9e0f"]:
        assert value not in text, value


def test_kafka_config_passes_through_to_clients_and_spark() -> None:
    """ARB_KAFKA_CONFIG reaches every librdkafka client and Spark's kafka.* options; secret
    values stay out of repr; keys owned by other settings are refused."""
    from arbstream.kafka import KafkaConfig
    from spark_jobs import arbitrage

    extra = {"client.id": "desk-7", "ssl.ca.location": "/etc/ssl/ca.pem",
             "ssl.key.password": "key-Pass-42"}
    s = Settings(kafka_security_protocol="SSL", kafka_config=extra)
    conf = s.kafka_client_config()
    assert {k: conf[k] for k in extra} == extra and conf["security.protocol"] == "SSL"
    spark = arbitrage.kafka_options(s.model_copy(update={"spark_kafka_source": "builtin"}))
    assert spark["kafka.client.id"] == "desk-7"
    assert spark["kafka.ssl.ca.location"] == "/etc/ssl/ca.pem"
    assert "key-Pass-42" not in repr(KafkaConfig.of(s)) and "desk-7" in repr(KafkaConfig.of(s))
    with pytest.raises(ValidationError, match="must not set"):
        Settings(kafka_config={"bootstrap.servers": "elsewhere:9092"})
    with pytest.raises(ValidationError, match="min_insync_replicas must be <="):
        Settings(kafka_replication=1, kafka_min_insync_replicas=2)


def test_topics_are_created_with_min_insync_replicas(settings) -> None:
    """The real broker accepts topics created with min.insync.replicas."""
    import uuid

    from arbstream.topics import ensure_topic, new_topic, partition_counts

    conf = settings.model_copy(update={"kafka_min_insync_replicas": 1})
    assert new_topic(conf, "x", 2).config == {"min.insync.replicas": "1"}
    name = f"isr.{uuid.uuid4().hex[:8]}"
    assert ensure_topic(conf, name, partitions=2)
    assert partition_counts(conf)[name] == 2


# --- secret files (ARB_SECRETS_DIR, compose secrets:) ----------------------------------------
def test_secret_files_set_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    folder.mkdir()
    (folder / "ARB_SMTP_USERNAME").write_text("desk@example.com\n")
    (folder / "arb_smtp_password").write_text("abcd efgh ijkl mnop\n")  # any case
    monkeypatch.setenv("ARB_SECRETS_DIR", str(folder))
    settings = Settings()
    assert settings.smtp_username == "desk@example.com"
    assert settings.smtp_password.get_secret_value() == "abcd efgh ijkl mnop"
    assert "abcd" not in repr(settings)
    monkeypatch.setenv("ARB_SMTP_PASSWORD", "from-the-environment")  # the environment wins
    assert Settings().smtp_password.get_secret_value() == "from-the-environment"


def test_empty_secret_file_is_unset(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "ARB_SMTP_PASSWORD").write_text("")
    monkeypatch.setenv("ARB_SECRETS_DIR", str(tmp_path))
    assert Settings().smtp_password is None


def test_secret_file_value_never_in_errors(monkeypatch: pytest.MonkeyPatch,
                                           tmp_path: Path) -> None:
    (tmp_path / "ARB_SMTP_PASSWORD").write_text("abcd efgh ijkl mnop")
    monkeypatch.setenv("ARB_SECRETS_DIR", str(tmp_path))
    with pytest.raises(ValidationError) as caught:  # a password without a username
        Settings()
    assert "abcd" not in str(caught.value)


def test_secrets_dir_must_exist(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert secrets_dir({"ARB_SECRETS_DIR": str(tmp_path)}) == tmp_path
    with pytest.raises(FileNotFoundError, match="ARB_SECRETS_DIR"):
        secrets_dir({"ARB_SECRETS_DIR": str(tmp_path / "missing")})
    from arbstream.config import unknown_env_vars

    assert unknown_env_vars({"ARB_SECRETS_DIR": str(tmp_path)}) == []
