"""Fixtures of the store tests: the session's real MongoDB and InfluxDB, with a database of
each test's own."""

from __future__ import annotations

import pytest
from pymongo import MongoClient

from arbstream.config import Settings
from arbstream.store.config import InfluxConfig, MongoConfig
from arbstream.store.influx.schema import ensure_database
from testing.support import unique_name


@pytest.fixture
def msettings(settings: Settings, request: pytest.FixtureRequest) -> MongoConfig:
    """The session's MongoDB with a fresh database for this test."""
    conf = MongoConfig.of(settings.model_copy(update={"mongo_db": unique_name(request)}))
    with MongoClient(conf.uri.get_secret_value()) as client:
        client.drop_database(conf.db)
    return conf


@pytest.fixture
def isettings(settings: Settings, request: pytest.FixtureRequest) -> InfluxConfig:
    """The session's InfluxDB with a database of this test's own, created, whose ``raw``
    and ``features`` policies keep 2023 points (INF: finite ones would drop them)."""
    conf = InfluxConfig.of(settings.model_copy(update={
        "influx_db": unique_name(request), "influx_raw_retention": "INF",
        "influx_features_retention": "INF",
    }))
    ensure_database(conf)
    return conf
