"""The compose ``demo`` profile's settings, run for real without Docker: its two services'
environment and commands from docker-compose.yml, with the container endpoints swapped for the
local stack's, and the image's Spark settings (deploy/spark/, SPARK_LOCAL_IP).

``demo-stream`` (``arbstream stream``) must become healthy by deploy/stream_healthcheck.py
(what ``replay`` waits for), keep its Spark UI on the loopback without kill links, and, after
``arbstream replay iaqf`` of a few hours of the depeg, hold the replayed 2023 quotes in
InfluxDB (unlimited retention) and opportunities and episodes in MongoDB (the watermark never
moved past them: no live producer).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from arbstream.config import Settings
from arbstream.shell import stack
from arbstream.shell.demo import DEMO_OVERRIDES
from arbstream.shell.stack import free_port
from testing.components import stop_group
from tests.shell.test_compose import COMPOSE, DOCKERFILE, HEALTHCHECK, REPO, settings_env

#: A short stretch of the compose replay's range: USDC fell below 0.9 in these hours.
START, END = "2023-03-11T02:00:00Z", "2023-03-11T04:00:00Z"
DB = "compose_demo"
#: Container-only settings that do not apply to the local stack (no SASL, no InfluxDB users,
#: no secret files there).
CONTAINER_ONLY = ("ARB_KAFKA_SASL_MECHANISM", "ARB_KAFKA_SASL_USERNAME", "ARB_KAFKA_SASL_PASSWORD",
                  "ARB_INFLUX_USERNAME", "ARB_INFLUX_PASSWORD", "ARB_SECRETS_DIR")
BIN = Path(sys.executable).parent


def local_env(service: dict[str, Any], settings: Settings, state: Path) -> dict[str, str]:
    """The service's compose environment (no .env), on the local stack's endpoints."""
    env = {k: v for k, v in settings_env(service).items() if k not in CONTAINER_ONLY}
    env.update({
        "ARB_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "ARB_KAFKA_SECURITY_PROTOCOL": "PLAINTEXT",
        "ARB_INFLUX_URL": settings.influx_url,
        "ARB_MONGO_URI": settings.mongo_uri.get_secret_value(),
        "ARB_STATE_DIR": str(state),
        "ARB_ML_OUTPUT_DIR": str(state / "ml"),
        # A database of its own: the demo's retention is INF, the session's other tests' not.
        "ARB_INFLUX_DB": DB,
        "ARB_MONGO_DB": DB,
        "ARB_KAFKA_PARTITIONS": str(settings.kafka_partitions),
        "ARB_SPARK_DRIVER_MEMORY": "1g",
    })
    if "ARB_DATA_DIR" in env:
        env["ARB_DATA_DIR"] = str(settings.data_dir)
    return env


def process_env(arb: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("ARB_", "SPARK_"))}
    return {**base, **arb, **extra, "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}"}


def image_env() -> dict[str, str]:
    """The Spark variables the Dockerfile sets (``ENV SPARK_...=...``)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    return dict(re.findall(r"\b(SPARK_[A-Z_]+)=(\S+)", text))


@pytest.fixture
def spark_conf(tmp_path: Path) -> tuple[Path, int]:
    """deploy/spark/spark-defaults.conf with its UI port moved to a free one."""
    port = free_port()
    folder = tmp_path / "spark-conf"
    folder.mkdir()
    text = (REPO / "deploy" / "spark" / "spark-defaults.conf").read_text()
    assert re.search(r"^spark\.ui\.port\s+4040$", text, re.M)
    (folder / "spark-defaults.conf").write_text(
        re.sub(r"^spark\.ui\.port\s+4040$", f"spark.ui.port {port}", text, flags=re.M))
    return folder, port


