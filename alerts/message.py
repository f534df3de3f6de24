"""The alert e-mail: one :class:`AlertItem` per (rule, episode), rendered as a multipart
``text/plain`` + ``text/html`` :class:`email.message.EmailMessage` (jinja2 templates, HTML
auto-escaped), one item per e-mail or several in a digest.

Every e-mail carries a deterministic ``Message-ID`` derived from its idempotency key
(:func:`message_id`), ``X-Arbstream-Alert-Key`` (one line per alert key),
``Auto-Submitted: auto-generated`` (RFC 3834) and a Grafana link to the ``arbstream-monitor``
dashboard around the episode.

When champion models scored the window (:mod:`alerts.scoring`), the e-mail shows the
opportunity scorer's probability and the regressor's predicted net bps with their model
versions.

Header values built from event fields (the subject, the alert keys) go through
:func:`header_text`: events with control characters are rejected before they get here
(:mod:`alerts.events`), and an item from elsewhere (a claim stored by an older worker) cannot
add a header line or stop the worker either.

What an e-mail needs of the configuration is :class:`MessageConfig` (the From address and the
Grafana base URL), built once with :meth:`MessageConfig.of`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import unicodedata
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import quote

from jinja2 import DictLoader, Environment, StrictUndefined, select_autoescape
from pydantic import BaseModel, ConfigDict

from alerts.events import FORBIDDEN_CATEGORIES, stage_of
from alerts.rules import alert_key, figures
from alerts.scoring import ModelScores
from arbstream.config import AlertRule
from arbstream.schemas import EpisodeEvent, OpportunityEvent, episode_start_ms
from arbstream.store.models import REGRESSOR, SCORER

if TYPE_CHECKING:
    from arbstream.config import Settings

DASHBOARD_UID = "arbstream-monitor"
#: The Grafana link shows the episode with this much context on each side, ms.
LINK_PADDING_MS = 5 * 60_000
#: Domain of the ``Message-ID`` when the From address has none.
DEFAULT_DOMAIN = "arbstream.local"


@dataclass(frozen=True)
class MessageConfig:
    """What the e-mails need of :class:`~arbstream.config.Settings`: ``sender`` the ``From``
    header (``ARB_ALERT_FROM``, e.g. ``arbstream <alerts@arbstream.local>``), ``grafana_url``
    the Grafana base URL of the links (``ARB_GRAFANA_URL``, without a trailing slash)."""

    sender: str
    grafana_url: str

    @classmethod
    def of(cls, settings: Settings) -> MessageConfig:
        """The message slice of ``settings`` (``alert_from``, ``grafana_url``)."""
        return cls(sender=settings.alert_from, grafana_url=settings.grafana_url.rstrip("/"))

    @property
    def domain(self) -> str:
        """The domain of the sender's address (:data:`DEFAULT_DOMAIN` when it has none)."""
        return parseaddr(self.sender)[1].rpartition("@")[2] or DEFAULT_DOMAIN


