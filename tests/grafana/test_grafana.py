"""Grafana: dashboards, provisioning and `arbstream grafana publish`, without a Grafana server.

* Every dashboard is type-checked with ``tsc`` against Grafana 11.3's own published schema
  (npm ``@grafana/schema`` 11.3.0: the dashboard kind and each panel plugin's generated
  options; ``grafana/validate/``), installed by the test itself with ``npm ci`` into a cache
  directory; :func:`grafana.lint` checks what the schema cannot (datasource uids,
  variables, ids, grid).
* The provisioning YAML files are validated against JSON Schemas written from Grafana's
  provisioning documentation (Grafana publishes none), and every variable they read must be
  documented in ``.env.example`` and passed by docker-compose's ``grafana`` service.
* Every panel query and template-variable query is expanded as Grafana does and EXECUTED on
  the real InfluxDB after a real-data replay through the real stream job: IAQF bars of the
  USDC depeg and a live Binance producer run against the replay server (real 2024 frames,
  with a forced reconnect and a malformed frame), giving quotes, trades, spreads, episodes,
  percentiles, features, anomalies and producer health. Each panel must return rows in at
  least one of its dashboard's views; corrupted copies (measurement, field, tag, variable)
  must not.
* ``publish`` runs against a local HTTP server that records the requests (the one fake: no
  Grafana can run here).
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

import grafana as G
from arbstream.config import Settings
from testing.support import REPO

VALIDATE = REPO / "grafana" / "validate"
COMPOSE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
DEPEG_START = datetime(2023, 3, 11, 4, tzinfo=UTC)
DEPEG_END = datetime(2023, 3, 11, 6, tzinfo=UTC)
LIVE_FRAMES = 3000
#: Explicit values, not All: the All value `.*` also matches a tag that does not exist, so a
#: misspelt tag would go unnoticed (the live health view covers All).
IAQF_EXCHANGES = ["binance", "coinbase", "kraken"]


def ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


@pytest.fixture(scope="module")
def boards() -> dict[str, dict[str, Any]]:
    return G.load_dashboards()


@pytest.fixture(scope="module")
def datasource_uids() -> set[str]:
    doc = yaml.safe_load(G.DATASOURCE_FILE.read_text())
    return {d["uid"] for d in doc["datasources"]}


# --- Grafana's schema, with tsc ----------------------------------------------------------------


@pytest.fixture(scope="session")
def tsc_home() -> Path:
    """``grafana/validate``'s pinned npm packages installed with ``npm ci`` into a cache
    directory keyed by the lock file (reused across runs)."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.fail("npm (Node.js >= 18) is needed to type-check dashboards against "
                    "@grafana/schema: apt-get install nodejs npm")
    lock = (VALIDATE / "package-lock.json").read_bytes()
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    home = cache / "arbstream" / f"grafana-validate-{hashlib.sha256(lock).hexdigest()[:12]}"
    if not (home / "node_modules" / ".bin" / "tsc").exists():
        home.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json"):
            shutil.copy(VALIDATE / name, home / name)
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=home,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    return home


def typecheck(home: Path, dashboards: dict[str, dict[str, Any]]) -> str:
    """tsc's diagnostics for ``dashboards`` checked as ``ArbDashboard`` ('' when clean)."""
    run = home / f"run-{uuid.uuid4().hex}"
    run.mkdir()
    try:
        for name in ("schema.ts", "tsconfig.json"):
            shutil.copy(VALIDATE / name, run / name)
        lines = ["import type { ArbDashboard } from './schema';"]
        for i, (uid, board) in enumerate(sorted(dashboards.items())):
            lines.append(f"// {uid}\nexport const d{i}: ArbDashboard = "
                         f"{json.dumps(board, indent=1)};")
        (run / "check.ts").write_text("\n".join(lines) + "\n")
        done = subprocess.run([str(home / "node_modules" / ".bin" / "tsc"), "-p", str(run)],
                              capture_output=True, text=True, timeout=120)
        return (done.stdout + done.stderr).strip()
    finally:
        shutil.rmtree(run, ignore_errors=True)


def test_dashboards_match_grafana_11_schema(tsc_home: Path, boards) -> None:
    assert json.loads((VALIDATE / "package.json").read_text())["devDependencies"][
        "@grafana/schema"].startswith("11.")
    assert typecheck(tsc_home, boards) == ""