@pytest.fixture
def demo_stream(settings: Settings, tmp_path: Path, spark_conf: tuple[Path, int]
                ) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], int, Path]]:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    state = tmp_path / "state"
    env = local_env(services["demo-stream"], settings, state)
    java = Path(stack.ensure_java()).resolve().parent
    image = image_env()
    assert image["SPARK_LOCAL_IP"] == "127.0.0.1"
    extra = {**image, "SPARK_CONF_DIR": str(spark_conf[0]),
             "PATH": f"{java}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = services["demo-stream"]["command"]
    assert cmd[:2] == ["sh", "-c"]
    script = cmd[2].replace("/state/", f"{state}/")
    log = (tmp_path / "stream.log").open("wb")
    penv = process_env(env, extra)
    penv["PATH"] = f"{BIN}{os.pathsep}{extra['PATH']}"
    proc = subprocess.Popen(["sh", "-c", script], env=penv, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        yield proc, env, spark_conf[1], tmp_path / "stream.log"
    finally:
        stop_group(proc, grace=60)
        log.close()


def _healthy(ui: str, state: Path) -> tuple[int, str]:
    out = subprocess.run([sys.executable, str(HEALTHCHECK), "--ui", ui],
                         env={**os.environ, "ARB_STATE_DIR": str(state)},
                         capture_output=True, text=True, timeout=30)
    return out.returncode, out.stdout.strip()


def _listen_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses (hex, as in /proc/net/tcp*) listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            addr, hexport = local.split(":")
            if state == "0A" and int(hexport, 16) == port:
                found.add(addr)
    return found


def test_demo_profile_on_the_local_stack(
    settings: Settings, demo_stream: tuple[subprocess.Popen[bytes], dict[str, str], int, Path],
    tmp_path: Path,
) -> None:
    import json
    import urllib.request

    from arbstream.store.config import InfluxConfig, MongoConfig
    from arbstream.store.influx.queries import query
    from arbstream.store.influx.schema import ref
    from arbstream.store.mongo.client import collection
    from arbstream.store.mongo.schema import EPISODES, OPPORTUNITIES

    proc, env, port, log = demo_stream
    for field, value in DEMO_OVERRIDES.items():  # the overrides reach the job's environment
        assert env[f"ARB_{field.upper()}"] == str(value).replace(".0", ""), field
    state = Path(env["ARB_STATE_DIR"])
    ui = f"http://127.0.0.1:{port}"

    # 1. Healthy, as the replay's depends_on waits for, within the healthcheck's start period.
    deadline = time.monotonic() + 420  # generous: a loaded 2-core CI machine
    code, why = _healthy(ui, state)
    while code != 0:
        assert proc.poll() is None, f"stream exited {proc.returncode}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{why}\n{log.read_text()[-3000:]}"
        time.sleep(2)
        code, why = _healthy(ui, state)

    # 2. The Spark UI listens on the loopback only, without kill links.
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, or v4-mapped
    assert _listen_addresses(port) and _listen_addresses(port) <= loopback
    with urllib.request.urlopen(f"{ui}/api/v1/applications", timeout=10) as resp:
        [app] = json.load(resp)
    with urllib.request.urlopen(f"{ui}/api/v1/applications/{app['id']}/environment",
                                timeout=10) as resp:
        props = dict(json.load(resp)["sparkProperties"])
    assert props["spark.ui.killEnabled"] == "false"
    assert props["spark.ui.enabled"] == "true"

    # 3. The replay service's command and environment, on a short range.
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    cmd = list(services["replay"]["command"])
    cmd[cmd.index("--from") + 1], cmd[cmd.index("--to") + 1] = START, END
    replay_env = local_env(services["replay"], settings, tmp_path / "replay-state")
    assert replay_env["ARB_DATA_DIR"] == str(settings.data_dir)
    out = subprocess.run(cmd, env=process_env(replay_env, {}), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    published = int(re.search(r"published (\d+) quotes", out.stdout + out.stderr).group(1))
    assert published > 1000

    # 4. The 2023 points are kept, and the depeg found.
    conf = settings.model_copy(update={"influx_db": DB, "mongo_db": DB})
    influx, mongo = InfluxConfig.of(conf), MongoConfig.of(conf)
    opportunities, episodes = collection(mongo, OPPORTUNITIES), collection(mongo, EPISODES)
    count = f"SELECT count(bid) FROM {ref('quote')} WHERE time >= '{START}' AND time < '{END}'"
    deadline = time.monotonic() + 300
    while True:
        assert proc.poll() is None, f"stream exited {proc.returncode}: {log.read_text()[-3000:]}"
        rows = query(influx, count)
        points = rows[0]["count"] if rows else 0
        found = opportunities.count_documents({}), episodes.count_documents({})
        if points == published and min(found) > 0:
            break
        assert time.monotonic() < deadline, (points, published, found)
        time.sleep(3)
    rps = query(influx, f'SHOW RETENTION POLICIES ON "{DB}"')
    policies = {r["name"]: r["duration"] for r in rps}
    assert policies["raw"] == "0s" and policies["features"] == "0s"  # INF
    assert opportunities.count_documents({"cross_quote": True}) > 0  # USDC vs USD pairs
    lowest = query(influx, f"SELECT min(bid) FROM {ref('quote')} WHERE symbol = 'USDC-USD' "
                           f"AND time >= '{START}' AND time < '{END}'")
    assert lowest and lowest[0]["min"] < 0.95
    shutil.rmtree(state / "checkpoints", ignore_errors=True)