class AlertItem(BaseModel):
    """Everything one alert says about one episode under one rule; stored with its claim so a
    digest survives a restart. Prices are in each leg's quote currency, fees fractions,
    ``*_bps`` basis points, sizes base units, times UTC ms, durations seconds. The leg fields
    (``buy_ask`` … ``window_end_ms``) come from the episode's latest opportunity window and
    are ``None`` when it is not known (an episode event seen before any of its windows).
    ``score`` (probability, 0..1) and ``predicted_bps`` (net bps at ``predicted_horizon_s``)
    are the champion models' outputs for that window, with their registry versions
    (``None``: not scored)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    rule: str
    episode_id: str
    trigger: Literal["opportunity", "opened", "closed"]
    #: stage of the triggering opportunity window (``None``: an episode event)
    stage: Literal["early", "final"] | None = None
    status: Literal["open", "closed"]
    symbol: str
    sell_symbol: str
    cross_quote: bool
    buy_exchange: str
    sell_exchange: str
    start_ms: int
    event_ms: int
    duration_s: float
    net_bps: float
    peak_net_bps: float | None = None
    size_base: float | None = None
    size_source: str | None = None
    expected_profit: float | None = None
    profit_currency: str | None = None
    profit_usd: float | None = None
    opportunity_id: str | None = None
    window_end_ms: int | None = None
    buy_ask: float | None = None
    sell_bid: float | None = None
    buy_fee: float | None = None
    sell_fee: float | None = None
    haircut: float | None = None
    gross_bps: float | None = None
    window_net_bps: float | None = None
    conversion_symbol: str | None = None
    conversion_exchange: str | None = None
    conversion_rate: float | None = None
    conversion_fee: float | None = None
    score: float | None = None
    score_version: int | None = None
    predicted_bps: float | None = None
    predicted_version: int | None = None
    predicted_horizon_s: float | None = None
    grafana_url: str

    @property
    def pair_symbol(self) -> str:
        return f"{self.symbol}/{self.sell_symbol}" if self.cross_quote else self.symbol

    @property
    def base(self) -> str:
        return self.symbol.split("-")[0]


def grafana_link(base: str, symbol: str, start_ms: int, end_ms: int) -> str:
    """``<base>/d/arbstream-monitor?var-symbol=<symbol>&from=<ms>&to=<ms>`` with
    :data:`LINK_PADDING_MS` on each side of ``[start_ms, end_ms]``."""
    return (f"{base}/d/{DASHBOARD_UID}?var-symbol={quote(symbol, safe='')}"
            f"&from={start_ms - LINK_PADDING_MS}&to={end_ms + LINK_PADDING_MS}")


def build_item(
    rule: AlertRule,
    event: OpportunityEvent | EpisodeEvent,
    legs: OpportunityEvent | None,
    config: MessageConfig,
    scores: ModelScores | None = None,
) -> AlertItem:
    """The alert of ``event``'s episode under ``rule``.

    Args:
        legs: the episode's latest opportunity window (``event`` itself for an opportunity
            event), for prices and fees; ``None`` when unknown.
        config: its ``grafana_url`` is the base of the item's Grafana link.
        scores: the champion models' outputs for that window (``None``: not scored).

    Raises:
        pydantic.ValidationError: the event's fields do not make a valid item.
    """
    if isinstance(event, OpportunityEvent):
        legs = event
    start = episode_start_ms(event.episode_id)
    f = figures(event)
    fields: dict[str, Any] = {}
    if legs is not None:
        fields = {
            "opportunity_id": legs.opportunity_id, "window_end_ms": legs.event_ms,
            "buy_ask": legs.buy_ask, "sell_bid": legs.sell_bid, "buy_fee": legs.buy_fee,
            "sell_fee": legs.sell_fee, "haircut": legs.haircut, "gross_bps": legs.gross_bps,
            "window_net_bps": legs.net_bps, "conversion_symbol": legs.conversion_symbol,
            "conversion_exchange": legs.conversion_exchange,
            "conversion_rate": legs.conversion_rate, "conversion_fee": legs.conversion_fee,
        }
    if scores is not None:
        fields.update(scores.log_fields())
        if scores.predicted.value is not None:
            fields["predicted_horizon_s"] = scores.predicted.horizon_s
    is_episode = isinstance(event, EpisodeEvent)
    return AlertItem(
        key=alert_key(rule.name, event.episode_id), rule=rule.name,
        episode_id=event.episode_id,
        trigger=event.event if is_episode else "opportunity",
        stage=None if is_episode else stage_of(event),
        status=event.status if is_episode else "open",
        symbol=event.symbol, sell_symbol=event.sell_symbol, cross_quote=event.cross_quote,
        buy_exchange=event.buy_exchange, sell_exchange=event.sell_exchange,
        start_ms=start, event_ms=event.event_ms, duration_s=f.duration_s, net_bps=f.net_bps,
        peak_net_bps=event.peak_net_bps if is_episode else None,
        size_base=event.size_base, size_source=event.size_source,
        expected_profit=event.expected_profit, profit_currency=event.profit_currency,
        profit_usd=event.profit_usd,
        grafana_url=grafana_link(config.grafana_url, event.symbol, start, event.event_ms),
        **fields,
    )


# --- formatting ------------------------------------------------------------------------------

def fmt_price(value: float | None) -> str:
    """A price: 2 decimals from 1,000 up, 4 from 1, else 6 significant digits."""
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.2f}"
    if abs(value) >= 1:
        return f"{value:,.4f}"
    return f"{value:.6g}"


def fmt_fee(value: float | None) -> str:
    """A fee fraction as percent and bps, e.g. ``0.600 % (60.0 bps)``."""
    return "n/a" if value is None else f"{value * 100:.3f} % ({value * 10_000:.1f} bps)"


def fmt_bps(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f} bps"


def fmt_amount(value: float | None, unit: str | None) -> str:
    return "n/a" if value is None else f"{value:,.2f} {unit or ''}".rstrip()


def fmt_size(value: float | None, base: str) -> str:
    return "n/a" if value is None else f"{value:.6f} {base}"


def fmt_duration(seconds: float) -> str:
    """``2705 s (45 min 5 s)``; below a minute just ``42 s``."""
    whole = round(seconds)
    if whole < 60:
        return f"{seconds:g} s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = ([f"{hours} h"] if hours else []) + [f"{minutes} min", f"{secs} s"]
    return f"{seconds:g} s ({' '.join(parts)})"


def fmt_time(ms: int | None) -> str:
    if ms is None:
        return "n/a"
    t = dt.datetime.fromtimestamp(ms / 1000, dt.UTC)
    return t.strftime("%Y-%m-%d %H:%M:%S.") + f"{ms % 1000:03d} UTC"


def fmt_profit(item: AlertItem) -> str:
    text = fmt_amount(item.expected_profit, item.profit_currency)
    if item.profit_currency != "USD" and item.profit_usd is not None:
        text += f" (≈ {item.profit_usd:,.2f} USD)"
    return text


def model_rows(item: AlertItem) -> list[tuple[str, str]]:
    """The e-mail rows of the champion models' outputs (none when not scored)."""
    rows = []
    if item.score is not None:
        rows.append(("Model score", f"{item.score:.3f} (probability still executable; "
                                    f"{SCORER} v{item.score_version})"))
    if item.predicted_bps is not None:
        rows.append(("Predicted net", f"{fmt_bps(item.predicted_bps)} in "
                                      f"{item.predicted_horizon_s or 0:g} s "
                                      f"({REGRESSOR} v{item.predicted_version})"))
    return rows


