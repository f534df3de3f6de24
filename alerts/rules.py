"""Which events match which alert rule.

A rule (:class:`arbstream.config.AlertRule`) is checked against one event at a time, on the
figures the event gives of its episode *so far*:

* an ``opportunity`` event (one window): duration = window end − episode start (the start is in
  the ``episode_id``), net = the window's ``net_bps``, profit = the window's expected profit;
* an ``episode`` event (``opened`` / ``closed``): its ``duration_s``, ``peak_net_bps`` and the
  expected profit of its best window.

An episode is alertable under a rule at the first event where every filter matches and every
figure reaches the rule's minimum; it is alerted at most once per rule (key
:func:`alert_key`). Profits are compared in USD; an unknown USD profit fails a positive
``min_profit_usd``.

Opportunity events carry a ``stage`` (:mod:`alerts.events`). A rule's ``opportunity_stage``
(:func:`rule_stage`) says which it fires on: ``early`` (the default) fires on the first early
*or* final window that matches (an early version can be missing or not match while the final
one does; events of older streams have no stage and count as final), ``final`` only on final
windows. A ``retracted`` window never fires (:func:`fires_on`); the worker logs it instead.
Episode events are not staged and fire under every rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from alerts.events import stage_of
from arbstream.config import AlertRule
from arbstream.schemas import EpisodeEvent, OpportunityEvent

Event = OpportunityEvent | EpisodeEvent
RuleStage = Literal["early", "final"]
#: ``opportunity_stage`` of a rule that does not set it.
DEFAULT_RULE_STAGE: RuleStage = "early"


@dataclass(frozen=True)
class Figures:
    """What a rule compares: ``duration_s`` (s), ``net_bps`` (bps), ``profit_usd`` (USD or
    ``None`` when unknown)."""

    duration_s: float
    net_bps: float
    profit_usd: float | None


def figures(event: Event) -> Figures:
    """The episode's figures so far as seen in one event (see the module docstring)."""
    if isinstance(event, OpportunityEvent):
        return Figures(event.duration_s, event.net_bps, event.profit_usd)
    return Figures(event.duration_s, event.peak_net_bps, event.profit_usd)


def alert_key(rule: str, episode_id: str) -> str:
    """The idempotency key of an alert: ``<rule>|<episode_id>``."""
    return f"{rule}|{episode_id}"


def rule_stage(rule: AlertRule) -> RuleStage:
    """Which opportunity events ``rule`` fires on: its ``opportunity_stage`` (``early`` or
    ``final``), :data:`DEFAULT_RULE_STAGE` when the rule model has no such field.

    Raises:
        ValueError: any other value.
    """
    stage = getattr(rule, "opportunity_stage", None) or DEFAULT_RULE_STAGE
    if stage not in ("early", "final"):
        raise ValueError(f"alert rule {rule.name!r}: opportunity_stage must be 'early' or "
                         f"'final', got {stage!r}")
    return stage


def fires_on(rule: AlertRule, event: Event) -> bool:
    """Whether ``event``'s stage can fire ``rule`` (figures and filters aside): never a
    retracted window, an early one only under an ``early`` rule."""
    stage = stage_of(event)
    if stage == "retracted":
        return False
    return stage == "final" or rule_stage(rule) == "early"


def filter_mismatch(rule: AlertRule, event: Event) -> str | None:
    """Why ``event``'s pair is outside ``rule``'s filters (symbols, exchanges, cross-quote),
    or ``None`` when the rule watches it. A pair-trading rule (``min_abs_pair_z``,
    :mod:`alerts.pair_alerts`) watches no spread."""
    if rule.min_abs_pair_z is not None:
        return "a pair-trading rule (min_abs_pair_z): fires on pair_signal events only"
    if rule.symbols and event.symbol not in rule.symbols and event.sell_symbol not in rule.symbols:
        return f"symbol {event.pair_symbol} not in {rule.symbols}"
    if rule.buy_exchanges and event.buy_exchange not in rule.buy_exchanges:
        return f"buy exchange {event.buy_exchange} not in {rule.buy_exchanges}"
    if rule.sell_exchanges and event.sell_exchange not in rule.sell_exchanges:
        return f"sell exchange {event.sell_exchange} not in {rule.sell_exchanges}"
    if event.cross_quote and not rule.cross_quote:
        return "cross-quote pairs excluded"
    return None


def mismatch(rule: AlertRule, event: Event) -> str | None:
    """Why ``event`` does not make its episode alertable under ``rule``, or ``None`` when it
    does. Filters first (:func:`filter_mismatch`), then the minimums. Stages are not looked at
    (:func:`fires_on`)."""
    why = filter_mismatch(rule, event)
    if why is not None:
        return why
    f = figures(event)
    if f.net_bps < rule.min_net_bps:
        return f"net {f.net_bps:.2f} bps < {rule.min_net_bps}"
    if rule.min_profit_usd > 0 and (f.profit_usd is None or f.profit_usd < rule.min_profit_usd):
        return f"profit {f.profit_usd} USD < {rule.min_profit_usd}"
    if f.duration_s < rule.min_duration_s:
        return f"duration {f.duration_s:g} s < {rule.min_duration_s}"
    return None


def matching(rules: list[AlertRule], event: Event) -> list[AlertRule]:
    """The rules that ``event`` fires (its stage, filters and minimums), in configuration
    order."""
    return [r for r in rules if fires_on(r, event) and mismatch(r, event) is None]