@pytest.mark.parametrize(("corrupt", "message"), [
    (lambda b: b["panels"][1].update(gridPoz=b["panels"][1].pop("gridPos")), "gridPoz"),
    (lambda b: b["panels"][1]["options"].update(colorMode="valu"), '"valu"'),
    (lambda b: b["panels"][1]["targets"][0].update(resultFormat="tabel"), '"tabel"'),
    (lambda b: b["panels"][1]["options"].pop("reduceOptions"), "reduceOptions"),
    (lambda b: b["panels"][1].update(timeFrom=5), "number"),
    (lambda b: b["templating"]["list"][0].update(refresh="onLoad"), "VariableRefresh"),
])
def test_schema_check_rejects_corrupted_dashboard(tsc_home: Path, boards, corrupt,
                                                   message) -> None:
    bad = copy.deepcopy(boards["arbstream-monitor"])
    assert bad["panels"][1]["type"] == "stat"
    corrupt(bad)
    out = typecheck(tsc_home, {"arbstream-monitor": bad})
    assert "error TS" in out and message in out, out


# --- what the schema cannot check ----------------------------------------------------------------


def test_fixed_uids_and_alert_link(boards) -> None:
    assert set(boards) == set(G.DASHBOARD_UIDS)
    monitor = boards["arbstream-monitor"]
    # alerts link to <grafana>/d/arbstream-monitor?var-symbol=<SYM>&from=..&to=..
    symbol = G.variables(monitor)["symbol"]
    assert symbol["type"] == "query" and not symbol.get("skipUrlSync")
    for uid, board in boards.items():
        if uid == "arbstream-backtest":  # a run and its bots, not markets
            assert list(G.variables(board)) == ["run", "bot"]
            continue
        names = G.variables(board)
        assert {"symbol", "exchange"} <= set(names)
        for name in ("symbol", "exchange"):
            assert names[name]["query"].startswith("SHOW TAG VALUES")


def test_lint_clean(boards, datasource_uids) -> None:
    for uid, board in boards.items():
        assert G.lint(board, datasource_uids) == [], uid


def test_stats_use_relative_time_overrides(boards) -> None:
    monitor = boards["arbstream-monitor"]
    overrides = {p["title"]: p.get("timeFrom") for p in G.iter_panels(monitor)
                 if p["type"] == "stat"}
    assert overrides["Opportunities, last 5 min"] == "5m"
    assert overrides["Opportunities, last 1 h"] == "1h"
    assert overrides["Episodes, last 5 min"] == "5m"
    assert overrides["Episodes, last 1 h"] == "1h"


@pytest.mark.parametrize(("corrupt", "problem"), [
    (lambda b: b["panels"][1].update(datasource={"type": "influxdb", "uid": "other"}),
     "datasource uid 'other'"),
    (lambda b: b["panels"][1]["targets"][0].update(
        query=b["panels"][1]["targets"][0]["query"].replace("$symbol", "$symbl")),
     "undefined $symbl"),
    (lambda b: b["panels"][2].update(id=b["panels"][1]["id"]), "duplicate id"),
    (lambda b: b["panels"][2].update(gridPos=dict(b["panels"][1]["gridPos"])), "overlaps"),
    (lambda b: b["panels"][1]["gridPos"].update(x=22), "outside the 24-column grid"),
    (lambda b: b["templating"]["list"].reverse(), "defined after it"),
    (lambda b: b["panels"][1]["targets"][0].update(
        query=b["panels"][1]["targets"][0]["query"].replace("$timeFilter",
                                                            "time > now() - 5m")),
     "now() literal"),
])
def test_lint_catches(boards, datasource_uids, corrupt, problem) -> None:
    bad = copy.deepcopy(boards["arbstream-monitor"])
    corrupt(bad)
    problems = G.lint(bad, datasource_uids)
    assert any(problem in p for p in problems), problems


# --- Grafana's expansion ------------------------------------------------------------------------


