"""Pair-trading alerts: rules with ``min_abs_pair_z`` on the pairs job's ``pair_signal``
events (:class:`arbstream.schemas.PairSignal`, topic ``ARB_PAIRS_TOPIC``).

A pair rule fires when the pair is in its ``pairs`` filter (empty: any) and the signal's
latest ``|z| >= min_abs_pair_z``. The unit alerted at most once per rule is the spread's
current **excursion** (since its z-score last changed sign; ``signal_id`` =
``<pair>|<excursion start>``), as an episode is for spreads: the idempotency key is
``<rule>|<signal_id>``, claimed in ``alert_claims`` before the e-mail is sent, and the cooldown
(``ARB_ALERT_COOLDOWN_SECONDS``, event time) holds per rule and pair. In the claims and the
decision log a pair's legs fill the pair fields: ``symbol``/``buy_exchange`` = the ``y`` leg,
``sell_symbol``/``sell_exchange`` = the ``x`` leg, ``episode_id`` = ``signal_id``. Pair rules
send at once (no digest; the configuration refuses one).
"""

from __future__ import annotations

import datetime as dt
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any, Literal

from jinja2 import DictLoader, Environment, StrictUndefined, select_autoescape
from pydantic import BaseModel, ConfigDict

from alerts.message import MessageConfig, fmt_duration, fmt_time, header_text, message_id
from alerts.rules import alert_key
from arbstream.config import AlertRule, PairSpec
from arbstream.schemas import PairSignal
from arbstream.timestamps import to_ms

#: The Grafana dashboard of the pair-trading panels.
DASHBOARD_UID = "arbstream-analytics"
#: The link shows this much before the excursion and after the signal, ms.
LINK_PADDING_MS = 30 * 60_000


def is_pair_rule(rule: AlertRule) -> bool:
    """Whether ``rule`` is a pair-trading rule (``min_abs_pair_z`` set)."""
    return rule.min_abs_pair_z is not None


def pair_mismatch(rule: AlertRule, signal: PairSignal) -> str | None:
    """Why ``signal`` does not fire ``rule``, or ``None`` when it does."""
    if rule.min_abs_pair_z is None:
        return "not a pair-trading rule"
    if rule.pairs and signal.pair not in rule.pairs:
        return f"pair {signal.pair} not in {rule.pairs}"
    if abs(signal.z) < rule.min_abs_pair_z:
        return f"|z| {abs(signal.z):.2f} < {rule.min_abs_pair_z}"
    return None


class PairAlertItem(BaseModel):
    """One pair-trading alert: the signal's figures under one rule; stored with its claim.
    Times UTC ms, ``z`` standard deviations, ``beta`` dimensionless, ``spread`` log units,
    ``half_life_s`` seconds. ``symbol``/``buy_exchange`` are the ``y`` leg's,
    ``sell_symbol``/``sell_exchange`` the ``x`` leg's (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pair"] = "pair"
    key: str
    rule: str
    episode_id: str
    pair: str
    y: str
    x: str
    symbol: str
    sell_symbol: str
    buy_exchange: str
    sell_exchange: str
    start_ms: int
    event_ms: int
    duration_s: float
    z: float
    threshold: float
    beta: float
    alpha: float
    spread: float
    correlation: float | None = None
    adf_pvalue: float | None = None
    coint_pvalue: float | None = None
    half_life_s: float | None = None
    grafana_url: str


def grafana_link(base: str, start_ms: int, end_ms: int) -> str:
    """``<base>/d/arbstream-analytics?from=<ms>&to=<ms>`` (its pair-trading row plots every
    pair) with :data:`LINK_PADDING_MS` on each side."""
    return (f"{base}/d/{DASHBOARD_UID}?from={start_ms - LINK_PADDING_MS}"
            f"&to={end_ms + LINK_PADDING_MS}")


def build_pair_item(rule: AlertRule, signal: PairSignal, config: MessageConfig
                    ) -> PairAlertItem:
    """The alert of ``signal``'s excursion under the pair rule ``rule``.

    Raises:
        ValueError: ``rule`` is not a pair rule.
    """
    if rule.min_abs_pair_z is None:
        raise ValueError(f"rule {rule.name} is not a pair-trading rule")
    (y_exchange, y_symbol), (x_exchange, x_symbol) = PairSpec.leg(signal.y), PairSpec.leg(
        signal.x)
    start = to_ms(signal.excursion_start)
    return PairAlertItem(
        key=alert_key(rule.name, signal.signal_id), rule=rule.name,
        episode_id=signal.signal_id, pair=signal.pair, y=signal.y, x=signal.x,
        symbol=y_symbol, sell_symbol=x_symbol, buy_exchange=y_exchange,
        sell_exchange=x_exchange, start_ms=start, event_ms=signal.event_ms,
        duration_s=signal.duration_s, z=signal.z, threshold=rule.min_abs_pair_z,
        beta=signal.beta, alpha=signal.alpha, spread=signal.spread,
        correlation=signal.correlation, adf_pvalue=signal.adf_pvalue,
        coint_pvalue=signal.coint_pvalue, half_life_s=signal.half_life_s,
        grafana_url=grafana_link(config.grafana_url, start, signal.event_ms),
    )


def pair_context(item: PairAlertItem) -> dict[str, Any]:
    """The identifying and figure fields of a decision log document of a pair alert."""
    return {
        "key": item.key, "rule": item.rule, "episode_id": item.episode_id, "pair": item.pair,
        "symbol": item.symbol, "sell_symbol": item.sell_symbol,
        "buy_exchange": item.buy_exchange, "sell_exchange": item.sell_exchange,
        "event_ms": item.event_ms, "duration_s": item.duration_s, "z": item.z,
        "net_bps": None, "profit_usd": None,
    }


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def rows(item: PairAlertItem) -> list[tuple[str, str]]:
    """The e-mail's figures, formatted."""
    side = "short" if item.z > 0 else "long"
    return [
        ("Rule", f"{item.rule} (|z| >= {item.threshold:g})"),
        ("Pair", f"{item.pair}: y {item.y}, x {item.x}"),
        ("z-score", f"{item.z:+.2f} (mean reversion: {side} the spread)"),
        ("Hedge ratio β", f"{item.beta:.5f} (rolling OLS of log mids)"),
        ("Spread", f"{item.spread * 10_000:+.2f} bps (log y − α − β log x)"),
        ("Return correlation", "n/a" if item.correlation is None else f"{item.correlation:.3f}"),
        ("Engle-Granger p", _p(item.coint_pvalue)),
        ("ADF p (residual)", _p(item.adf_pvalue)),
        ("Half-life", "n/a (no mean reversion)" if item.half_life_s is None
         else fmt_duration(item.half_life_s)),
        ("Excursion since", fmt_time(item.start_ms)),
        ("Signal at", fmt_time(item.event_ms)),
    ]


