"""The ML bot: the registry's champion opportunity scorer, thresholded on training data only.

The champion ``opportunity_scorer`` (:mod:`arbstream.store.models`; P(net spread still above
its threshold ``horizon_s`` after the window)) scores every signal on its online features
(:func:`arbstream.features.online_features`, what the alert worker scores live). The score
threshold is chosen on the signals of the model's **training range** only (``card.data``:
signals with a window end at or before its end): among their scores, the one maximizing the
sum of their realized results under the bot's own execution, without inventory limits
(:func:`backtest.bots.train_threshold`). Signals of the training range are then not traded
(``in_training``): the bot is evaluated out of sample only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from arbstream.features import FEATURE_NAMES, online_features
from arbstream.store.models import SCORER, RegistryConfig, load
from arbstream.timestamps import to_ms
from backtest.bots import Bot, train_threshold
from backtest.execution import ExecutionModel, execute
from backtest.market import Market


def _positive_column(model: Any) -> int:
    """Index of the positive class in ``predict_proba``'s columns (1/True, else the last)."""
    classes = list(getattr(model, "classes_", []))
    for positive in (1, True, "1"):
        if positive in classes:
            return classes.index(positive)
    return len(classes) - 1


def champion_scores(registry: RegistryConfig, signals: pd.DataFrame,
                    version: int | None = None) -> tuple[pd.Series, int, int]:
    """``(score per signal (index of signals), model version, training end UTC ms)`` of the
    champion scorer, or of version ``version`` (a challenger, to backtest it before
    promotion).

    Raises:
        arbstream.store.models.ModelNotFoundError: no champion scorer.
        arbstream.store.models.ModelIntegrityError: its artifact or feature schema is wrong.
    """
    loaded = load(registry, SCORER, version, features=FEATURE_NAMES)
    rows = [online_features(r) for r in signals.to_dict("records")]
    x: Any = pd.DataFrame(rows, columns=loaded.card.feature_names)
    if not hasattr(loaded.model, "feature_names_in_"):
        x = x.to_numpy(float)
    proba = loaded.model.predict_proba(x)[:, _positive_column(loaded.model)]
    return (pd.Series(proba, index=signals.index), int(loaded.card.version or 0),
            to_ms(loaded.card.data.end))


def ml_bot(registry: RegistryConfig, signals: pd.DataFrame, market: Market,
           execution: ExecutionModel, name: str = "ml", version: int | None = None
           ) -> tuple[Bot, dict[str, Any]]:
    """The ML bot and what it was built from (``version``, ``threshold``, ``training_end_ms``,
    ``training_signals``).

    Raises:
        arbstream.store.models.ModelNotFoundError, ModelIntegrityError: as
            :func:`champion_scores`.
        ValueError: no signal in the model's training range to choose a threshold on.
    """
    scores, version, end_ms = champion_scores(registry, signals, version)
    train = signals["t_ms"] <= end_ms
    if not train.any():
        raise ValueError(f"no signal in the champion scorer's training range (to {end_ms} "
                         "ms): its threshold cannot be chosen without look-ahead")
    outcomes = []
    for s in signals[train].to_dict("records"):
        ex = execute(market, execution, s, float(s["size_base"]))
        usd = market.usd(str(s["profit_currency"]), int(s["t_ms"])) or 1.0
        outcomes.append((ex.gross_profit + ex.leg_risk) * usd)
    threshold = train_threshold(scores[train].to_numpy(), np.asarray(outcomes))
    by_id = dict(zip(signals["opportunity_id"], scores, strict=True))
    in_training = set(signals.loc[train, "opportunity_id"])

    def wants(signal: Any) -> bool | str:
        oid = str(signal["opportunity_id"])
        if oid in in_training:
            return "in_training"
        return bool(by_id[oid] >= threshold)

    info = {"version": version, "threshold": threshold, "training_end_ms": end_ms,
            "training_signals": int(train.sum())}
    return Bot(name, execution, wants), info
