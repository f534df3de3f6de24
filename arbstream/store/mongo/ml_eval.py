"""MongoDB ``ml_eval``: the live out-of-sample evaluation of each registered model, one
document per (model, version, evaluated event-time window), written by the retraining job
(``ml.registry.evaluate_live``).

Document:

``_id``  ``<name>|<version>|<since ms>|<until ms>`` (a re-run of the same window overwrites)
``name``, ``version``, ``kind``  the model (``classification`` / ``regression``)
``since``, ``until``  the half-open event-time window of the scores evaluated (UTC; ``since``
    ``None`` for the first evaluation); the next evaluation of the name starts at ``until``
``horizon_s``, ``threshold_bps``  the model's target (the label: net bps at ``t + horizon_s``,
    above ``threshold_bps`` for a classifier)
``scores``, ``labeled``, ``unlabeled``  counts of ``ml_score`` points in the window, of those
    with a realized value, and of those without one (no spread point of the pair in time)
``metrics``  ``auc_pr``, ``brier``, ``positive_rate`` (classifier), ``mae``, ``rmse`` (bps,
    regressor); ``None`` when undefined (no label, one class only)
``drift``  feature -> population stability index between the training rows (the card's
    ``reference``) and the scored live rows; ``drift_max`` and ``drifted`` (features with
    PSI > 0.25)
``evaluated_at``  UTC wall clock

Indexes: :data:`~arbstream.store.mongo.schema.ML_INDEXES` (``name_until_desc``: the latest
evaluation of a name).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from pymongo import DESCENDING

from arbstream.store.config import MongoConfig
from arbstream.store.models import ml_database
from arbstream.store.mongo.schema import ML_EVAL
from arbstream.timestamps import to_ms


def eval_id(name: str, version: int, since: dt.datetime | None, until: dt.datetime) -> str:
    """``<name>|<version>|<since ms or ->|<until ms>``."""
    start = "-" if since is None else str(to_ms(since))
    return f"{name}|{version}|{start}|{to_ms(until)}"


def record_eval(conf: MongoConfig, doc: Mapping[str, Any]) -> str:
    """Upsert one evaluation document (see the module docstring; ``name``, ``version``,
    ``since``, ``until`` required); returns its ``_id``.

    Raises:
        KeyError: a required key is missing.
        pymongo.errors.PyMongoError: connection or server errors.
    """
    oid = eval_id(doc["name"], doc["version"], doc["since"], doc["until"])
    with ml_database(conf) as db:
        db[ML_EVAL].replace_one({"_id": oid}, {**doc, "_id": oid}, upsert=True)
    return oid


def last_eval(conf: MongoConfig, name: str) -> dict[str, Any] | None:
    """The evaluation of ``name`` with the latest ``until``, or ``None``."""
    with ml_database(conf) as db:
        return db[ML_EVAL].find_one({"name": name}, sort=[("until", DESCENDING)])


def evals(conf: MongoConfig, name: str, limit: int = 50) -> list[dict[str, Any]]:
    """Evaluations of ``name``, latest ``until`` first (``limit`` 0: all)."""
    with ml_database(conf) as db:
        cursor = db[ML_EVAL].find({"name": name}).sort([("until", DESCENDING),
                                                         ("version", DESCENDING)])
        return list(cursor.limit(limit) if limit else cursor)
