"""``arbstream alerts`` (also ``python -m alerts``): run the worker, send a test e-mail, read
the decision log, show the rules.

Each command loads the :class:`~arbstream.config.Settings` (exit 2 when invalid) and narrows
them at once to the slices it uses (:class:`~alerts.worker.AlertsConfig`,
:class:`~arbstream.store.config.MongoConfig`).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from arbstream.config import AlertRule
from arbstream.console import console, err, fail, settings_or_exit

app = typer.Typer(help="E-mail alerts on arbitrage episodes (consumes arb.opportunities).",
                  no_args_is_help=True)

#: A real opportunity window (IAQF bars, 2023-03-11, USDC depeg) for ``alerts test-email``.
SAMPLE_EVENT = (
    '{"schema_version":1,"type":"opportunity","opportunity_id":"BTC-USDC/BTC-USD|'
    '2023-03-11T04:10:00.000Z|binance|kraken","symbol":"BTC-USDC","sell_symbol":"BTC-USD",'
    '"cross_quote":true,"window_start":"2023-03-11T04:09:55.000Z","window_end":'
    '"2023-03-11T04:10:00.000Z","buy_exchange":"binance","buy_ask":20546.06,"buy_ts":'
    '"2023-03-11T04:10:00.000Z","sell_exchange":"kraken","sell_bid":20515.0,"sell_ts":'
    '"2023-03-11T04:10:00.000Z","conversion_symbol":"USDC-USD","conversion_exchange":"kraken",'
    '"conversion_rate":1.0672358591248665,"conversion_fee":0.0026,"buy_fee":0.001,'
    '"sell_fee":0.0026,"haircut":0.0002,"gross":0.06562249160893319,"net":0.05922249160893319,'
    '"gross_bps":656.2249160893318,"net_bps":592.2249160893319,"size_base":0.5194357746083027,'
    '"size_source":"notional","expected_profit":632.04366711775,"profit_currency":"USDC",'
    '"usd_rate":0.937,"expected_profit_usd":592.2249160893318,"is_opportunity":true,'
    '"episode_id":"BTC-USDC/BTC-USD|binance|kraken|2023-03-11T03:59:59.000Z",'
    '"spread_mean_bps":662.460933425036,"spread_std_bps":43.31152944442011,'
    '"spread_z":-1.6216471280663287,"anomaly":false}'
)


def _logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("pymongo", "tenacity"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@app.command()
def run(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log every decision")] = False,
) -> None:
    """Consume ARB_ALERT_TOPIC in group ARB_ALERT_GROUP_ID and e-mail matching episodes until
    SIGINT/SIGTERM (then commit, send queued digests and exit 0). Exit 2: invalid
    configuration; exit 1: Kafka or MongoDB failure (offsets of unhandled events are not
    committed; restart it)."""
    from alerts.worker import AlertsConfig, AlertWorker, check_config

    config = AlertsConfig.of(settings_or_exit())
    try:
        check_config(config)
    except ValueError as exc:
        err.print("[red]invalid configuration:[/red] " + escape(str(exc)))
        raise typer.Exit(2) from None
    _logging(verbose)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger("alerts").info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    worker = AlertWorker(config)
    try:
        worker.run(stop)
    except Exception as exc:  # infrastructure failure: exit 1, uncommitted events re-read
        logging.getLogger("alerts").exception("alert worker failed")
        raise fail(exc) from None
    finally:
        worker.store.close()


@app.command("test-email")
def test_email(
    to: Annotated[list[str] | None, typer.Option(
        "--to", help="Recipient (repeatable); default: the rule's recipients")] = None,
    rule: Annotated[str | None, typer.Option(
        help="Use this rule's name and recipients; default: the first rule")] = None,
) -> None:
    """Send one sample alert (a real 2023-03-11 opportunity window) through the configured
    SMTP server, with retries, to check the transport and the rendering. Nothing is logged
    to MongoDB. Exit 1 when it is not delivered."""
    from alerts.events import parse_event
    from alerts.message import alert_message, build_item
    from alerts.smtp import SmtpError, SmtpTransport
    from alerts.worker import AlertsConfig

    config = AlertsConfig.of(settings_or_exit())
    rules = {r.name: r for r in config.rules}
    if rule is not None and rule not in rules:
        err.print(f"[red]no rule named {escape(rule)!r}[/red]; rules: {sorted(rules)}")
        raise typer.Exit(2)
    base = rules[rule] if rule else next(iter(rules.values()), None)
    recipients = list(to or (base.recipients if base else []))
    if not recipients:
        err.print("[red]no recipient:[/red] pass --to or configure a rule")
        raise typer.Exit(2)
    test_rule = AlertRule(name=f"test-{base.name}" if base else "test", recipients=recipients)
    _logging(False)
    item = build_item(test_rule, parse_event(SAMPLE_EVENT), None, config.message)
    msg = alert_message(item, test_rule, config.message)
    msg.replace_header("Subject", "[TEST] " + msg["Subject"])
    smtp = config.smtp
    try:
        result = SmtpTransport(smtp).send(msg)
    except SmtpError as exc:
        kind = "permanent" if exc.permanent else "transient"
        err.print(f"[red]not delivered[/red] ({kind}, {exc.attempts} attempt(s)): "
                  + escape(str(exc)))
        raise typer.Exit(1) from None
    console.print(f"delivered to {', '.join(recipients)} via {smtp.host}:{smtp.port} "
                  f"({smtp.security}) in {result.attempts} "
                  f"attempt(s)" + (f"; refused: {result.refused}" if result.refused else ""))


def _without_addresses(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``docs`` with every e-mail address (recipients, refused, error texts) as its HMAC
    token (``ARB_ID_HASH_KEY``), or ``redacted`` (said on stderr) when no key is set."""
    from arbstream.privacy import tokenize_rows

    key = settings_or_exit().id_hash_key
    out = tokenize_rows(docs, key, redact=True)
    if key is None and out != docs:
        err.print("e-mail addresses redacted: set ARB_ID_HASH_KEY to show them as tokens "
                  "(docs/privacy.md)")
    return out