def test_expansion_follows_grafana() -> None:
    multi = {"name": "symbol", "multi": True, "includeAll": True, "allValue": ".*"}
    single = {"name": "exchange_a", "multi": False, "includeAll": False}
    number = {"name": "min_net_bps", "type": "textbox"}
    defs = {"symbol": multi, "exchange_a": single, "min_net_bps": number}
    q = ("SELECT x FROM m WHERE s =~ /^$symbol$/ AND e = '$exchange_a' AND v > "
         "${min_net_bps} AND $timeFilter GROUP BY time($__interval)")
    rng = G.TimeRange(1_000, 7_201_000)
    got = G.render_query(q, defs, {"symbol": ["BTC-USD", "X.Y"], "exchange_a": "a.b",
                                   "min_net_bps": "2.5"}, rng, 5_000)
    assert got == ("SELECT x FROM m WHERE s =~ /^(BTC-USD|X\\.Y)$/ AND e = 'a.b' AND v > 2.5 "
                   "AND time >= 1000ms and time <= 7201000ms GROUP BY time(5s)")
    assert G.interpolate("/^$symbol$/", defs, {"symbol": "$__all"}) == "/^.*$/"
    assert G.interpolate("/^$symbol$/", defs, {"symbol": ["ETH-USD"]}) == "/^ETH-USD$/"
    assert G.interpolate("=~ /^$exchange_a$/", defs, {"exchange_a": "a.b"}) == "=~ /^a\\.b$/"
    with pytest.raises(G.GrafanaError, match="undefined"):
        G.interpolate("$nope", defs, {})
    # intervals: 2 h over a 24-column panel (1920 points) -> 3.75 s -> 5 s; floor 1 s
    panel = {"gridPos": {"w": 24}}
    assert G.panel_interval(panel, G.TimeRange(0, 7_200_000)) == 5_000
    assert G.panel_interval(panel, G.TimeRange(0, 60_000)) == 1_000
    assert G.format_interval(604_800_000) == "7d" and G.format_interval(90_000) == "1m"
    # timeFrom is relative to now, not to the dashboard's end
    assert G.panel_range({"timeFrom": "5m"}, G.TimeRange(0, 10), 1_000_000) == G.TimeRange(
        700_000, 1_000_000)
    assert G.panel_range({"timeFrom": "1h", "timeShift": "1h"}, rng, 7_200_000) == G.TimeRange(
        0, 3_600_000)


# --- provisioning --------------------------------------------------------------------------------


