"""The champion models in the alert worker: loaded at start, hot-reloaded when a new champion is
promoted, ``min_score`` / ``min_predicted_bps`` rules, the scores in the e-mails, the decision
log and InfluxDB ``ml_score``; a missing or refused champion logged, never silent.

Against the real SMTP server (aiosmtpd), Kafka (tansu), MongoDB (SecantusDB) and InfluxDB of
the session, with the real IAQF events of tests/alerts/test_alerts.py. The scorer is a real
random forest fitted on :func:`arbstream.features.online_features` of the hour's opportunity
windows, labeled with what happened: whether the window's episode lasted more than 5 minutes.
"""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from sklearn.ensemble import RandomForestClassifier

from alerts.events import parse_event
from alerts.rules import matching, mismatch
from alerts.scoring import Scorer
from alerts.worker import AlertsConfig, AlertWorker
from arbstream.config import Settings
from arbstream.features import online_features
from arbstream.schemas import EpisodeEvent, OpportunityEvent
from arbstream.store import models as R
from arbstream.store.config import InfluxConfig
from arbstream.store.influx.queries import ml_scores
from arbstream.store.influx.schema import ensure_database
from ml.registry import card_from_result
from tests.alerts import test_alerts as A
from tests.alerts.test_alerts import (
    LATER,
    OTHER,
    alert_settings,
    claims,
    feed,
    log_docs,
    make_topics,
    of_episode,
    parsed,
    parts,
    publish,
    rule,
    running,
    wait_for,
)

#: The fixtures of test_alerts.py used here: the hour's events and the SMTP servers.
events = A.events
smtp = A.smtp

#: Matches every pair with a champion's score (any value): needs the scorer.
WIDE = {"symbols": [], "buy_exchanges": [], "sell_exchanges": [], "cross_quote": True}


# --- the model -----------------------------------------------------------------------------------

def training_set(events: list[tuple[bytes, bytes]]) -> tuple[np.ndarray, np.ndarray]:
    """Online features of every opportunity window; label: its episode lasted > 300 s."""
    evs = parsed(events)
    lasted = {e.episode_id: e.duration_s for e in evs
              if isinstance(e, EpisodeEvent) and e.event == "closed"}
    windows = [e for e in evs if isinstance(e, OpportunityEvent)]
    x = np.array([online_features(w.model_dump()) for w in windows])
    y = np.array([lasted.get(w.episode_id, 0.0) > 300 for w in windows], dtype=int)
    assert 0 < y.sum() < len(y)
    return x, y


def forest(events: list[tuple[bytes, bytes]], seed: int) -> RandomForestClassifier:
    x, y = training_set(events)
    return RandomForestClassifier(n_estimators=20, max_depth=4, random_state=seed).fit(x, y)


def make_champion(registry: R.RegistryConfig, model: Any) -> int:
    """Register ``model`` as the next scorer version and make it the champion."""
    card = card_from_result(R.SCORER, {
        "model": model, "folds": [],
        "target": {"kind": "classification", "horizon_s": 300.0, "threshold_bps": 0.0},
        "data": {"start": datetime(2023, 3, 11, 4, tzinfo=UTC),
                 "end": datetime(2023, 3, 11, 5, tzinfo=UTC), "rows": 1,
                 "table_sha256": "0" * 64}})
    version = R.register(registry, R.SCORER, card, model, pa.table({"y_pred": [0.5]}))
    R.set_status(registry, R.SCORER, version, "champion", "test")
    return version


def score_of(model: Any, value: bytes) -> float:
    return float(model.predict_proba([online_features(parse_event(value).model_dump())])[0][1])


def with_influx(conf: Settings) -> Settings:
    """``conf`` on an InfluxDB database of its own, created."""
    conf = conf.model_copy(update={"influx_db": f"alerts_ml_{uuid.uuid4().hex[:10]}"})
    ensure_database(InfluxConfig.of(conf))
    return conf


# --- tests ---------------------------------------------------------------------------------------