@app.command("log")
def log_cmd(
    limit: Annotated[int, typer.Option(help="At most this many (0: all)")] = 20,
    rule: Annotated[str | None, typer.Option(help="Only this rule")] = None,
    decision: Annotated[str | None, typer.Option(
        help="sent, queued, suppressed, skipped, failed or retracted")] = None,
    episode: Annotated[str | None, typer.Option(help="Only this episode id")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines")] = False,
) -> None:
    """The alert decision log (MongoDB ``alerts``), latest first."""
    from arbstream.store.config import MongoConfig
    from arbstream.store.mongo.alert_log import AlertStore

    with AlertStore(MongoConfig.of(settings_or_exit())) as store:
        docs = store.decisions(limit, rule, decision, episode)
    docs = _without_addresses(docs)
    if as_json:
        for doc in docs:
            console.print_json(json.dumps(doc, default=str))
        return
    table = Table("last (UTC)", "decision", "reason", "rule", "episode", "net bps", "score",
                  "count", "detail / error")
    for d in docs:
        score = (f"{d['score']:.3f} (v{d.get('score_version')})"
                 if d.get("score") is not None else "-")
        table.add_row(
            d["last_at"].strftime("%Y-%m-%d %H:%M:%S"), d["decision"], d["reason"], d["rule"],
            d["episode_id"], f"{d['net_bps']:.1f}" if d.get("net_bps") is not None else "-",
            score, str(d.get("count", 1)), escape(str(d.get("error") or d.get("detail") or "")),
        )
    console.print(table)


@app.command()
def rules() -> None:
    """The configured rules, as validated."""
    from alerts.rules import rule_stage
    from alerts.worker import AlertsConfig

    config = AlertsConfig.of(settings_or_exit())
    if not config.rules:
        console.print("no alert rules configured (ARB_ALERT_RULES)")
        return
    table = Table("name", "symbols", "buy", "sell", "cross-quote", "min net bps",
                  "min profit USD", "min duration s", "min score", "min predicted bps", "stage",
                  "digest", "recipients")

    def optional(value: float | None) -> str:
        return "-" if value is None else f"{value:g}"

    for r in config.rules:
        table.add_row(r.name, ",".join(r.symbols) or "any", ",".join(r.buy_exchanges) or "any",
                      ",".join(r.sell_exchanges) or "any", str(r.cross_quote),
                      f"{r.min_net_bps:g}", f"{r.min_profit_usd:g}", f"{r.min_duration_s:g}",
                      optional(r.min_score), optional(r.min_predicted_bps), rule_stage(r),
                      str(r.digest), ", ".join(r.recipients))
    console.print(table)
    smtp = config.smtp
    console.print(f"cooldown {config.cooldown_seconds:g} s (event time), digest every "
                  f"{config.digest_seconds:g} s, SMTP {smtp.host}:{smtp.port} "
                  f"({smtp.security}); models from {config.registry.models_dir}, champions "
                  f"looked up every {config.model_reload_seconds:g} s")
