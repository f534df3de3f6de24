"""The bots a backtest compares: who trades which signal, under which execution.

* ``threshold-p50`` / ``-p75`` / ``-p95``: trade a signal when its ``net_bps`` reaches the
  pair's recommended threshold of the last complete hour (:func:`backtest.signals.
  hourly_thresholds`); no recommendation yet (the first hour), no trade
  (``no_threshold``).
* ``ml``: trade when the champion opportunity scorer's probability (computed by the caller
  on the signal's features, ``scores``: opportunity id → probability) reaches a threshold
  chosen on the training folds only (:func:`train_threshold`).
* ``oracle``: perfect foresight under the same execution and inventory: it sees the fills
  before deciding and trades a signal only when the realized result is positive, at the
  best size of a grid (:data:`ORACLE_GRID` fractions of the size it may trade).
* ``oracle-unconstrained``: the oracle without inventory limits (the upper bound no bot
  beats).
* ``naive``: the reference systems' setup: every signal, zero latency, 0.1 % slippage on
  every fill, no inventory (the gap between it and the others is what realism costs).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from backtest.execution import ExecutionModel

#: Fractions of the tradable size the oracle tries (it keeps the best realized result).
ORACLE_GRID = tuple(k / 16 for k in range(1, 17))
#: The naive setup's slippage on every fill, bps (0.1 %).
NAIVE_SLIPPAGE_BPS = 10.0


@dataclass(frozen=True)
class Bot:
    """One bot. ``wants(signal)`` is its decision before execution: ``True`` to trade,
    ``False`` to decline, or a reason (str) why it cannot decide, e.g. ``no_threshold``
    (``None`` for the oracles, which decide on the realized fills); ``constrained``:
    inventory and budget apply; ``oracle``: perfect foresight; ``kind``: ``arbitrage`` (on
    the stream's signals) or ``pair`` (:mod:`backtest.pair_bot`)."""

    name: str
    execution: ExecutionModel
    wants: Callable[[Mapping[str, Any]], bool | str] | None = None
    constrained: bool = True
    oracle: bool = False
    kind: str = "arbitrage"


class Thresholds:
    """Per-pair look-up of the recommended thresholds in force at a time (bps)."""

    def __init__(self, table: pd.DataFrame) -> None:
        self._by_pair: dict[str, tuple[np.ndarray, pd.DataFrame]] = {}
        for pair, g in table.sort_values("valid_from_ms").groupby("pair"):
            self._by_pair[str(pair)] = (g["valid_from_ms"].to_numpy(np.int64),
                                        g.reset_index(drop=True))

    def at(self, pair: str, level: str, t_ms: int) -> float | None:
        """The ``level`` threshold of ``pair`` in force at ``t_ms``, ``None`` before the first
        complete hour."""
        entry = self._by_pair.get(pair)
        if entry is None:
            return None
        i = int(np.searchsorted(entry[0], t_ms, side="right")) - 1
        return None if i < 0 else float(entry[1].at[i, level])


def threshold_bot(level: str, thresholds: Thresholds, execution: ExecutionModel) -> Bot:
    """``threshold-<level>`` (``p50``, ``p75``, ``p95``)."""
    def wants(signal: Mapping[str, Any]) -> bool | str:
        th = thresholds.at(str(signal["pair"]), level, int(signal["t_ms"]))
        if th is None:
            return "no_threshold"
        return float(signal["net_bps"]) >= th

    return Bot(f"threshold-{level}", execution, wants)


def score_bot(scores: Mapping[str, float], threshold: float, execution: ExecutionModel,
              name: str = "ml") -> Bot:
    """Trades signals whose score (probability, 0..1) reaches ``threshold``; a signal
    without a score is not traded."""
    def wants(signal: Mapping[str, Any]) -> bool | str:
        s = scores.get(str(signal["opportunity_id"]))
        return "no_score" if s is None else s >= threshold

    return Bot(name, execution, wants)


def train_threshold(scores: np.ndarray, outcomes: np.ndarray) -> float:
    """The score threshold maximizing the total realized result on training rows: among the
    distinct training scores ``t``, the one whose rows with ``score >= t`` sum the largest
    ``outcomes`` (USD per trade); ties go to the highest ``t`` (fewest trades).

    Raises:
        ValueError: empty or mismatched inputs.
    """
    scores, outcomes = np.asarray(scores, float), np.asarray(outcomes, float)
    if len(scores) == 0 or len(scores) != len(outcomes):
        raise ValueError("need as many outcomes as scores, at least one")
    order = np.argsort(-scores, kind="stable")
    s, gains = scores[order], np.cumsum(outcomes[order])
    last = np.r_[s[1:] != s[:-1], True]  # the last row of each distinct score
    candidates, totals = s[last], gains[last]
    return float(candidates[int(np.argmax(totals))])


def oracle(execution: ExecutionModel, constrained: bool = True, name: str | None = None
           ) -> Bot:
    """The perfect-foresight oracle (default name ``oracle`` or ``oracle-unconstrained``)."""
    return Bot(name or ("oracle" if constrained else "oracle-unconstrained"), execution,
               constrained=constrained, oracle=True)


def naive(execution: ExecutionModel) -> Bot:
    """The naive reference setup (module docstring)."""
    model = replace(execution, decision_latency_ms=0.0, order_latency_ms={},
                    default_order_latency_ms=0.0, bar_impact_bps=0.0,
                    slippage_bps=NAIVE_SLIPPAGE_BPS)
    return Bot("naive", model, lambda _s: True, constrained=False)
