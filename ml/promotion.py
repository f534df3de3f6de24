"""The promotion rule: when a newly registered version becomes the champion of its name.

A candidate is promoted only if, on **each of the last K walk-forward folds** (``K`` =
:data:`DEFAULT_K`, 3, configurable; folds ordered by index), it beats

* every baseline of its kind: ``persistence`` (the net spread at ``t`` as the prediction for
  ``t + h``) for a regressor; ``threshold_rule`` (the fixed rule "executable when net at
  ``t`` > the threshold", as a 0/1 probability) and ``base_rate`` (the training positive rate
  as a constant probability) for a classifier;
* and the current champion, scored on the same fold: the fold's ``champion`` metrics when
  the retraining job recorded them for the current champion version
  (``FoldMetrics.champion_version``), else the champion card's own fold with the same test
  window. A champion with neither is not comparable and the candidate is not promoted (the
  retraining job must score the champion on the candidate's folds).

"Beats" (:func:`beats`), per fold:

* regressor (``target.kind == "regression"``): **RMSE** of the net-bps prediction strictly
  lower;
* classifier (``"classification"``): **Brier score** strictly lower (a proper scoring rule:
  calibration and discrimination, and the worker thresholds the probability itself with
  ``min_score``) **and** **AUC-PR** (average precision, the ranking quality on the rare
  positive class) not lower. An undefined metric (``None``) never beats.

A candidate with fewer than K folds, a missing metric or baseline, or a target (kind,
horizon, threshold) different from the champion's is not promoted either. The outcome goes to
the registry (:func:`promote`): ``champion`` with the reason, or ``rejected`` with every
failed comparison as reason, in the card and in MongoDB ``models``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from arbstream.store.models import (
    Card,
    FoldMetrics,
    RegistryConfig,
    champion,
    read_card,
    set_status,
)

#: Folds the candidate must win, the last ones.
DEFAULT_K = 3
#: Baselines a candidate must beat, by target kind.
BASELINES: dict[str, tuple[str, ...]] = {
    "regression": ("persistence",),
    "classification": ("threshold_rule", "base_rate"),
}


@dataclass(frozen=True)
class Decision:
    """The rule's verdict: ``promote``, the ``reason`` (one line, stored in the card) and the
    ``comparisons`` made (``fold``, ``against``, the metrics of both, ``won``)."""

    promote: bool
    reason: str
    comparisons: list[dict[str, Any]] = field(default_factory=list)


def _fmt(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.4g}"


def beats(kind: str, mine: dict[str, float | None], other: dict[str, float | None]
          ) -> tuple[bool, str]:
    """Whether metrics ``mine`` beat ``other`` under the rule of ``kind`` (see the module
    docstring), with a short account (``"RMSE 4.1 < 5.0"``).

    Raises:
        ValueError: an unknown kind.
    """
    if kind == "regression":
        a, b = mine.get("rmse"), other.get("rmse")
        won = a is not None and b is not None and a < b
        return won, f"RMSE {_fmt(a)} {'<' if won else '>='} {_fmt(b)}"
    if kind == "classification":
        brier = (mine.get("brier"), other.get("brier"))
        auc = (mine.get("auc_pr"), other.get("auc_pr"))
        brier_ok = None not in brier and brier[0] < brier[1]
        auc_ok = None not in auc and auc[0] >= auc[1]
        return brier_ok and auc_ok, (
            f"Brier {_fmt(brier[0])} {'<' if brier_ok else 'not <'} {_fmt(brier[1])}, "
            f"AUC-PR {_fmt(auc[0])} {'>=' if auc_ok else '<'} {_fmt(auc[1])}")
    raise ValueError(f"unknown target kind {kind!r}")


def _champion_metrics(fold: FoldMetrics, champ: Card) -> dict[str, float | None] | None:
    """The champion's metrics on ``fold``'s test rows, or ``None`` when not known."""
    if fold.champion_version == champ.version and "champion" in fold.metrics:
        return fold.metrics["champion"]
    for own in champ.folds:
        if (own.test_start, own.test_end) == (fold.test_start, fold.test_end) \
                and own.test_start is not None and "model" in own.metrics:
            return own.metrics["model"]
    return None


def decide(candidate: Card, current: Card | None, k: int = DEFAULT_K) -> Decision:
    """Apply the rule to ``candidate`` against the champion ``current`` (``None``: no
    champion yet, only the baselines count). Pure: reads the cards only.

    Raises:
        ValueError: ``k`` < 1.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    kind = candidate.target.kind
    if len(candidate.folds) < k:
        return Decision(False, f"only {len(candidate.folds)} walk-forward fold(s), the rule "
                               f"needs the last {k}")
    if current is not None and current.target != candidate.target:
        return Decision(False, f"target {candidate.target.model_dump()} differs from champion "
                               f"v{current.version}'s {current.target.model_dump()}: not "
                               f"comparable")
    last = sorted(candidate.folds, key=lambda f: f.fold)[-k:]
    comparisons: list[dict[str, Any]] = []
    failures: list[str] = []
    for fold in last:
        mine = fold.metrics.get("model")
        if mine is None:
            failures.append(f"fold {fold.fold}: no metrics of the model")
            continue
        others: list[tuple[str, dict[str, float | None] | None]] = [
            (b, fold.metrics.get(b)) for b in BASELINES[kind]]
        if current is not None:
            others.append((f"champion v{current.version}", _champion_metrics(fold, current)))
        for who, theirs in others:
            if theirs is None:
                failures.append(f"fold {fold.fold}: no metrics of {who} to compare with")
                continue
            won, account = beats(kind, mine, theirs)
            comparisons.append({"fold": fold.fold, "against": who, "model": mine,
                                "other": theirs, "won": won})
            if not won:
                failures.append(f"fold {fold.fold}: does not beat {who} ({account})")
    if failures:
        return Decision(False, "; ".join(failures), comparisons)
    against = ", ".join([*BASELINES[kind]] + ([f"champion v{current.version}"]
                                              if current is not None else []))
    return Decision(True, f"beats {against} on each of the last {k} folds "
                          f"({', '.join(str(f.fold) for f in last)})", comparisons)


def promote(cfg: RegistryConfig, name: str, version: int, k: int = DEFAULT_K) -> Decision:
    """Decide on version ``version`` of ``name`` against the current champion and record the
    outcome in the registry: ``champion`` (the previous one becomes a challenger) or
    ``rejected``, with the reason, in the card and MongoDB ``models``. The current champion
    itself is left as it is.

    Raises:
        arbstream.store.models.ModelNotFoundError: no such version.
        pymongo.errors.PyMongoError: the mirror could not be written.
    """
    candidate = read_card(cfg, name, version)
    current = champion(cfg, name)
    if current is not None and current.version == version:
        return Decision(True, "already the champion")
    decision = decide(candidate, current, k)
    if decision.promote:
        set_status(cfg, name, version, "champion", "promoted: " + decision.reason)
    else:
        set_status(cfg, name, version, "rejected", "not promoted: " + decision.reason)
    return decision
