"""The narrow configurations of the store: what MongoDB and InfluxDB need, nothing else.

Built from :class:`~arbstream.config.Settings` with ``.of(settings)`` on the driver (as
:class:`arbstream.kafka.KafkaConfig` is), they are small, frozen, picklable and hashable, so
they are what Spark executor closures carry. Secrets are :class:`~pydantic.SecretStr`: a
config can be logged or printed (``repr`` shows ``'**********'``); read a secret with
``.get_secret_value()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from pydantic import SecretStr

if TYPE_CHECKING:
    from arbstream.config import Settings

#: Seconds in a day, for TTLs given in days.
DAY_S = 86_400


@dataclass(frozen=True)
class MongoConfig:
    """Where the MongoDB documents are (``ARB_MONGO_*``).

    ``uri`` (a secret: it may hold credentials) is the connection string, ``db`` the
    database, ``ttl_days`` how long ``opportunities`` and ``features`` documents are kept
    after they were first written (days, > 0).
    """

    uri: SecretStr
    db: str
    ttl_days: float

    @classmethod
    def of(cls, settings: Settings) -> MongoConfig:
        """The MongoDB slice of ``settings`` (``mongo_uri``, ``mongo_db``,
        ``mongo_ttl_days``)."""
        return cls(uri=settings.mongo_uri, db=settings.mongo_db,
                   ttl_days=settings.mongo_ttl_days)

    @property
    def ttl_seconds(self) -> int:
        """``ttl_days`` as whole seconds (at least 1): ``expireAfterSeconds`` of the TTL
        indexes."""
        return max(1, round(self.ttl_days * DAY_S))


@dataclass(frozen=True)
class InfluxConfig:
    """Where the InfluxDB points are and how to authenticate (``ARB_INFLUX_*``).

    ``api`` "v1" (InfluxDB 1.x ``/write`` and ``/query``) or "v2"; ``url`` the base URL;
    ``db`` the v1 database or v2 bucket; ``org`` and ``token`` (secret) for v2; ``username``
    and ``password`` (secret) for v1 basic auth; ``raw_retention`` and ``features_retention``
    the v1 retention policy durations (InfluxQL, e.g. ``30d`` or ``INF``).
    """

    url: str
    api: Literal["v1", "v2"]
    db: str
    org: str
    token: SecretStr | None
    username: str | None
    password: SecretStr | None
    raw_retention: str
    features_retention: str

    @classmethod
    def of(cls, settings: Settings) -> InfluxConfig:
        """The InfluxDB slice of ``settings`` (every ``influx_*`` key but Grafana's)."""
        return cls(
            url=settings.influx_url,
            api=settings.influx_api,
            db=settings.influx_db,
            org=settings.influx_org,
            token=settings.influx_token,
            username=settings.influx_username,
            password=settings.influx_password,
            raw_retention=settings.influx_raw_retention,
            features_retention=settings.influx_features_retention,
        )