def provisioning_schema(name: str) -> dict[str, Any]:
    schema = json.loads((VALIDATE / f"provisioning-{name}.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def provisioning_errors(name: str, doc: Any) -> list[str]:
    validator = jsonschema.Draft202012Validator(provisioning_schema(name))
    return [e.message for e in validator.iter_errors(doc)]


def test_provisioning_files_valid() -> None:
    assert provisioning_errors("datasources", yaml.safe_load(G.DATASOURCE_FILE.read_text())) == []
    provider = yaml.safe_load(G.PROVIDER_FILE.read_text())
    assert provisioning_errors("dashboards", provider) == []
    # the provider's container path is the mounted repository folder holding the dashboards
    compose = yaml.safe_load(COMPOSE.read_text())
    [mount] = [v for v in compose["services"]["grafana"]["volumes"]
               if ":/etc/grafana/provisioning" in v]
    host, container = mount.split(":")[:2]
    [p] = provider["providers"]
    local = (REPO / host / Path(p["options"]["path"]).relative_to(container)).resolve()
    assert local == G.DASHBOARD_DIR.resolve()
    assert {f.stem for f in local.glob("*.json")} == {"monitor", "health", "analytics",
                                                            "backtest"}
    ds = yaml.safe_load(G.DATASOURCE_FILE.read_text())["datasources"][0]
    assert ds["jsonData"]["version"] == "InfluxQL" and ds["uid"] == G.DATASOURCE_UID


@pytest.mark.parametrize(("name", "corrupt", "message"), [
    ("datasources", lambda d: d["datasources"][0].update(dbname="x"), "dbname"),
    ("datasources", lambda d: d["datasources"][0]["jsonData"].update(version="influxql"),
     "influxql"),
    ("datasources", lambda d: d["datasources"][0].update(access="server"), "server"),
    ("datasources", lambda d: d["datasources"][0]["jsonData"].pop("dbName"), "dbName"),
    ("dashboards", lambda d: d["providers"][0]["options"].update(path="relative/dir"),
     "relative/dir"),
    ("dashboards", lambda d: d["providers"][0].update(updateIntervalSeconds="30"), "'30'"),
])
def test_provisioning_schema_catches(name, corrupt, message) -> None:
    path = G.DATASOURCE_FILE if name == "datasources" else G.PROVIDER_FILE
    doc = yaml.safe_load(path.read_text())
    corrupt(doc)
    errors = provisioning_errors(name, doc)
    assert any(message in e for e in errors), errors


ENV_REF = re.compile(r"\$(?:__env\{(\w+)\}|\{(\w+)\}|(\w+))")


def test_provisioning_env_vars_documented_and_passed() -> None:
    names = set()
    for path in (G.DATASOURCE_FILE, G.PROVIDER_FILE):
        for line in path.read_text().splitlines():
            if not line.lstrip().startswith("#"):
                names |= {next(g for g in m.groups() if g) for m in ENV_REF.finditer(line)}
    assert names == {"ARB_GRAFANA_INFLUX_URL", "ARB_INFLUX_DB", "ARB_INFLUX_USERNAME",
                     "ARB_INFLUX_PASSWORD"}
    documented = set(re.findall(r"^#?\s*(ARB_[A-Z0-9_]+)=", ENV_EXAMPLE.read_text(), re.M))
    assert names <= documented
    grafana_env = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]["environment"]
    assert names <= set(grafana_env)
    assert grafana_env["ARB_GRAFANA_INFLUX_URL"] == "http://influxdb:8086"
    settings = {f"ARB_{n.upper()}" for n in Settings.model_fields}
    assert names <= settings  # the same names configure `arbstream grafana publish`
    assert not re.search(r"password:\s*[^$\s]", G.DATASOURCE_FILE.read_text())  # no secrets


# --- urllib3: grafana-client and influxdb-client in one environment ----------------------------


def test_grafana_client_and_influxdb_client_share_real_urllib3(settings: Settings) -> None:
    from importlib.metadata import distribution

    import grafana_client
    import influxdb_client
    import urllib3

    assert Path(urllib3.__file__).parent.name == "urllib3"
    files = {str(f) for f in distribution("urllib3").files or []}
    assert "urllib3/__init__.py" in files  # the module is upstream urllib3's, not a fork's
    assert urllib3.__version__ == distribution("urllib3").version
    assert "urllib3_future" not in urllib3.__file__
    assert grafana_client.GrafanaApi
    with influxdb_client.InfluxDBClient(url=settings.influx_url, token="unused",
                                        org="-") as client:
        assert client.ping() is True
        assert client.version().startswith("1.")


# --- real data: replay through the stream, then run every query ------------------------------


@pytest.fixture(scope="module")
def replayed(spark, settings: Settings, tmp_path_factory, data_dir: Path) -> dict[str, Any]:
    """One stream start; the IAQF depeg slice, drained; then a live Binance producer against
    the replay server (real frames, one forced reconnect, one malformed frame), drained."""
    from cryptofeed.symbols import Symbols

    from arbstream.topics import ensure_topics
    from producers.live import produce
    from producers.replay.iaqf import replay_iaqf
    from spark_jobs import arbitrage
    from testing.replay_server import ReplayServer, binance_gz_frames

    conf = settings.model_copy(update={
        "influx_db": "grafana", "mongo_db": "grafana", "starting_offsets": "latest",
        "trigger_seconds": 0.5, "influx_raw_retention": "INF",
        "influx_features_retention": "INF", "episode_gap_seconds": 120.0,
        "stats_horizon_seconds": 3600.0, "health_interval_seconds": 1.0,
        # Spot bookTicker frames carry no exchange time: their quotes are stamped on receipt
        # (wall clock), so the live run spans only ~10 s of event time. A 2 s watermark lets
        # its windows close (and their features reach InfluxDB) within that.
        "watermark_seconds": 2.0,
    })
    ensure_topics(conf)
    t0 = time.monotonic()
    queries = arbitrage.start(spark, conf, tmp_path_factory.mktemp("grafana-ckpt"))
    try:
        arbitrage.wait_started(queries, timeout=120)
        t_start = time.monotonic()
        replay_iaqf(conf, DEPEG_START, DEPEG_END, None, progress=False)
        arbitrage.wait_drained(queries, conf, timeout=600)
        t_iaqf = time.monotonic()
        path = data_dir / "binance-ws-2024-08" / "spot_btcusdt_20240808.gz"
        frames = []
        for ts, frame in binance_gz_frames(path):
            if frame.startswith("{\"stream\""):
                frames.append((ts, frame))
            if len(frames) == LIVE_FRAMES:
                break
        live_start = int(frames[0][0] * 1000)  # capture receive time of the first frame
        with ReplayServer("binance", data_dir=data_dir / "exchange-ws-captures", frames=frames,
                          speed=3.0, drop_after=LIVE_FRAMES // 2,
                          inject={100: "not json at all"}) as srv:
            live = conf.model_copy(update={
                "feed_ws_urls": {"binance": srv.ws_url},
                "feed_rest_urls": {"binance": srv.http_url},
                "feed_ca_file": Path(srv.ca_file), "feed_channels": ["bbo", "trades"],
            })
            stop = asyncio.Event()

            async def main() -> dict:
                task = asyncio.create_task(produce(live, {"binance": ["BTC-USDT"]}, stop,
                                                   handle_signals=False))
                assert await asyncio.to_thread(srv.wait_drained, 120, 1), srv.stats
                await asyncio.sleep(2.5)
                stop.set()
                return await task

            Symbols.clear()
            stats = asyncio.run(main())
        arbitrage.wait_drained(queries, conf, timeout=600)
    finally:
        for q in queries:
            q.stop()
    score_opportunities(conf)
    from ml.pairs import run as run_pairs

    run_pairs(conf, DEPEG_START, DEPEG_END, publish_signals=False)  # the Pair trading row
    backtest = run_backtest(conf, data_dir, tmp_path_factory.mktemp("grafana-bt"))
    timing = {"start_s": t_start - t0, "iaqf_s": t_iaqf - t_start,
              "live_s": time.monotonic() - t_iaqf}
    return {"settings": conf, "wall_s": time.monotonic() - t0, "stats": stats["binance"],
            "timing": timing, "backtest": backtest,
            "live_from": live_start - 300_000, "now": int(time.time() * 1000) + 5_000}


def run_backtest(conf: Settings, data_dir: Path, tmp: Path) -> dict[str, Any]:
    """A backtest of the depeg slice (its own lake, by the stream's backfill) stored into the
    test's InfluxDB and MongoDB, for the Backtest dashboard: ``{"run": id, "bots": [...]}``."""
    from arbstream.shell.backfill import Input, read_quotes
    from backtest.job import run_job
    from backtest.market import Market
    from spark_jobs.backfill import BackfillConfig, backfill

    bt = conf.model_copy(update={"lake_dir": tmp / "lake", "window_seconds": 60.0,
                                 "max_quote_age_seconds": 60.0})
    _, quotes = read_quotes(bt, Input.iaqf, DEPEG_START - timedelta(hours=1), DEPEG_END)
    quotes = list(quotes)
    backfill((q.to_json() for q in quotes), "iaqf", BackfillConfig.of(bt))
    job = run_job(bt, Market.from_records(quotes), "iaqf", None, None, ml=False,
                  out_dir=tmp / "out")
    assert job.stored is not None and not job.stored["rejected"]
    return {"run": job.run_id, "bots": sorted(job.results)}


def score_opportunities(conf: Settings) -> int:
    """``ml_score`` points for the replayed depeg opportunities, written through the store
    writer as the alert worker writes them (its scoring is tested in
    tests/alerts/test_alert_models.py): a persistence stand-in for the champion net-bps
    regressor (predicted = net at the window), version 1. Returns the points written."""
    from arbstream.store.config import InfluxConfig
    from arbstream.store.influx.queries import PAIR_TAGS, query
    from arbstream.store.influx.writer import write_ml_scores
    from arbstream.store.models import REGRESSOR

    influx = InfluxConfig.of(conf)
    tags = ", ".join(f'"{t}"' for t in (*PAIR_TAGS, "cross_quote"))
    rows = query(influx, f'SELECT "net_bps" FROM "spread" WHERE "net_bps" > 0 AND time >= '
                         f"{ms(DEPEG_START)}ms AND time <= {ms(DEPEG_END)}ms GROUP BY {tags}")
    points = [{**r, "cross_quote": r["cross_quote"] == "true", "window_end": r["time"],
               "model": REGRESSOR, "version": 1, "predicted_bps": r["net_bps"]} for r in rows]
    assert points, "the depeg slice has opportunities"
    return write_ml_scores(influx, points)


def views(replayed: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each dashboard's runs: time range, wall-clock now and variable values that exist in
    the replayed data. The depeg view is "now" one minute after the last episode start of
    the slice, so that the 5-minute stats have something to count."""
    from arbstream.store.config import InfluxConfig
    from arbstream.store.influx.queries import query

    conf = InfluxConfig.of(replayed["settings"])
    [last] = query(conf, f'SELECT last("duration_s") FROM "episode" WHERE time >= '
                         f"{ms(DEPEG_START)}ms AND time <= {ms(DEPEG_END)}ms")
    depeg_now = last["time"] + 60_000
    depeg = G.TimeRange(ms(DEPEG_START), ms(DEPEG_END) + 10_000)
    live = G.TimeRange(replayed["live_from"], replayed["now"])
    return {
        "arbstream-monitor": {
            "depeg": (depeg, depeg_now, {"symbol": ["BTC-USDC", "BTC-USDT"],
                                          "exchange": IAQF_EXCHANGES, "min_net_bps": "0"}),
            "live": (live, replayed["now"], {"symbol": ["BTC-USDT"], "exchange": ["binance"],
                                             "min_net_bps": "0"}),
        },
        "arbstream-health": {
            "live": (live, replayed["now"], {"exchange": "$__all", "symbol": ["BTC-USDT"]}),
        },
        "arbstream-backtest": {
            "depeg": (G.TimeRange(ms(DEPEG_START) - 3_600_000, ms(DEPEG_END) + 60_000),
                      depeg_now, {"run": replayed["backtest"]["run"],
                                  "bot": replayed["backtest"]["bots"]}),
        },
        "arbstream-analytics": {
            "depeg": (depeg, depeg_now, {"symbol": "BTC-USDC", "exchange": ["binance", "kraken"],
                                          "exchange_a": "binance", "exchange_b": "kraken",
                                          "min_net_bps": "0"}),
        },
    }


def run_board(conf: Settings, board: dict[str, Any],
              board_views: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Panel title -> view -> rows returned (int, summed over targets) or the error (str), as
    :func:`grafana.check` runs them (what ``arbstream grafana check`` does)."""
    from arbstream.store.config import InfluxConfig
    from arbstream.store.influx.queries import query

    influx = InfluxConfig.of(conf)
    out: dict[str, dict[str, Any]] = {}
    for view, (rng, now, values) in board_views.items():
        for r in G.check(board, values, rng, now,
                         lambda q: len(query(influx, q, retries=0))):
            out.setdefault(r.panel_title, {})[view] = r.error if r.error else r.rows
    return out


def empty_panels(result: dict[str, dict[str, Any]]) -> list[str]:
    """Titles of panels with an error in any view or no row in every view."""
    return sorted(t for t, cell in result.items()
                  if any(isinstance(v, str) for v in cell.values())
                  or not any(isinstance(v, int) and v > 0 for v in cell.values()))


@pytest.mark.e2e
def test_every_panel_returns_rows_on_real_data(replayed, boards) -> None:
    conf = replayed["settings"]
    s = replayed["stats"]
    assert s.reconnects >= 1 and s.deadletters >= 1  # health has something to show
    report = {}
    for uid, board_views in views(replayed).items():
        result = run_board(conf, boards[uid], board_views)
        for rng, now, values in board_views.values():
            expanded = G.dashboard_queries(boards[uid], values, rng, now)
            assert len(expanded) == sum(len(p.get("targets", []))
                                        for p in G.iter_panels(boards[uid]))
            assert not any("$" in q.influxql.replace("$/", "") for q in expanded)
        panels = {p["title"] for p in G.iter_panels(boards[uid]) if p["type"] != "row"}
        assert set(result) == panels
        assert empty_panels(result) == [], (uid, result)
        report[uid] = result
    # a few figures pinned to the data
    monitor = report["arbstream-monitor"]
    assert monitor["Latest trades"]["live"] == 50
    assert monitor["Opportunities, last 5 min"]["depeg"] == 1  # one count row
    print(json.dumps({"wall_s": round(replayed["wall_s"], 1), **replayed["timing"], **report},
                     indent=1))


@pytest.mark.e2e
def test_cli_check_on_real_data(replayed, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``arbstream grafana check`` on the replayed depeg slice: every Analytics panel has rows
    (exit 0); a symbol that is not in the data empties them (exit 3); saved or first values
    stand for the variables not given."""
    from typer.testing import CliRunner

    from arbstream.config import get_settings
    from arbstream.shell.cli import app

    conf = replayed["settings"]
    for name in list(os.environ):
        if name.startswith("ARB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ARB_INFLUX_URL", conf.influx_url)
    monkeypatch.setenv("ARB_INFLUX_DB", conf.influx_db)
    iso = "%Y-%m-%dT%H:%M:%SZ"
    rng = ["--from", DEPEG_START.strftime(iso), "--to",
           (DEPEG_END + timedelta(seconds=10)).strftime(iso), "--dashboard", "arbstream-analytics"]
    args = ["grafana", "check", *rng, "--var", "symbol=BTC-USDC",
            "--var", "exchange=binance,kraken", "--var", "exchange_a=binance",
            "--var", "exchange_b=kraken"]
    get_settings.cache_clear()
    try:
        ok = CliRunner().invoke(app, args)
        assert ok.exit_code == 0, ok.output
        titles = {p["title"] for p in G.iter_panels(G.load_dashboards()["arbstream-analytics"])
                  if p["type"] != "row"}
        assert all(t[:30] in ok.output for t in titles), ok.output
        empty = CliRunner().invoke(app, [*args, "--var", "symbol=NOPE-USD"])
        assert empty.exit_code == 3 and "returned no rows" in empty.output, empty.output
        unknown = CliRunner().invoke(app, ["grafana", "check", *rng[:4], "--dashboard", "nope"])
        assert unknown.exit_code == 1 and "no dashboard with uid" in unknown.output
    finally:
        get_settings.cache_clear()


@pytest.mark.e2e
def test_every_variable_query_returns_the_values_used(replayed, boards) -> None:
    from arbstream.store.config import InfluxConfig
    from arbstream.store.influx.queries import query

    conf = InfluxConfig.of(replayed["settings"])
    for uid, board_views in views(replayed).items():
        defs = G.variables(boards[uid])
        for view, (_rng, _now, values) in board_views.items():
            for name, var in defs.items():
                if var["type"] != "query":
                    continue
                rows = query(conf, G.variable_query(boards[uid], name, values))
                found = {r["value"] for r in rows}
                assert found, (uid, view, name)
                chosen = values[name]
                chosen = [chosen] if isinstance(chosen, str) else chosen
                assert chosen == ["$__all"] or set(chosen) <= found, (uid, view, name, found)


def _replace_in_query(board: dict[str, Any], title: str, old: str, new: str) -> None:
    [panel] = [p for p in G.iter_panels(board) if p["title"] == title]
    assert old in panel["targets"][0]["query"]
    panel["targets"][0]["query"] = panel["targets"][0]["query"].replace(old, new, 1)


@pytest.mark.e2e
@pytest.mark.parametrize(("uid", "title", "old", "new"), [
    ("arbstream-monitor", "Latest trades", '"raw"."trade"', '"raw"."trades"'),  # measurement
    ("arbstream-monitor", "Latest trades", 'FROM "raw"', 'FROM "autogen"'),  # retention policy
    ("arbstream-monitor", "Best current net spread", 'last("net_bps")', 'last("net_bp")'),
    ("arbstream-monitor", "Bid and ask per exchange", '"exchange" =~', '"exchang" =~'),  # tag
    ("arbstream-health", "Message rate", '"messages_per_s"', '"messages_per_sec"'),  # field
    ("arbstream-health", "Quote latency", '$symbol', '$symbols'),  # variable
    ("arbstream-analytics", "Episode duration distribution", '"episode"', '"episodes"'),
    ("arbstream-analytics", "Anomalies per interval", '"anomaly" = true', '"anomalous" = true'),
    ("arbstream-backtest", "Capital curves", '"equity_usd"', '"equity"'),  # field
    ("arbstream-backtest", "Bot comparison", "\"run\" = '$run'", "\"run\" = 'x$run'"),
])
def test_corrupted_query_returns_nothing(replayed, boards, uid, title, old, new) -> None:
    bad = copy.deepcopy(boards[uid])
    _replace_in_query(bad, title, old, new)
    result = run_board(replayed["settings"], bad, views(replayed)[uid])
    assert title in empty_panels(result), result[title]
    others = {t: c for t, c in result.items() if t != title}
    assert empty_panels(others) == []


# --- publish against a recording HTTP server ----------------------------------------------------


class Recorder(http.server.ThreadingHTTPServer):
    """Answers like Grafana's HTTP API and records every request."""

    def __init__(self, fail: dict[str, tuple[int, dict]] | None = None,
                 folder_exists: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.fail = fail or {}
        self.folder_exists = folder_exists

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: Recorder

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.server.requests.append({"method": self.command, "path": self.path,
                                     "auth": self.headers.get("Authorization"), "body": body})
        key = f"{self.command} {self.path}"
        status, answer = 200, {}
        for prefix, failure in self.server.fail.items():
            if key.startswith(prefix):
                status, answer = failure
                break
        else:
            if self.command == "GET" and self.path.startswith("/api/folders/"):
                status, answer = ((200, {"uid": "arbstream"}) if self.server.folder_exists
                                  else (404, {"message": "folder not found"}))
            elif self.command == "GET" and self.path.startswith("/api/datasources/uid/"):
                status, answer = 404, {"message": "Data source not found"}
            elif self.path == "/api/dashboards/db":
                uid = body["dashboard"]["uid"]
                answer = {"status": "success", "uid": uid, "version": 3,
                          "url": f"/d/{uid}/slug"}
            elif self.path in ("/api/folders", "/api/datasources"):
                answer = {"uid": body.get("uid"), "message": "created"}
        raw = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    do_GET = do_POST = do_PUT = _answer


@pytest.fixture
def recorder(request) -> Iterator[Recorder]:
    params = getattr(request, "param", {})
    server = Recorder(**params)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _conf(url: str, **extra: Any) -> Settings:
    return Settings(grafana_url=url, **extra)


def test_publish_payloads_auth_folder_overwrite(recorder: Recorder, boards) -> None:
    conf = _conf(recorder.url, grafana_token="glsa_secret", grafana_folder="Arb Stream",
                 influx_db="prod", influx_username="reader", influx_password="pw",
                 grafana_influx_url="http://influxdb:8086")
    report = G.publish(conf, datasource=True)
    reqs = recorder.requests
    assert all(r["auth"] == "Bearer glsa_secret" for r in reqs)
    assert [(r["method"], r["path"]) for r in reqs[:4]] == [
        ("GET", "/api/folders/arb-stream"), ("POST", "/api/folders"),
        ("GET", f"/api/datasources/uid/{G.DATASOURCE_UID}"), ("POST", "/api/datasources")]
    assert reqs[1]["body"] == {"title": "Arb Stream", "uid": "arb-stream"}
    ds = reqs[3]["body"]
    assert ds["uid"] == G.DATASOURCE_UID and ds["url"] == "http://influxdb:8086"
    assert ds["jsonData"]["dbName"] == "prod" and ds["jsonData"]["version"] == "InfluxQL"
    assert ds["user"] == "reader" and ds["secureJsonData"] == {"password": "pw"}
    saved = [r["body"] for r in reqs if r["path"] == "/api/dashboards/db"]
    assert {b["dashboard"]["uid"] for b in saved} == set(G.DASHBOARD_UIDS)
    for body in saved:
        assert body["overwrite"] is True and body["folderUid"] == "arb-stream"
        assert body["dashboard"]["id"] is None
        want = boards[body["dashboard"]["uid"]]
        assert {k: v for k, v in body["dashboard"].items() if k != "id"} == {
            k: v for k, v in want.items() if k != "id"}
    assert report.dashboards["arbstream-monitor"] == "/d/arbstream-monitor/slug"
    assert report.versions["arbstream-health"] == 3 and report.datasource == "created"


@pytest.mark.parametrize("recorder", [{"folder_exists": True}], indirect=True)
def test_publish_basic_auth_existing_folder_no_datasource(recorder: Recorder) -> None:
    import base64

    conf = _conf(recorder.url, grafana_username="admin", grafana_password="s3cret")
    G.publish(conf)
    want = "Basic " + base64.b64encode(b"admin:s3cret").decode()
    assert {r["auth"] for r in recorder.requests} == {want}
    paths = [(r["method"], r["path"]) for r in recorder.requests]
    assert paths == [("GET", "/api/folders/arbstream")] + [("POST", "/api/dashboards/db")] * len(
        G.DASHBOARD_UIDS)


@pytest.mark.parametrize(("recorder", "status", "text"), [
    ({"fail": {"POST /api/dashboards/db": (412, {"message": "version-mismatch"})}}, 412,
     "version-mismatch"),
    ({"fail": {"GET /api/folders": (401, {"message": "invalid API key"})}}, 401,
     "invalid API key"),
    ({"fail": {"POST /api/dashboards/db": (500, {"message": "database is locked"})}}, 500,
     "database is locked"),
], indirect=["recorder"])
def test_publish_http_errors_are_clear(recorder: Recorder, status: int, text: str) -> None:
    with pytest.raises(G.GrafanaError) as info:
        G.publish(_conf(recorder.url, grafana_token="t"))
    message = str(info.value)
    assert f"HTTP {status}" in message and text in message and recorder.url in message


def test_publish_needs_credentials_and_a_server() -> None:
    with pytest.raises(G.GrafanaError, match="no Grafana credentials"):
        G.publish(_conf("http://127.0.0.1:9"))
    with pytest.raises(G.GrafanaError, match="cannot reach Grafana"):
        G.publish(_conf("http://127.0.0.1:9", grafana_token="t"), timeout=2)


def test_cli_publish(recorder: Recorder, monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from arbstream.config import get_settings
    from arbstream.shell.cli import app

    for name in list(os.environ):
        if name.startswith("ARB_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ARB_GRAFANA_URL", recorder.url)
    monkeypatch.setenv("ARB_GRAFANA_TOKEN", "tok-123")
    get_settings.cache_clear()
    try:
        ok = CliRunner().invoke(app, ["grafana", "publish"])
        assert ok.exit_code == 0, ok.output
        assert f"{recorder.url}/d/arbstream-monitor/slug (version 3)" in ok.output
        assert "tok-123" not in ok.output
        recorder.fail["POST /api/dashboards/db"] = (403, {"message": "permission denied"})
        bad = CliRunner().invoke(app, ["grafana", "publish"])
        assert bad.exit_code == 1 and "HTTP 403" in bad.output
    finally:
        get_settings.cache_clear()
