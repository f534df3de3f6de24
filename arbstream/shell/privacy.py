"""``arbstream privacy``: the privacy budget, differentially private releases, identifier
tokens, and the coverage (fairness) check of the market data. See docs/privacy.md.

A shell module: it composes the alerts component (decision counts), the store's budget
accountant and the ML component's coverage check, which do not import each other.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from arbstream.console import console, err, fail, settings_or_exit
from arbstream.console import time_option as _time

app = typer.Typer(help="Privacy (DP releases, budget, identifier tokens) and the coverage "
                  "(fairness) check.", no_args_is_help=True)


class Query(StrEnum):
    """The aggregates that can be released with differential privacy."""

    alert_decisions = "alert-decisions"
    backtest_trades = "backtest-trades"


class GroupBy(StrEnum):
    exchange = "exchange"
    symbol = "symbol"


@app.command()
def budget(
    scope: Annotated[str, typer.Option(help="The budget (one per dataset / period)")] =
    "default",
    limit: Annotated[int, typer.Option(min=0, help="Latest releases shown (0: all)")] = 10,
) -> None:
    """Total, spent and remaining epsilon of a privacy budget, and its latest releases."""
    from pymongo.errors import PyMongoError

    from arbstream.store.mongo import privacy_budget as pb

    conf = pb.DpConfig.of(settings_or_exit())
    try:
        state = pb.budget(conf, scope)
        made = pb.releases(conf, scope, limit)
    except (PyMongoError, pb.BudgetMismatch, ValueError) as exc:
        raise fail(exc) from None
    note = "" if conf.enabled else "  (releases disabled: ARB_DP_ENABLED=false)"
    console.print(f"budget {state.scope!r}: total ε {state.total:g}, spent {state.spent:g}, "
                  f"remaining {state.remaining:g}, {state.releases} release(s){note}")
    if made:
        table = Table("released (UTC)", "what", "ε", "Δ", "noisy value", "state")
        for d in made:
            at = d.get("released_at") or d["reserved_at"]
            value = d.get("noisy_value")
            table.add_row(at.strftime("%Y-%m-%d %H:%M:%S"), d["what"], f"{d['epsilon']:g}",
                          f"{d.get('sensitivity', float('nan')):g}",
                          "-" if value is None else f"{value:.2f}", d["state"])
        console.print(table)


@app.command()
def release(
    what: Annotated[Query, typer.Argument(help="The aggregate to release")],
    epsilon: Annotated[float, typer.Option(min=1e-6, help="Epsilon spent on this release")],
    decision: Annotated[str | None, typer.Option(
        help="alert-decisions: only this decision (sent, queued, suppressed, ...)")] = None,
    since: Annotated[str | None, typer.Option(help="first taken at >= since, ISO-8601")] = None,
    until: Annotated[str | None, typer.Option(help="first taken at < until, ISO-8601")] = None,
    per_rule_cap: Annotated[int | None, typer.Option(
        min=1, help="Clip each rule's contribution to this many (sensitivity = cap; the unit "
        "of privacy becomes one rule)")] = None,
    run: Annotated[str | None, typer.Option(
        help="backtest-trades: the stored run (default: the latest)")] = None,
    bot: Annotated[str | None, typer.Option(
        help="backtest-trades: one bot (default: every bot of the run)")] = None,
    scope: Annotated[str, typer.Option(help="The budget spent from")] = "default",
) -> None:
    """Release a count with epsilon-differential privacy (Laplace noise, OpenDP), spending
    from the persisted budget; refused (exit 1) when the budget would be exceeded or
    ARB_DP_ENABLED is false. Prints the noisy value only."""
    from pymongo.errors import PyMongoError

    from alerts.privacy_release import release_decisions
    from arbstream.store.mongo import privacy_budget as pb
    from backtest.privacy_release import release_trade_count

    conf = pb.DpConfig.of(settings_or_exit())
    try:
        if what is Query.backtest_trades:
            made = release_trade_count(conf, epsilon, run, bot, scope)
        else:
            made = release_decisions(conf, epsilon, decision, _time(since), _time(until),
                                     per_rule_cap, scope)
    except (PyMongoError, pb.DpDisabled, pb.BudgetExhausted, ValueError) as exc:
        raise fail(exc) from None
    left = made.budget
    console.print(f"{made.what}: {made.noisy_value:.2f} (≈ {max(0, round(made.noisy_value))}; "
                  f"ε {made.epsilon:g}, Laplace scale {made.scale:g}, noise sd "
                  f"{made.scale * 2 ** 0.5:.3g})")
    console.print(f"budget {left.scope!r}: spent {left.spent:g} of {left.total:g}, remaining "
                  f"{left.remaining:g}")


@app.command()
def token(
    values: Annotated[list[str], typer.Argument(help="Identifiers (trade ids, addresses)")],
) -> None:
    """The HMAC-SHA256 token of each identifier under ARB_ID_HASH_KEY, one per line (to find
    an id in an export)."""
    from arbstream.privacy import token as hmac_token

    key = settings_or_exit().id_hash_key
    if key is None:
        err.print("[red]error:[/red] set ARB_ID_HASH_KEY (or ARB_ID_HASH_KEY_FILE)")
        raise typer.Exit(1)
    for value in values:
        console.print(hmac_token(value, key), soft_wrap=True)


@app.command()
def coverage(
    start: Annotated[str, typer.Option("--from", help="Checked period start, ISO-8601")],
    end: Annotated[str, typer.Option("--to", help="Checked period end (exclusive)")],
    reference_from: Annotated[str, typer.Option(help="Reference period start, ISO-8601")],
    reference_to: Annotated[str, typer.Option(help="Reference period end (exclusive)")],
    by: Annotated[GroupBy, typer.Option(
        help="exchange, or symbol (exchange and symbol)")] = GroupBy.exchange,
    alpha: Annotated[float, typer.Option(help="Family-wise significance level")] = 0.01,
    min_ratio: Annotated[float, typer.Option(
        help="Flag only below this observed/expected ratio")] = 0.5,
) -> None:
    """Quote coverage of the recorded IAQF data in a period against a reference period, by
    exchange (or exchange and symbol): χ² goodness of fit, and the groups significantly and
    materially under-covered (exit 1 when any is flagged)."""
    import pandas as pd

    from arbstream.shell.backfill import Input, read_quotes
    from ml.coverage import check_coverage, quote_counts

    settings = settings_or_exit()
    cols = ("exchange",) if by is GroupBy.exchange else ("exchange", "symbol")

    def counts(lo: str, hi: str) -> pd.Series:
        _, quotes = read_quotes(settings, Input.iaqf, _time(lo), _time(hi))
        frame = pd.DataFrame([q.model_dump(include={"exchange", "symbol", "exchange_ts"})
                              for q in quotes], columns=["exchange", "symbol", "exchange_ts"])
        return quote_counts(frame, cols)

    try:
        check = check_coverage(counts(start, end), counts(reference_from, reference_to),
                               alpha=alpha, min_ratio=min_ratio)
    except ValueError as exc:
        raise fail(exc) from None
    table = Table(*cols, "observed", "expected", "ratio", "p (fewer)", "flagged")
    for label, row in check.table.iterrows():
        names = label if isinstance(label, tuple) else (label,)
        table.add_row(*names, f"{row['observed']:,}", f"{row['expected']:,.0f}",
                      f"{row['ratio']:.3f}", f"{row['p_value']:.3g}",
                      "[red]yes[/red]" if row["flagged"] else "no")
    console.print(table)
    console.print(f"χ² = {check.statistic:.1f}, dof {check.dof}, p = {check.p_value:.3g}; "
                  f"flag rule: p < {check.alpha:g}/{len(check.table)} and ratio < "
                  f"{check.min_ratio:g}")
    if check.flagged:
        raise typer.Exit(1)
