"""The champion models in the alert loop: load, hot reload, score, and the rules' model
thresholds.

:class:`Scorer` holds the champion of each model name it serves (the opportunity scorer,
:data:`~arbstream.store.models.SCORER`, a classifier; the net-bps regressor,
:data:`~arbstream.store.models.REGRESSOR`). It loads them at start through the registry
(:func:`arbstream.store.models.load`, which refuses a model whose artifacts do not match its
card or whose feature schema is not :data:`arbstream.features.FEATURE_NAMES`), and
:meth:`Scorer.refresh` re-reads each name's champion pointer at most every
``ARB_ALERT_MODEL_RELOAD_SECONDS``: a newly promoted champion is loaded without a restart; a
removed pointer unloads the name. A new champion that fails to load is logged and the model
already loaded (verified when it was) keeps scoring; it is tried again when the pointer moves.

An opportunity window is scored on :func:`arbstream.features.online_features` of its event:
``score`` = the classifier's probability of the positive class (still executable after its
latency), ``predicted_bps`` = the regressor's net bps at its horizon. A rule with
``min_score`` / ``min_predicted_bps`` matches only when the champion's value reaches it
(:func:`model_mismatch`); when that champion is not available the rule does not fire and the
worker logs the decision ``skipped``/``no_model`` with the reason.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from arbstream.config import AlertRule
from arbstream.features import FEATURE_NAMES, online_features
from arbstream.store.models import (
    REGRESSOR,
    SCORER,
    LoadedModel,
    RegistryConfig,
    champion_version,
    load,
)

log = logging.getLogger(__name__)

#: Model name -> the decision-log (and ``ml_score``) field of its value, and of its version.
OUTPUTS = {SCORER: ("score", "score_version"),
           REGRESSOR: ("predicted_bps", "predicted_version")}


@dataclass(frozen=True)
class Output:
    """One model's output for one window: ``value`` (probability or bps) with the model's
    ``version`` and target ``horizon_s``, or ``why`` it is not available."""

    value: float | None = None
    version: int | None = None
    horizon_s: float | None = None
    why: str | None = None


@dataclass(frozen=True)
class ModelScores:
    """The champions' outputs for one opportunity window, by model name, and the window's
    ``features`` (:data:`~arbstream.features.FEATURE_NAMES` order; ``None``: no window)."""

    outputs: dict[str, Output] = field(default_factory=dict)
    features: list[float] | None = None

    def get(self, name: str) -> Output:
        return self.outputs.get(name) or Output(why=f"no {name} champion loaded")

    @property
    def score(self) -> Output:
        return self.get(SCORER)

    @property
    def predicted(self) -> Output:
        return self.get(REGRESSOR)

    def log_fields(self) -> dict[str, Any]:
        """Decision-log fields: ``score``, ``score_version``, ``predicted_bps``,
        ``predicted_version`` of the outputs that have a value."""
        out: dict[str, Any] = {}
        for name, (key, version_key) in OUTPUTS.items():
            got = self.outputs.get(name)
            if got is not None and got.value is not None:
                out[key], out[version_key] = got.value, got.version
        return out

    def points(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The ``ml_score`` rows of this window (one per model with a value; see
        :func:`arbstream.store.influx.lines.ml_score_point`): the event's pair, ``window_end``
        and ``net_bps``, the model, its version and value, and the features."""
        features = dict(zip(FEATURE_NAMES, self.features or [], strict=False))
        pair = {k: event.get(k) for k in ("symbol", "sell_symbol", "buy_exchange",
                                           "sell_exchange", "cross_quote", "window_end",
                                           "net_bps")}
        return [{**pair, "model": name, "version": got.version, OUTPUTS[name][0]: got.value,
                 "features": features}
                for name, got in self.outputs.items()
                if got.value is not None and name in OUTPUTS]


NO_SCORES = ModelScores()


def required_models(rule: AlertRule) -> list[str]:
    """The model names ``rule``'s thresholds need (``[]``: none)."""
    return ([SCORER] if rule.min_score is not None else []) + (
        [REGRESSOR] if rule.min_predicted_bps is not None else [])


def model_mismatch(rule: AlertRule, scores: ModelScores) -> tuple[str, str] | None:
    """Why ``rule``'s model thresholds keep the window from matching: ``("no_model",
    detail)`` when a champion it needs gave no value, ``("below", detail)`` when a value is
    under its minimum; ``None`` when every threshold the rule sets is reached."""
    checks = [(rule.min_score, scores.score, SCORER, "score"),
              (rule.min_predicted_bps, scores.predicted, REGRESSOR, "predicted net bps")]
    for minimum, got, name, what in checks:
        if minimum is None:
            continue
        if got.value is None:
            return "no_model", (f"rule needs {name} ({what} >= {minimum:g}): {got.why}; the rule "
                                f"does not fire without it")
        if got.value < minimum:
            return "below", f"{what} {got.value:.4g} < {minimum:g} ({name} v{got.version})"
    return None


