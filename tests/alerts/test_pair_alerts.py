"""Pair-trading alerts end to end: the pairs job (ml/pairs.py) on the real IAQF lake publishes
``pair_signal`` events to the real Kafka broker; the real alert worker e-mails the pair rules
that fire through a real SMTP server (aiosmtpd) and logs to the real MongoDB-protocol server.

The expected z-scores are recomputed here with statsmodels / pandas from the lake's Parquet
files, not taken from the job."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from statsmodels.regression.rolling import RollingOLS

from alerts.message import MessageConfig, message_id
from alerts.pair_alerts import PairAlertItem
from alerts.rules import alert_key
from alerts.worker import AlertsConfig, AlertWorker
from arbstream.config import AlertRule, PairSpec, Settings
from ml import pairs as P
from tests.alerts import test_alerts
from tests.alerts.test_alerts import (
    alert_settings,
    claims,
    log_docs,
    make_topics,
    parts,
    running,
    wait_for,
)
from tests.ml.test_pairs import lake_mids

PAIRS = [PairSpec(name="btcusd-coinbase-kraken", y="coinbase:BTC-USD", x="kraken:BTC-USD"),
         PairSpec(name="btc-binance-usdt-coinbase-usd", y="binance:BTC-USDT",
                  x="coinbase:BTC-USD")]
WINDOW, Z_WINDOW = 60, 30
#: The real SMTP server fixture of the alert tests (aiosmtpd).
smtp = test_alerts.smtp


def last_z(lake_dir: Path, pair: PairSpec) -> tuple[float, pd.Timestamp, pd.Timestamp]:
    """The last z-score of ``pair``, the window end where its sign last changed and the last
    window end."""
    mids = np.log(lake_mids(lake_dir, pair))
    params = RollingOLS(mids["y"], sm.add_constant(mids["x"]), window=WINDOW).fit().params
    spread = mids["y"] - params["const"].shift(1) - params["x"].shift(1) * mids["x"]
    z = ((spread - spread.rolling(Z_WINDOW).mean()) / spread.rolling(Z_WINDOW).std()).dropna()
    sign = np.sign(z.to_numpy())
    flips = z.index[1:][sign[1:] != sign[:-1]]
    return float(z.iloc[-1]), flips[-1], z.index[-1]


def test_pair_rule_emails_once_per_excursion(settings: Settings, tmp_path: Path, smtp: Any,
                                             iaqf_lake: Path) -> None:
    z = {p.name: last_z(iaqf_lake, p)[:2] for p in PAIRS}
    last = {p.name: last_z(iaqf_lake, p)[2] for p in PAIRS}
    hot = max(PAIRS, key=lambda p: abs(z[p.name][0]))
    cold = min(PAIRS, key=lambda p: abs(z[p.name][0]))
    threshold = (abs(z[hot.name][0]) + abs(z[cold.name][0])) / 2
    assert abs(z[cold.name][0]) < threshold < abs(z[hot.name][0])
    inbox, port = smtp()
    uid = uuid.uuid4().hex[:8]
    rules = [
        AlertRule(name="pair-z", min_abs_pair_z=threshold, recipients=["quant@example.com"]),
        AlertRule(name="pair-z-cold-only", min_abs_pair_z=threshold, pairs=[cold.name],
                  recipients=["quant@example.com"]),
        AlertRule(name="episodes", min_net_bps=-1e9, recipients=["desk@example.com"]),
    ]
    conf = alert_settings(settings, tmp_path, port, lake_dir=iaqf_lake, pairs=PAIRS,
                          pairs_window=WINDOW, pairs_z_window=Z_WINDOW,
                          pairs_topic=f"pairs.test.{uid}", alert_rules=rules)
    make_topics(conf, conf.alert_topic, conf.alert_deadletter_topic, conf.pairs_topic,
                partitions=1)
    first = P.run(conf)
    assert first.signals == 2 and not first.errors
    worker = AlertWorker(AlertsConfig.of(conf))
    with running(worker) as errors:
        wait_for(lambda: worker.stats["pair_signals"] == 2, what="both signals")
        P.run(conf)  # the same data again: the same excursion, not e-mailed twice
        wait_for(lambda: worker.stats["pair_signals"] == 4, what="the repeated signals")
        wait_for(lambda: worker.stats["suppressed_duplicate"] == 1, what="the duplicate")
    assert not errors
    z_hot, flip = z[hot.name]
    signal_id = f"{hot.name}|{flip.strftime('%Y-%m-%dT%H:%M:%S.%f')[:-3]}Z"
    key = alert_key("pair-z", signal_id)
    [msg] = inbox.messages
    assert inbox.keys() == [key] and msg["To"] == "quant@example.com"
    assert msg["Message-ID"] == message_id(key, MessageConfig.of(conf))
    assert f"z {z_hot:+.2f}" in msg["Subject"] and hot.name in msg["Subject"]
    text, html = parts(msg)
    for body in (text, html):
        assert f"{z_hot:+.2f}" in body and hot.y in body and hot.x in body
        assert "short the spread" in body if z_hot > 0 else "long the spread" in body
    start, end = (int(t.timestamp() * 1000) for t in (flip, last[hot.name]))
    assert (f"http://grafana.test:3000/d/arbstream-analytics?from={start - 1_800_000}"
            f"&to={end + 1_800_000}") in text
    claim = claims(conf)[key]
    assert claim["state"] == "sent" and claim["episode_id"] == signal_id
    item = PairAlertItem.model_validate(claim["item"])
    assert item.z == pytest.approx(z_hot, rel=1e-6)
    decisions = {(d["rule"], d["decision"], d["reason"]): d for d in log_docs(conf)}
    assert set(decisions) == {("pair-z", "sent", "delivered"),
                              ("pair-z", "suppressed", "duplicate")}
    assert decisions[("pair-z", "sent", "delivered")]["z"] == pytest.approx(z_hot, rel=1e-6)
