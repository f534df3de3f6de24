"""The one builder of librdkafka (confluent-kafka) client configurations.

:class:`KafkaConfig` is the Kafka slice of :class:`~arbstream.config.Settings`: connection,
SASL credentials and ``ARB_KAFKA_CONFIG`` (any other librdkafka setting: TLS CA and client
certificate files, ``client.id``, OAUTHBEARER...), so it is what is handed to clients, Spark
options (as ``kafka.<key>``) and executors.
:func:`reliable_producer_config` adds the settings every arbstream producer shares (the
producers, the replay, the stream's Kafka sink and the Python data source's writer).
:func:`with_logger` routes a client's own log lines to Python logging.
Key reference: https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from arbstream.config import Settings


@dataclass(frozen=True)
class KafkaConfig:
    """Where the brokers are and how to authenticate (``ARB_KAFKA_*``).

    ``sasl_password`` is kept out of ``repr`` so the object can be logged.
    """

    bootstrap: str = "127.0.0.1:9092"
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    extra: tuple[tuple[str, str], ...] = ()

    def __repr__(self) -> str:
        secret = "'**********'" if self.sasl_password else None
        extra = {k: "**********" if _secret_key(k) else v for k, v in self.extra}
        return (f"KafkaConfig(bootstrap={self.bootstrap!r}, "
                f"security_protocol={self.security_protocol!r}, "
                f"sasl_mechanism={self.sasl_mechanism!r}, "
                f"sasl_username={self.sasl_username!r}, sasl_password={secret}, "
                f"extra={extra!r})")

    @classmethod
    def of(cls, settings: Settings) -> KafkaConfig:
        """The Kafka slice of ``settings``."""
        password = settings.kafka_sasl_password
        return cls(
            bootstrap=settings.kafka_bootstrap,
            security_protocol=settings.kafka_security_protocol,
            sasl_mechanism=settings.kafka_sasl_mechanism,
            sasl_username=settings.kafka_sasl_username,
            sasl_password=password.get_secret_value() if password else None,
            extra=tuple(sorted((k, v.get_secret_value()) for k, v in
                               settings.kafka_config.items())),
        )

    def client_config(self) -> dict[str, Any]:
        """librdkafka settings shared by every producer, consumer and admin client."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,  # comma-separated host:port list
            "security.protocol": self.security_protocol,  # PLAINTEXT, SSL, SASL_SSL, ...
        }
        if self.sasl_mechanism:
            conf["sasl.mechanism"] = self.sasl_mechanism  # e.g. PLAIN, SCRAM-SHA-512
            conf["sasl.username"] = self.sasl_username or ""
            conf["sasl.password"] = self.sasl_password or ""
        conf.update(self.extra)  # ARB_KAFKA_CONFIG: TLS files, client.id, OAUTHBEARER...
        return conf


#: Keys of ``ARB_KAFKA_CONFIG`` set by their own settings (refused there).
RESERVED_KEYS = frozenset({"bootstrap.servers", "security.protocol", "sasl.mechanism",
                           "sasl.mechanisms", "sasl.username", "sasl.password"})


def _secret_key(key: str) -> bool:
    """Whether a librdkafka key holds a secret (passwords, secrets, private keys)."""
    return any(w in key for w in ("password", "secret", "key.pem", "private"))


#: The Python logger librdkafka's log lines go to (:func:`with_logger`).
LIBRDKAFKA_LOGGER = "arbstream.librdkafka"


class RepeatFilter(logging.Filter):
    """Lets a log line through once per ``every_s`` seconds per message shape (the message
    with its digits removed: ports, counts and timings vary), and tells how many were held
    back: an unreachable broker makes librdkafka report every reconnection attempt."""

    def __init__(self, every_s: float = 60.0) -> None:
        super().__init__()
        self.every_s = every_s
        self.seen: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        shape = re.sub(r"\d+", "#", record.getMessage())
        now = time.monotonic()
        last, held = self.seen.get(shape, (float("-inf"), 0))
        if now - last < self.every_s:
            self.seen[shape] = (last, held + 1)
            return False
        if held:
            record.msg = f"{record.msg} ({held} similar lines in the last {self.every_s:g} s)"
        self.seen[shape] = (now, 0)
        return True


def librdkafka_logger() -> logging.Logger:
    """``arbstream.librdkafka``: WARNING and above unless its level is set otherwise
    (``logging.getLogger("arbstream.librdkafka").setLevel(logging.DEBUG)`` shows librdkafka's
    debug lines when its ``debug`` setting is given), repeated lines held back by
    :class:`RepeatFilter`."""
    logger = logging.getLogger(LIBRDKAFKA_LOGGER)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.WARNING)
    if not any(isinstance(f, RepeatFilter) for f in logger.filters):
        logger.addFilter(RepeatFilter())
    return logger


def with_logger(conf: dict[str, Any]) -> dict[str, Any]:
    """``conf`` with librdkafka's log lines (syslog levels) delivered to
    :func:`librdkafka_logger` instead of printed to stderr by librdkafka. For Python clients
    only: not a ``kafka.*`` Spark option. Lines are delivered when the client is polled."""
    return {**conf, "logger": librdkafka_logger()}


def reliable_producer_config(client: dict[str, Any], *, linger_ms: int = 20,
                             **extra: Any) -> dict[str, Any]:
    """``client`` (:meth:`KafkaConfig.client_config`) plus the settings of every arbstream
    producer: no record lost, duplicated or reordered by the client's own retries, and
    librdkafka's log lines in Python logging (:func:`with_logger`).

    Args:
        client: connection settings.
        linger_ms: how long a record may wait to fill a batch (ms); lower for latency.
        extra: further librdkafka keys, as Python names are not allowed to contain dots:
            pass them in a ``**{"key.name": value}`` mapping.
    """
    return {
        **with_logger(client),  # librdkafka's log lines through Python logging
        "enable.idempotence": True,  # no duplicates or reordering on internal retries
        "acks": "all",  # a record counts as delivered once every in-sync replica has it
        "compression.type": "lz4",  # cheap CPU, ~3x smaller JSON on the wire
        "linger.ms": linger_ms,  # wait this long (ms) to batch records
        **extra,
    }
