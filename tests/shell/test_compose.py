"""docker-compose.yml and Dockerfile: they cannot run here, so check structure and names."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from arbstream.config import Settings

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
SETTINGS_VARS = {f"ARB_{name.upper()}" for name in Settings.model_fields}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"kafka", "influxdb", "mongodb", "grafana", "stream", "producers",
                             "replay", "alerts", "ml"}
    assert services["ml"]["command"] == ["arbstream", "ml", "retrain", "--every", "3600"]
    assert "state:/state" in services["ml"]["volumes"]  # the registry the alert worker reads
    assert "state:/state" in services["alerts"]["volumes"]
    assert services["producers"]["command"] == ["arbstream", "produce", "--all"]
    assert services["producers"]["restart"] == "unless-stopped"
    assert services["kafka"]["image"] == "apache/kafka:3.8.0"
    assert services["influxdb"]["image"] == "influxdb:1.8"
    assert services["mongodb"]["image"] == "mongo:7"
    assert re.fullmatch(r"grafana/grafana:11\.[\d.]+", services["grafana"]["image"])
    assert env_of(services["influxdb"])["INFLUXDB_DB"] == "arbstream"
    assert "8086:8086" in services["influxdb"]["ports"]
    assert "27017:27017" in services["mongodb"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in services["grafana"]["volumes"]
    assert (REPO / "grafana" / "provisioning").is_dir()


def test_kafka_listeners(compose: dict[str, Any]) -> None:
    env = env_of(compose["services"]["kafka"])
    assert "broker" in env["KAFKA_PROCESS_ROLES"] and "controller" in env["KAFKA_PROCESS_ROLES"]
    advertised = env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert "PLAINTEXT://kafka:9092" in advertised
    host = [a for a in advertised if "localhost" in a]
    assert len(host) == 1
    host_port = host[0].rsplit(":", 1)[1]
    assert f"{host_port}:{host_port}" in compose["services"]["kafka"]["ports"]
    listeners = {item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    protocols = {
        item.split(":")[0] for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    }
    assert listeners <= protocols


def test_stream_service(compose: dict[str, Any]) -> None:
    stream = compose["services"]["stream"]
    assert stream["build"] == "."
    assert stream["command"] == ["arbstream", "stream"]
    env = env_of(stream)
    assert env["ARB_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert env["ARB_INFLUX_URL"] == "http://influxdb:8086"
    assert env["ARB_MONGO_URI"] == "mongodb://mongodb:27017"
    assert env["ARB_STATE_DIR"] == "/state"
    assert any(v.split(":")[1] == "/state" for v in stream["volumes"])
    for dep, cond in stream["depends_on"].items():
        assert cond == {"condition": "service_healthy"}
        assert "healthcheck" in compose["services"][dep], dep
    assert set(stream["depends_on"]) == {"kafka", "influxdb", "mongodb"}


def test_alerts_service(compose: dict[str, Any]) -> None:
    alerts = compose["services"]["alerts"]
    assert alerts["profiles"] == ["alerts"]
    assert alerts["command"] == ["arbstream", "alerts", "run"]
    env = env_of(alerts)
    assert env["ARB_CONFIG_FILE"] == "/config/arbstream.toml"
    assert "./arbstream.toml:/config/arbstream.toml:ro" in alerts["volumes"]
    # secrets only from the shell
    assert env["ARB_SMTP_PASSWORD"] == "${ARB_SMTP_PASSWORD:-}"
    assert set(alerts["depends_on"]) == {"kafka", "mongodb"}


def test_replay_service(compose: dict[str, Any]) -> None:
    replay = compose["services"]["replay"]
    assert replay["profiles"] == ["demo"]
    assert replay["command"] == [
        "arbstream",
        "replay",
        "iaqf",
        "--from",
        "2023-03-10",
        "--to",
        "2023-03-13",
        "--speed",
        "max",
    ]
    env = env_of(replay)
    assert env["ARB_DATA_DIR"] == "/data"
    assert env["ARB_KAFKA_BOOTSTRAP"] == "kafka:9092"
    [data] = [v for v in replay["volumes"] if ":/data" in v]
    assert data.endswith(":/data:ro")
    assert "../shared/data" in data
    assert replay["depends_on"]["kafka"] == {"condition": "service_healthy"}


@pytest.mark.parametrize("service", ["stream", "replay"])
def test_arbstream_env_uses_settings_names(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, service: str
) -> None:
    env = env_of(compose["services"][service])
    arb = {k for k in env if k.startswith("ARB_")}
    assert arb and arb <= SETTINGS_VARS, arb - SETTINGS_VARS
    assert set(env) == arb
    # And the values validate.
    for name in list(os.environ):
        if name.startswith("ARB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    Settings()


def test_interpolated_variables_are_settings() -> None:
    names = set(re.findall(r"\$\{(ARB_[A-Z0-9_]+)", COMPOSE.read_text()))
    assert names <= SETTINGS_VARS


def test_named_volumes_declared(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in declared, f"{name}: volume {source} not declared"


def test_dockerfile() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    assert "openjdk-17-jre-headless" in text
    assert re.search(r"^RUN pip install \.$", text, re.M)
    assert re.search(r'^CMD \["arbstream", "stream"\]$', text, re.M)
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for source in sources:
            if "*" not in source:  # wildcards may match nothing
                assert (REPO / source).exists(), source