def view(item: AlertItem) -> dict[str, Any]:
    """The template context of one item: every figure already formatted."""
    quote_buy, quote_sell = item.symbol.split("-")[1], item.sell_symbol.split("-")[1]
    legs = [
        {"side": "Buy", "exchange": item.buy_exchange, "symbol": item.symbol,
         "price": fmt_price(item.buy_ask), "unit": quote_buy, "price_name": "ask",
         "fee": fmt_fee(item.buy_fee)},
        {"side": "Sell", "exchange": item.sell_exchange, "symbol": item.sell_symbol,
         "price": fmt_price(item.sell_bid), "unit": quote_sell, "price_name": "bid",
         "fee": fmt_fee(item.sell_fee)},
    ]
    rows = [
        ("Rule", item.rule),
        ("Episode", f"{item.episode_id} ({item.status})"),
        *([("Window stage", "early (provisional: may still change or be retracted)")]
          if item.stage == "early" else []),
        ("Pair", f"{item.pair_symbol}: buy on {item.buy_exchange}, sell on {item.sell_exchange}"),
        ("Net spread", fmt_bps(item.net_bps)
         + (" (episode peak)" if item.peak_net_bps is not None else "")),
        ("Size", fmt_size(item.size_base, item.base)
         + (f" ({item.size_source})" if item.size_source else "")),
        ("Expected profit", fmt_profit(item)),
        *model_rows(item),
        ("Duration", fmt_duration(item.duration_s)),
        ("Episode start", fmt_time(item.start_ms)),
        ("Last seen", fmt_time(item.event_ms)),
    ]
    window = [
        ("Prices at", fmt_time(item.window_end_ms)),
        ("Gross spread", fmt_bps(item.gross_bps)),
        ("Net spread (window)", fmt_bps(item.window_net_bps)),
        ("Haircut", fmt_fee(item.haircut)),
    ]
    if item.conversion_rate is not None:
        window.append(("Conversion", f"{item.conversion_symbol} on {item.conversion_exchange} "
                       f"at {item.conversion_rate:.6f}, fee {fmt_fee(item.conversion_fee)}"))
    headline = (f"{item.pair_symbol} {item.buy_exchange} → {item.sell_exchange}: "
                f"{fmt_bps(item.net_bps)}, {fmt_profit(item)} expected, "
                f"{fmt_duration(item.duration_s)}")
    return {"item": item, "headline": headline, "rows": rows, "legs": legs, "window": window,
            "link": item.grafana_url, "known_legs": item.buy_ask is not None}