def test_hot_reload_next_decision_carries_the_new_champion(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    """v1 is champion at start and scores LATER; v2 is promoted while the worker runs; after
    the reload interval the next episode (OTHER) is decided, logged, e-mailed and written to
    ``ml_score`` with v2's score: no restart."""
    inbox, port = smtp()
    conf = with_influx(alert_settings(
        settings, tmp_path, port, alert_rules=[rule(name="scored", min_score=0.0, **WIDE)],
        alert_model_reload_seconds=0.2))
    registry = R.RegistryConfig.of(conf)
    first, second = forest(events, seed=1), forest(events, seed=2)
    assert make_champion(registry, first) == 1
    make_topics(conf, conf.alert_topic, conf.alert_deadletter_topic, partitions=1)
    later, other = of_episode(events, LATER), of_episode(events, OTHER)
    worker = AlertWorker(AlertsConfig.of(conf))
    publish(conf, later)
    with running(worker) as errors:
        wait_for(lambda: errors or worker.stats["events"] == len(later), what="LATER")
        assert make_champion(registry, second) == 2
        time.sleep(0.5)  # > ARB_ALERT_MODEL_RELOAD_SECONDS
        publish(conf, other)
        wait_for(lambda: errors or worker.stats["events"] == len(later) + len(other),
                 what="OTHER")
        wait_for(lambda: errors or len(inbox.messages) == 2, what="two e-mails")
    assert not errors, errors
    assert worker.scorer.versions()[R.SCORER] == 2
    for episode, model, version in ((LATER, first, 1), (OTHER, second, 2)):
        docs = log_docs(conf, episode_id=episode)
        assert docs and {d["score_version"] for d in docs} == {version}, docs
        sent = next(d for d in docs if d["decision"] == "sent")
        item = claims(conf)[f"scored|{episode}"]["item"]
        trigger = next(v for _, v in of_episode(events, episode)
                       if json.loads(v).get("opportunity_id") == item["opportunity_id"])
        assert sent["score"] == item["score"] == pytest.approx(score_of(model, trigger))
        msg = next(m for m in inbox.messages if episode in str(m["X-Arbstream-Alert-Key"]))
        for body in parts(msg):
            assert f"{item['score']:.3f}" in body and f"opportunity_scorer v{version}" in body
    # every scored window is in InfluxDB ml_score, with the version that scored it
    points = ml_scores(InfluxConfig.of(conf), R.SCORER)
    windows = {(json.loads(v)["opportunity_id"]) for _, v in later + other
               if json.loads(v)["type"] == "opportunity"}
    assert len(points) == len(windows) == worker.stats["scored"]
    by_version = {p["version"] for p in points if p["pair"].startswith("BTC-USDC|")}
    assert by_version == {"1"} and {p["version"] for p in points} == {"1", "2"}
    assert all(p["f_net_bps"] == p["net_bps"] and 0 <= p["score"] <= 1 for p in points)


def test_min_score_filters_and_a_missing_champion_is_logged(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    """Without a champion a ``min_score`` rule does not fire and says why; with one, it fires
    at the first window whose score reaches the minimum, later than the plain rule."""
    inbox, port = smtp()
    records = of_episode(events, LATER)
    model = forest(events, seed=1)
    windows = [v for (_, v), e in zip(records, parsed(records), strict=True)
               if isinstance(e, OpportunityEvent) and mismatch(rule(), e) is None]
    scores = [score_of(model, v) for v in windows]
    assert scores[0] < max(scores), "premise: a later window scores higher than the first"
    minimum = min(s for s in scores if s > scores[0])
    rules = [rule(name="plain"), rule(name="strict", min_score=minimum),
             rule(name="predicted", min_predicted_bps=0.0)]

    # no champion: the plain rule alerts, the model rules are skipped with the reason
    bare = alert_settings(settings, tmp_path / "bare", port, alert_rules=rules)
    feed(bare, records)
    assert set(claims(bare)) == {f"plain|{LATER}"}
    skipped = {d["rule"]: d for d in log_docs(bare, decision="skipped")}
    assert set(skipped) == {"strict", "predicted"}
    assert skipped["strict"]["reason"] == "no_model"
    assert "no opportunity_scorer champion" in skipped["strict"]["detail"]
    assert "the rule does not fire" in skipped["strict"]["detail"]
    assert skipped["strict"]["count"] == sum(1 for e in parsed(records) if matching(rules, e))

    # a champion: strict fires at the first window scoring >= minimum; predicted still skipped
    conf = alert_settings(settings, tmp_path / "scored", port, alert_rules=rules)
    assert make_champion(R.RegistryConfig.of(conf), model) == 1
    feed(conf, records)
    state = claims(conf)
    assert set(state) == {f"plain|{LATER}", f"strict|{LATER}"}
    strict = state[f"strict|{LATER}"]["item"]
    expected = json.loads(windows[scores.index(minimum)])["opportunity_id"]
    assert strict["opportunity_id"] == expected and strict["score"] == pytest.approx(minimum)
    assert state[f"plain|{LATER}"]["item"]["opportunity_id"] == json.loads(
        windows[0])["opportunity_id"]
    [sent] = log_docs(conf, rule="strict", decision="sent")
    assert sent["score"] >= minimum and sent["score_version"] == 1
    [skip] = log_docs(conf, rule="predicted", decision="skipped")
    assert "no net_bps_regressor champion" in skip["detail"] and skip.get("score_version") == 1
    assert len(inbox.messages) == 3  # plain (bare), plain and strict (scored)


def test_a_tampered_champion_is_refused_and_the_loaded_one_kept(
    settings: Settings, tmp_path: Path, smtp: Any, events: list[tuple[bytes, bytes]],
) -> None:
    """A champion whose artifact does not match its card is not loaded: at start the rule does
    not fire (logged with the sha256 reason); promoted while another is loaded, the loaded
    one keeps scoring and the refusal is reported."""
    _, port = smtp()
    conf = alert_settings(settings, tmp_path, port,
                          alert_rules=[rule(name="strict", min_score=0.0)])
    registry = R.RegistryConfig.of(conf)
    make_champion(registry, forest(events, seed=1))
    blob = registry.models_dir / R.SCORER / "1" / "model.joblib"
    good = blob.read_bytes()
    blob.write_bytes(good + b"\0")
    feed(conf, of_episode(events, LATER))
    [skip] = log_docs(conf, decision="skipped")
    assert "champion v1 not loaded" in skip["detail"] and "sha256" in skip["detail"]
    assert claims(conf) == {}

    blob.write_bytes(good)
    clock = [0.0]
    scorer = Scorer(registry, reload_seconds=10.0, clock=lambda: clock[0])
    assert scorer.refresh() and scorer.versions()[R.SCORER] == 1
    make_champion(registry, forest(events, seed=2))
    (registry.models_dir / R.SCORER / "2" / "model.joblib").write_bytes(good)  # v1's bytes
    assert not scorer.refresh()  # within the reload interval: not even looked at
    clock[0] = 10.0
    assert not scorer.refresh()
    assert scorer.versions()[R.SCORER] == 1
    assert "v2 not loaded" in scorer.problems[R.SCORER]
    assert "still scoring with v1" in scorer.problems[R.SCORER]
    window = parse_event(next(v for _, v in of_episode(events, LATER)
                              if json.loads(v)["type"] == "opportunity")).model_dump()
    assert scorer.score(window).score.version == 1