TEXT = """\
{{ intro }}

{% for label, value in rows %}{{ "%-19s"|format(label + ":") }} {{ value }}
{% endfor %}
Grafana: {{ link }}
--
Sent by the arbstream alert worker. Statistics of the pairs job (docs/pairs.md), not a
trading instruction.
"""
HTML = """\
<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{{ title }}</title></head>
<body style="font-family:Arial,Helvetica,sans-serif;color:#222">
<p style="font-size:13px;color:#666">{{ intro }}</p>
<table style="border-collapse:collapse;font-size:14px">
{% for label, value in rows %}<tr><th style="text-align:left;padding:2px 12px 2px 0">\
{{ label }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
<p><a href="{{ link }}">Open in Grafana</a></p>
<p style="font-size:12px;color:#888">Sent by the arbstream alert worker. Statistics of the
pairs job (docs/pairs.md), not a trading instruction.</p>
</body></html>
"""
_ENV = Environment(loader=DictLoader({"pair.txt": TEXT, "pair.html": HTML}),
                   autoescape=select_autoescape(enabled_extensions=("html",),
                                                default_for_string=False),
                   undefined=StrictUndefined, keep_trailing_newline=True)


def pair_message(item: PairAlertItem, rule: AlertRule, config: MessageConfig,
                 now: dt.datetime | None = None) -> EmailMessage:
    """The e-mail of one pair alert to ``rule``'s recipients: ``Message-ID`` =
    :func:`alerts.message.message_id` of its key, ``X-Arbstream-Alert-Key``,
    ``Auto-Submitted``, text and HTML parts."""
    subject = f"[arbstream] {rule.name}: {item.pair} z {item.z:+.2f}, β {item.beta:.4f}"
    intro = (f"Pair-trading signal matching rule '{rule.name}': the spread of {item.pair} is "
             f"{abs(item.z):.2f} standard deviations from its rolling mean.")
    msg = EmailMessage()
    msg["From"] = config.sender
    msg["To"] = ", ".join(rule.recipients)
    msg["Subject"] = header_text(subject)
    msg["Date"] = format_datetime(now or dt.datetime.now(dt.UTC))
    msg["Message-ID"] = message_id(item.key, config)
    msg["Auto-Submitted"] = "auto-generated"
    msg["X-Arbstream-Alert-Key"] = header_text(item.key)
    ctx = {"intro": intro, "title": subject, "rows": rows(item), "link": item.grafana_url}
    msg.set_content(_ENV.get_template("pair.txt").render(**ctx))
    msg.add_alternative(_ENV.get_template("pair.html").render(**ctx), subtype="html")
    return msg