TEXT_ONE = """\
{{ v.headline }}

{% for label, value in v.rows %}{{ "%-16s"|format(label + ":") }} {{ value }}
{% endfor %}
{% if v.known_legs %}Legs:
{% for leg in v.legs %}  {{ "%-4s"|format(leg.side) }} {{ leg.symbol }} on {{ leg.exchange }} at \
{{ leg.price }} {{ leg.unit }} ({{ leg.price_name }}), taker fee {{ leg.fee }}
{% endfor %}{% for label, value in v.window %}  {{ "%-20s"|format(label + ":") }} {{ value }}
{% endfor %}{% else %}Legs: prices not known yet (no opportunity window of this episode seen).
{% endif %}
Grafana: {{ v.link }}
"""

HTML_BLOCK = """\
<h2 style="margin:16px 0 8px;font-size:16px">{{ v.headline }}</h2>
<table style="border-collapse:collapse;font-size:14px">
{% for label, value in v.rows %}<tr><th style="text-align:left;padding:2px 12px 2px 0">\
{{ label }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
{% if v.known_legs %}
<table style="border-collapse:collapse;font-size:14px;margin-top:8px" border="1" cellpadding="4">
<tr><th>Leg</th><th>Exchange</th><th>Symbol</th><th>Price</th><th>Taker fee</th></tr>
{% for leg in v.legs %}<tr><td>{{ leg.side }}</td><td>{{ leg.exchange }}</td>\
<td>{{ leg.symbol }}</td><td>{{ leg.price }} {{ leg.unit }} ({{ leg.price_name }})</td>\
<td>{{ leg.fee }}</td></tr>
{% endfor %}</table>
<table style="border-collapse:collapse;font-size:14px;margin-top:8px">
{% for label, value in v.window %}<tr><th style="text-align:left;padding:2px 12px 2px 0">\
{{ label }}</th><td>{{ value }}</td></tr>
{% endfor %}</table>
{% else %}<p>Legs: prices not known yet (no opportunity window of this episode seen).</p>
{% endif %}
<p><a href="{{ v.link }}">Open in Grafana</a></p>
"""

HTML_PAGE = """\
<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{{ title }}</title></head>
<body style="font-family:Arial,Helvetica,sans-serif;color:#222">
<p style="font-size:13px;color:#666">{{ intro }}</p>
{% for v in views %}{% include "block.html" %}{% if not loop.last %}<hr>{% endif %}{% endfor %}
<p style="font-size:12px;color:#888">Sent by the arbstream alert worker. Figures are model
estimates from top-of-book quotes after taker fees and haircuts, not executable quotes.</p>
</body></html>
"""

TEXT_PAGE = """\
{{ intro }}

{% for v in views %}{% include "block.txt" %}{% if not loop.last %}
----------------------------------------------------------------------
{% endif %}{% endfor %}
--
Sent by the arbstream alert worker. Figures are model estimates from top-of-book quotes after
taker fees and haircuts, not executable quotes.
"""

_ENV = Environment(
    loader=DictLoader({"block.txt": TEXT_ONE, "block.html": HTML_BLOCK,
                       "page.txt": TEXT_PAGE, "page.html": HTML_PAGE}),
    autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
    undefined=StrictUndefined, keep_trailing_newline=True,
)