class Scorer:
    """The champions the alert worker scores with (see the module docstring).

    Args:
        registry: where the models are.
        reload_seconds: least wall-clock time between two looks at the champion pointers.
        names: the model names served (default the scorer and the regressor).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, registry: RegistryConfig, reload_seconds: float,
                 names: tuple[str, ...] = (SCORER, REGRESSOR),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = registry
        self.reload_seconds = reload_seconds
        self.names = names
        self.clock = clock
        self.models: dict[str, LoadedModel] = {}
        #: name -> why its champion is not loaded (no champion, refused, unreadable)
        self.problems: dict[str, str] = {}
        #: name -> the pointer version last tried (loaded or refused)
        self._tried: dict[str, int | None] = {}
        self._checked_at: float | None = None

    @property
    def active(self) -> bool:
        """Whether any champion is loaded."""
        return bool(self.models)

    def versions(self) -> dict[str, int | None]:
        """Model name -> the loaded champion's version (``None``: none loaded)."""
        return {n: (m.card.version if (m := self.models.get(n)) else None) for n in self.names}

    def refresh(self, force: bool = False) -> bool:
        """Look at each name's champion pointer (at most every ``reload_seconds`` unless
        ``force``) and load a champion that changed. Returns whether any loaded model
        changed."""
        now = self.clock()
        if not force and self._checked_at is not None \
                and now - self._checked_at < self.reload_seconds:
            return False
        self._checked_at = now
        changed = False
        for name in self.names:
            changed |= self._refresh_one(name)
        return changed

    def _refresh_one(self, name: str) -> bool:
        try:
            pointer = champion_version(self.registry, name)
        except (OSError, ValueError) as exc:
            self.problems[name] = f"champion pointer of {name} unreadable: {exc}"
            log.error("%s", self.problems[name])
            return False
        if name in self._tried and self._tried[name] == pointer:
            return False
        self._tried[name] = pointer
        if pointer is None:
            self.problems[name] = f"no {name} champion in {self.registry.models_dir}"
            return self.models.pop(name, None) is not None
        try:
            loaded = load(self.registry, name, pointer, features=FEATURE_NAMES)
        except Exception as exc:  # refused (integrity), unreadable, unpicklable: keep serving
            kept = self.models.get(name)
            self.problems[name] = (f"{name} champion v{pointer} not loaded: {exc}"
                                   + (f"; still scoring with v{kept.card.version}" if kept
                                      else ""))
            log.error("%s", self.problems[name])
            return False
        self.models[name] = loaded
        self.problems.pop(name, None)
        log.info("loaded %s champion v%d (%s)", name, pointer, loaded.card.target.kind)
        return True

    def score(self, row: Mapping[str, Any] | None) -> ModelScores:
        """Every loaded champion's output for one opportunity window (an event's fields,
        see :func:`arbstream.features.online_features`); ``row`` ``None`` (no window known)
        gives each name its reason. A model that fails is reported, not raised."""
        outputs: dict[str, Output] = {}
        features = online_features(row) if row is not None else None
        for name in self.names:
            loaded = self.models.get(name)
            if loaded is None:
                outputs[name] = Output(why=self.problems.get(name, f"no {name} champion"))
                continue
            card = loaded.card
            if features is None:
                outputs[name] = Output(version=card.version,
                                       why="no opportunity window of the episode to score")
                continue
            try:
                value = self._predict(loaded, features)
            except Exception as exc:  # a model bug must not stop the worker: reported
                log.exception("%s v%s failed to score", name, card.version)
                outputs[name] = Output(version=card.version,
                                       why=f"{name} v{card.version} failed: "
                                           f"{type(exc).__name__}: {exc}")
                continue
            outputs[name] = Output(value=value, version=card.version,
                                   horizon_s=card.target.horizon_s)
        return ModelScores(outputs, features)

    @staticmethod
    def _predict(loaded: LoadedModel, features: list[float]) -> float:
        model, card = loaded.model, loaded.card
        x = loaded.inputs([features])
        if card.target.kind == "classification":
            value = float(model.predict_proba(x)[0][loaded.positive_column()])
        else:
            value = float(model.predict(x)[0])
        if not math.isfinite(value):
            raise ValueError(f"prediction is {value}")
        return value
