"""The ML bot: the registry's champion opportunity scorer, thresholded on training data only.

The champion ``opportunity_scorer`` (:mod:`arbstream.store.models`; P(net spread still above
its threshold ``horizon_s`` after the window)) scores every signal on its online features
(:func:`arbstream.features.online_features`, what the alert worker scores live). The score
threshold is chosen on the signals of the model's **training range** only (``card.data``:
signals with a window end at or before its end, read from the lake when the backtested
period starts later): among their scores, the one maximizing the sum of their realized
results under the bot's own execution, without inventory limits
(:func:`backtest.bots.train_threshold`). Signals of the training range are then not traded
(``in_training``): the bot is evaluated out of sample only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from arbstream.features import FEATURE_NAMES, online_features
from arbstream.store.lake import LakeConfig
from arbstream.store.models import SCORER, LoadedModel, RegistryConfig, load
from arbstream.timestamps import from_ms, to_ms
from backtest.bots import Bot, train_threshold
from backtest.execution import ExecutionModel, execute
from backtest.market import Market
from backtest.signals import from_lake


def _scores(loaded: LoadedModel, signals: pd.DataFrame) -> pd.Series:
    """The model's probability of the positive class for each signal (index of signals)."""
    x = loaded.inputs([online_features(r) for r in signals.to_dict("records")])
    proba = loaded.model.predict_proba(x)[:, loaded.positive_column()]
    return pd.Series(proba, index=signals.index)


def ml_bot(registry: RegistryConfig, signals: pd.DataFrame, market: Market,
           execution: ExecutionModel, name: str = "ml", version: int | None = None,
           lake_cfg: LakeConfig | None = None) -> tuple[Bot, dict[str, Any]]:
    """The ML bot and what it was built from (``version``, ``threshold``, ``training_end_ms``,
    ``training_signals``).

    The training-range signals are those of ``signals`` at or before the card's training end,
    or, with ``lake_cfg``, the lake's signals over the card's whole training range (the
    backtested period usually starts after it); ``market`` must then cover that range too.

    Raises:
        arbstream.store.models.ModelNotFoundError, ModelIntegrityError: as
            :func:`champion_scores`.
        ValueError: no signal in the model's training range to choose a threshold on.
    """
    loaded = load(registry, SCORER, version, features=FEATURE_NAMES)
    end_ms = to_ms(loaded.card.data.end)
    if lake_cfg is not None:
        train_sig = from_lake(lake_cfg, loaded.card.data.start, from_ms(end_ms + 1))
    else:
        train_sig = signals[signals["t_ms"] <= end_ms]
    if train_sig.empty:
        raise ValueError(f"no signal in the scorer's training range (to {from_ms(end_ms)}): "
                         "its threshold cannot be chosen without look-ahead")
    train_scores = _scores(loaded, train_sig)
    outcomes = []
    for s in train_sig.to_dict("records"):
        ex = execute(market, execution, s, float(s["size_base"]))
        usd = market.usd(str(s["profit_currency"]), int(s["t_ms"])) or 1.0
        outcomes.append((ex.gross_profit + ex.leg_risk) * usd)
    threshold = train_threshold(train_scores.to_numpy(), np.asarray(outcomes))
    by_id = dict(zip(signals["opportunity_id"], _scores(loaded, signals), strict=True))
    in_training = set(signals.loc[signals["t_ms"] <= end_ms, "opportunity_id"])

    def wants(signal: Any) -> bool | str:
        oid = str(signal["opportunity_id"])
        if oid in in_training:
            return "in_training"
        return bool(by_id[oid] >= threshold)

    info = {"version": int(loaded.card.version or 0), "threshold": threshold,
            "training_end_ms": end_ms, "training_signals": len(train_sig)}
    return Bot(name, execution, wants), info