# --- messages --------------------------------------------------------------------------------

def message_id(key: str, config: MessageConfig) -> str:
    """Deterministic ``Message-ID`` of an idempotency key: the same alert always gets the same
    id, so a resend is recognisable as a duplicate by mail clients and archives. Its domain is
    :attr:`MessageConfig.domain`."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    return f"<alert.{digest}@{config.domain}>"


def digest_id(rule: str, keys: list[str]) -> str:
    """Deterministic id of a digest of ``keys`` under ``rule``."""
    return hashlib.sha256("\n".join([rule, *sorted(keys)]).encode()).hexdigest()[:32]


def header_text(value: str) -> str:
    """``value`` with every character that could end or corrupt a header line (control, format
    and separator characters, lone surrogates) replaced by U+FFFD."""
    return "".join("\ufffd" if unicodedata.category(ch) in FORBIDDEN_CATEGORIES else ch
                   for ch in value)


def _message(config: MessageConfig, recipients: list[str], subject: str, intro: str,
             items: list[AlertItem], mid: str, now: dt.datetime | None) -> EmailMessage:
    views = [view(i) for i in items]
    msg = EmailMessage()
    msg["From"] = config.sender
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = header_text(subject)
    msg["Date"] = format_datetime(now or dt.datetime.now(dt.UTC))
    msg["Message-ID"] = mid
    msg["Auto-Submitted"] = "auto-generated"
    for item in items:
        msg["X-Arbstream-Alert-Key"] = header_text(item.key)
    ctx = {"views": views, "intro": intro, "title": subject}
    msg.set_content(_ENV.get_template("page.txt").render(**ctx))
    msg.add_alternative(_ENV.get_template("page.html").render(**ctx), subtype="html")
    return msg


def alert_message(item: AlertItem, rule: AlertRule, config: MessageConfig,
                  now: dt.datetime | None = None) -> EmailMessage:
    """The e-mail of one alert to ``rule``'s recipients, from ``config.sender``,
    ``Message-ID`` = :func:`message_id` of its key, ``Date`` = ``now`` (default: the current
    UTC time)."""
    subject = (f"[arbstream] {rule.name}: {item.pair_symbol} {item.buy_exchange}→"
               f"{item.sell_exchange} {fmt_bps(item.net_bps)}, {fmt_profit(item)}, "
               f"{round(item.duration_s)} s")
    trigger = (f"an{' early' if item.stage == 'early' else ''} opportunity window"
               if item.trigger == "opportunity" else f"its {item.trigger} event")
    intro = (f"Arbitrage episode matching rule '{rule.name}' (episode {item.status}, "
             f"triggered by {trigger}).")
    return _message(config, rule.recipients, subject, intro, [item],
                    message_id(item.key, config), now)


def digest_message(items: list[AlertItem], rule: AlertRule, config: MessageConfig,
                   now: dt.datetime | None = None) -> EmailMessage:
    """One e-mail for several alerts of ``rule`` (best net first), from ``config.sender``,
    ``Message-ID`` from :func:`digest_id` of their keys, ``Date`` = ``now`` (default: the
    current UTC time).

    Raises:
        ValueError: no items.
    """
    if not items:
        raise ValueError("a digest needs at least one alert")
    ordered = sorted(items, key=lambda i: (-i.net_bps, i.key))
    did = digest_id(rule.name, [i.key for i in items])
    subject = (f"[arbstream] {rule.name}: digest of {len(items)} episode"
               f"{'s' if len(items) != 1 else ''}, best {ordered[0].pair_symbol} "
               f"{fmt_bps(ordered[0].net_bps)}")
    intro = (f"{len(items)} arbitrage episode{'s' if len(items) != 1 else ''} matched rule "
             f"'{rule.name}' since the last digest.")
    msg = _message(config, rule.recipients, subject, intro, ordered,
                   message_id("digest|" + did, config), now)
    msg["X-Arbstream-Digest-Id"] = did
    return msg
