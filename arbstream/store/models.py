"""The model registry: versioned model artifacts and their cards on disk, the champion pointer,
and the MongoDB ``models`` mirror. Owner of the files below and of the ``models`` collection.

Long module: the card's schema, the atomic writes and the integrity checks of :func:`load`
are one contract (what the card records is what is verified before unpickling) and change
together.

Layout (``RegistryConfig.models_dir``, ``ARB_MODELS_DIR``, default ``<state_dir>/models``)::

    <models_dir>/<name>/
        CHAMPION                the champion's version (text); absent: no champion
        .lock                   flock'ed while a version is added or a status changes
        <version>/              1, 2, 3 ... (monotonically increasing ints, never reused)
            model.joblib        the scikit-learn estimator (joblib)
            mllib/              optional: an MLlib ``PipelineModel`` directory
            predictions.parquet out-of-sample predictions of the walk-forward folds
            card.json           the :class:`Card`

A version directory is written under a temporary name (``.tmp-<uuid>``) and renamed into place
once complete, so a reader sees a whole version or none; the card and the pointer are replaced
atomically (``os.replace``). The card holds the sha256 of every artifact file and the hash of
the feature schema; :func:`load` refuses a model whose files or feature schema do not match
(:class:`ModelIntegrityError`), before unpickling anything.

Statuses: ``challenger`` (registered, not promoted; also a former champion, with the version
that replaced it as reason), ``champion`` (the pointer names it; one per name) and
``rejected`` (failed the promotion rule, reason in the card). The promotion rule itself is
the ``ml`` component's (``ml/promotion.py``); the registry only records its outcome.

MongoDB ``models``: one document per (name, version), ``_id`` = ``<name>|<version>``, equal
to the card's fields (:meth:`Card.model_dump`) plus ``champion`` (bool); rewritten after every
change on disk (:func:`mirror`). The files are the truth: when MongoDB was unreachable,
:func:`mirror_all` rewrites the mirror from them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)
from pymongo.database import Database

from arbstream.store.config import MongoConfig
from arbstream.store.mongo.client import connect
from arbstream.store.mongo.schema import MODELS, ensure_ml_indexes

if TYPE_CHECKING:
    import pyarrow as pa

    from arbstream.config import Settings

#: Registry name of the opportunity scorer (classifier: still executable after latency L).
SCORER = "opportunity_scorer"
#: Registry name of the net-spread regressor (net bps at t + h).
REGRESSOR = "net_bps_regressor"
MODEL_FILE = "model.joblib"
MLLIB_DIR = "mllib"
PREDICTIONS_FILE = "predictions.parquet"
CARD_FILE = "card.json"
CHAMPION_FILE = "CHAMPION"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
NAME_RE = r"^[a-z][a-z0-9_]{0,63}$"
Status = Literal["champion", "challenger", "rejected"]


class RegistryError(Exception):
    """A registry operation failed (the message says which model, version and file)."""


class ModelNotFoundError(RegistryError, LookupError):
    """No such model, version or champion."""


class ModelIntegrityError(RegistryError, ValueError):
    """A stored model does not match its card (an artifact's sha256, a missing or extra
    file) or the feature schema the caller expects: it is not loaded."""


def _utc_ms(value: dt.datetime) -> dt.datetime:
    """``value`` in UTC, truncated to whole milliseconds (what MongoDB keeps)."""
    value = value.astimezone(dt.UTC)
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def _now() -> dt.datetime:
    return _utc_ms(dt.datetime.now(dt.UTC))


#: An aware datetime stored as UTC with millisecond precision.
UtcMs = Annotated[AwareDatetime, AfterValidator(_utc_ms)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureSpec(_Strict):
    """One model input: its ``name`` and value ``type`` (``float`` for every online feature)."""

    name: str = Field(min_length=1)
    type: str = Field(min_length=1)


class DataRange(_Strict):
    """The training data: event-time range ``[start, end]`` (UTC), ``rows`` and the sha256
    of the training table (hex)."""

    start: UtcMs
    end: UtcMs
    rows: int = Field(ge=0)
    table_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Target(_Strict):
    """What the model predicts of an opportunity window ending at ``t``.

    ``classification``: P(net spread at ``t + horizon_s`` > ``threshold_bps``), i.e. still
    executable after a latency of ``horizon_s`` seconds. ``regression``: the net spread at
    ``t + horizon_s``, bps (``threshold_bps`` unused).
    """

    kind: Literal["classification", "regression"]
    horizon_s: float = Field(ge=0)
    threshold_bps: float = 0.0
    description: str = ""


def _finite_metrics(value: dict[str, dict[str, float | None]]
                    ) -> dict[str, dict[str, float | None]]:
    for who, metrics in value.items():
        for metric, number in metrics.items():
            if number is not None and not math.isfinite(number):
                raise ValueError(f"metric {metric} of {who} is {number}: give None when "
                                 f"undefined")
    return value


class FoldMetrics(_Strict):
    """Metrics of one walk-forward fold: ``metrics[who][metric]`` with ``who`` ``model``
    (this version), a baseline (``persistence`` for a regressor; ``threshold_rule`` and
    ``base_rate`` for a classifier) or ``champion`` (the champion of the time,
    ``champion_version``, scored on the same test rows). Metrics: ``rmse``, ``mae`` (bps),
    ``brier``, ``auc_pr``; ``None`` when undefined (e.g. no positive in the fold)."""

    fold: int = Field(ge=0)
    train_start: UtcMs | None = None
    train_end: UtcMs | None = None
    test_start: UtcMs | None = None
    test_end: UtcMs | None = None
    rows: int | None = Field(None, ge=0)
    metrics: Annotated[dict[str, dict[str, float | None]], AfterValidator(_finite_metrics)]
    champion_version: int | None = Field(None, ge=1)


class FeatureBins(_Strict):
    """Reference distribution of one feature on the training rows, for the population
    stability index: ``fractions[i]`` of the rows have a value in bin ``i`` of the ``edges``
    (``(-inf, e0], (e0, e1], ..., (e_last, inf)``: one more bin than edges), ``missing`` of
    them none (NaN); together they sum to 1."""

    edges: list[float]
    fractions: list[float]
    missing: float = Field(ge=0, le=1)

    @field_validator("fractions")
    @classmethod
    def _one_per_bin(cls, value: list[float], info: ValidationInfo) -> list[float]:
        edges = info.data.get("edges", [])
        if len(value) != len(edges) + 1:
            raise ValueError(f"{len(edges)} edges need {len(edges) + 1} fractions, "
                             f"got {len(value)}")
        return value


class Artifact(_Strict):
    """One stored file of a version: ``path`` relative to the version directory (POSIX),
    ``sha256`` (hex) and size in ``bytes``."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Card(_Strict):
    """The model card of one version (``card.json``, mirrored in MongoDB ``models``).

    Set by the trainer: ``name``, ``target``, ``data``, ``features`` (ordered) and
    ``feature_schema_hash`` (:func:`feature_schema_hash` of them), ``code_version`` (git
    commit), ``libraries`` (package -> version), ``params`` (JSON values), ``folds`` (walk-
    forward metrics, :class:`FoldMetrics`), ``reference`` (training distribution of each
    feature, for drift). Set by the registry: ``version``, ``artifacts``, ``status``,
    ``reason``, ``status_at``; ``created_at`` defaults to the registration time (UTC).

    Raises:
        pydantic.ValidationError: a missing or malformed field, an unknown field, a
            non-finite metric, or a feature-schema hash that is not that of ``features``.
    """

    name: str = Field(pattern=NAME_RE)
    version: int | None = Field(None, ge=1)
    created_at: UtcMs = Field(default_factory=_now)
    target: Target
    data: DataRange
    features: list[FeatureSpec] = Field(min_length=1)
    feature_schema_hash: str
    code_version: str
    libraries: dict[str, str]
    params: dict[str, Any]
    folds: list[FoldMetrics]
    reference: dict[str, FeatureBins] = Field(default_factory=dict)
    artifacts: list[Artifact] = Field(default_factory=list)
    status: Status = "challenger"
    reason: str = ""
    status_at: UtcMs | None = None

    @field_validator("feature_schema_hash")
    @classmethod
    def _hash_of_features(cls, value: str, info: ValidationInfo) -> str:
        features = info.data.get("features")
        if features is not None:
            expected = feature_schema_hash([(f.name, f.type) for f in features])
            if value != expected:
                raise ValueError(f"feature_schema_hash {value} is not the hash of the card's "
                                 f"features ({expected})")
        return value

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]


@dataclass(frozen=True)
class RegistryConfig:
    """Where the registry lives: ``models_dir`` (``ARB_MODELS_DIR``, default
    ``<state_dir>/models``) and the MongoDB of the ``models`` mirror."""

    models_dir: Path
    mongo: MongoConfig

    @classmethod
    def of(cls, settings: Settings) -> RegistryConfig:
        """The registry slice of ``settings`` (``model_registry_dir`` and the MongoDB
        slice)."""
        return cls(models_dir=settings.model_registry_dir, mongo=MongoConfig.of(settings))

    def model_dir(self, name: str) -> Path:
        return self.models_dir / name


@dataclass(frozen=True)
class LoadedModel:
    """A verified model: the unpickled ``model``, its ``card``, the version directory
    ``path`` and ``mllib_path`` (the MLlib ``PipelineModel`` directory, or ``None``)."""

    model: Any
    card: Card
    path: Path
    mllib_path: Path | None

    def inputs(self, rows: Sequence[Sequence[float]]) -> Any:
        """``rows`` (each the card's features, in order) as the model takes them: a pandas
        DataFrame with the card's feature names when the model was fitted on one, else a
        float array of shape (rows, features)."""
        if hasattr(self.model, "feature_names_in_"):
            import pandas as pd

            return pd.DataFrame(list(rows), columns=self.card.feature_names)
        import numpy as np

        return np.asarray(rows, dtype=float)

    def positive_column(self) -> int:
        """Index of the positive class in ``predict_proba``'s columns (1/True, else the
        last; -1 for a model without classes)."""
        classes = list(getattr(self.model, "classes_", []))
        for positive in (1, True, "1"):
            if positive in classes:
                return classes.index(positive)
        return len(classes) - 1 if classes else -1


# --- hashes ------------------------------------------------------------------------------------

FeatureLike = str | tuple[str, str]


def feature_specs(features: Iterable[FeatureLike]) -> list[FeatureSpec]:
    """Feature names (type ``float``) or ``(name, type)`` pairs as specs, in order."""
    return [FeatureSpec(name=f, type="float") if isinstance(f, str)
            else FeatureSpec(name=f[0], type=f[1]) for f in features]


def feature_schema_hash(features: Iterable[FeatureLike]) -> str:
    """sha256 (hex) of the ordered ``[[name, type], ...]`` list as compact JSON; a bare name
    has type ``float``. Order matters: it is the model's column order."""
    pairs = [[s.name, s.type] for s in feature_specs(features)]
    return hashlib.sha256(json.dumps(pairs, separators=(",", ":")).encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(root: Path) -> list[str]:
    """Every regular file under ``root`` but the card, as sorted POSIX relative paths."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.is_file() and p.name != CARD_FILE)


def _artifacts(root: Path) -> list[Artifact]:
    return [Artifact(path=rel, sha256=file_sha256(root / rel), bytes=(root / rel).stat().st_size)
            for rel in _files(root)]


# --- files -------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (temporary file, fsync, ``os.replace``)."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex}")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _write_card(directory: Path, card: Card) -> None:
    _write_atomic(directory / CARD_FILE, card.model_dump_json(indent=1).encode())


@contextlib.contextmanager
def _locked(cfg: RegistryConfig, name: str) -> Iterator[Path]:
    """Hold the exclusive lock of model ``name`` (created with its directory); yields the
    model directory."""
    base = cfg.model_dir(name)
    base.mkdir(parents=True, exist_ok=True)
    with (base / LOCK_FILE).open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield base
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _check_name(name: str) -> str:
    if not re.match(NAME_RE, name):
        raise ValueError(f"model name must match {NAME_RE}, got {name!r}")
    return name


def versions(cfg: RegistryConfig, name: str) -> list[int]:
    """The registered versions of ``name``, ascending (``[]`` when none)."""
    base = cfg.model_dir(_check_name(name))
    if not base.is_dir():
        return []
    return sorted(int(p.name) for p in base.iterdir()
                  if p.name.isdigit() and (p / CARD_FILE).is_file())


def read_card(cfg: RegistryConfig, name: str, version: int) -> Card:
    """The card of ``name`` version ``version``.

    Raises:
        ModelNotFoundError: no such version.
        pydantic.ValidationError: ``card.json`` does not validate.
    """
    path = cfg.model_dir(_check_name(name)) / str(version) / CARD_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"model {name} has no version {version} in {cfg.models_dir}")
    return Card.model_validate_json(path.read_bytes())


def cards(cfg: RegistryConfig, name: str) -> list[Card]:
    """Every card of ``name``, by version."""
    return [read_card(cfg, name, v) for v in versions(cfg, name)]


def champion_version(cfg: RegistryConfig, name: str) -> int | None:
    """The version the champion pointer of ``name`` names, or ``None``: one small file read,
    cheap enough to poll (the alert worker does)."""
    path = cfg.model_dir(_check_name(name)) / CHAMPION_FILE
    try:
        return int(path.read_text().strip())
    except FileNotFoundError:
        return None


def champion(cfg: RegistryConfig, name: str) -> Card | None:
    """The card of the champion of ``name``, or ``None`` when there is none."""
    version = champion_version(cfg, name)
    return None if version is None else read_card(cfg, name, version)


# --- MongoDB mirror ----------------------------------------------------------------------------

@contextlib.contextmanager
def ml_database(conf: MongoConfig) -> Iterator[Database]:
    """A client of its own on ``conf.db`` with the indexes of
    :data:`~arbstream.store.mongo.schema.ML_INDEXES` ensured; closed at exit.

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    with connect(conf) as client:
        db = client[conf.db]
        ensure_ml_indexes(db)
        yield db


def mirror_document(card: Card) -> dict[str, Any]:
    """The ``models`` document of ``card``: ``_id`` ``<name>|<version>``, the card's fields
    and ``champion``."""
    return {"_id": f"{card.name}|{card.version}", **card.model_dump(),
            "champion": card.status == "champion"}


def mirror(cfg: RegistryConfig, *cards_: Card) -> None:
    """Upsert the ``models`` document of each card (replacing it whole).

    Raises:
        pymongo.errors.PyMongoError: connection or server errors.
    """
    with ml_database(cfg.mongo) as db:
        for card in cards_:
            doc = mirror_document(card)
            db[MODELS].replace_one({"_id": doc["_id"]}, doc, upsert=True)


def mirror_all(cfg: RegistryConfig, name: str) -> int:
    """Rewrite the mirror of every version of ``name`` from the files (e.g. after MongoDB was
    unreachable during :func:`register` or :func:`set_status`); returns the count."""
    all_cards = cards(cfg, name)
    if all_cards:
        mirror(cfg, *all_cards)
    return len(all_cards)


def mirrored(conf: MongoConfig, name: str) -> list[dict[str, Any]]:
    """The ``models`` documents of ``name``, by version."""
    with ml_database(conf) as db:
        return list(db[MODELS].find({"name": name}).sort("version", 1))


# --- writes ------------------------------------------------------------------------------------

def register(cfg: RegistryConfig, name: str, card: Card, sklearn_model: Any,
             predictions: pa.Table, mllib_dir: Path | None = None) -> int:
    """Store a new version of ``name`` as a ``challenger`` and mirror its card.

    The artifacts are written into a temporary directory (``model.joblib`` with joblib,
    ``predictions.parquet``, a copy of ``mllib_dir``), hashed into the card, then under the
    model's lock the next version number is taken, the card written and the directory renamed
    into place: a version is complete or absent, and two concurrent registrations get
    different versions.

    Args:
        card: the trainer's card (``card.name`` must be ``name``); ``version``,
            ``artifacts``, ``status``, ``reason`` and ``status_at`` are set here.
        sklearn_model: the fitted estimator (anything joblib can pickle).
        predictions: out-of-sample predictions (at least one row).
        mllib_dir: an MLlib ``PipelineModel`` saved directory, copied as ``mllib/``.

    Returns:
        The new version (previous maximum + 1, starting at 1).

    Raises:
        ValueError: a bad name, ``card.name`` differs, or no prediction row.
        FileNotFoundError: ``mllib_dir`` is not a directory.
        pymongo.errors.PyMongoError: the mirror could not be written (the version is stored;
            repair with :func:`mirror_all`).
    """
    import joblib
    import pyarrow.parquet as pq

    base = cfg.model_dir(_check_name(name))
    if card.name != name:
        raise ValueError(f"card is for model {card.name!r}, not {name!r}")
    if predictions.num_rows == 0:
        raise ValueError("predictions must hold the out-of-sample rows; got none")
    if mllib_dir is not None and not Path(mllib_dir).is_dir():
        raise FileNotFoundError(f"MLlib model directory {mllib_dir} does not exist")
    base.mkdir(parents=True, exist_ok=True)
    tmp = base / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        joblib.dump(sklearn_model, tmp / MODEL_FILE)
        pq.write_table(predictions, tmp / PREDICTIONS_FILE)
        if mllib_dir is not None:
            shutil.copytree(mllib_dir, tmp / MLLIB_DIR)
        for path in tmp.rglob("*"):
            if path.is_file():
                with path.open("rb") as f:
                    os.fsync(f.fileno())
        stored = card.model_copy(update={
            "artifacts": _artifacts(tmp), "status": "challenger", "status_at": _now(),
            "reason": "registered; not yet evaluated for promotion"})
        with _locked(cfg, name):
            version = max(versions(cfg, name), default=0) + 1
            stored = Card.model_validate({**stored.model_dump(), "version": version})
            _write_card(tmp, stored)
            os.rename(tmp, base / str(version))
            _fsync_dir(base)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    mirror(cfg, stored)
    return version


def set_status(cfg: RegistryConfig, name: str, version: int, status: Status,
               reason: str) -> Card:
    """Give version ``version`` of ``name`` ``status`` with ``reason``, on disk then in the
    mirror.

    ``champion``: the champion pointer moves to it and the previous champion becomes a
    ``challenger`` ("replaced by version N"). Any other status of the current champion
    removes the pointer (no champion until another is promoted).

    Returns:
        The updated card.

    Raises:
        ModelNotFoundError: no such version.
        pymongo.errors.PyMongoError: the mirror could not be written (the files are updated;
            repair with :func:`mirror_all`).
    """
    changed: list[Card] = []
    with _locked(cfg, name) as base:
        card = read_card(cfg, name, version)
        now = _now()
        previous = champion_version(cfg, name)
        if status == "champion" and previous not in (None, version):
            try:
                old = read_card(cfg, name, previous)
            except ModelNotFoundError:  # a pointer left dangling by hand: nothing to demote
                old = None
            if old is not None:
                old = old.model_copy(update={"status": "challenger", "status_at": now,
                                             "reason": f"replaced by version {version}"})
                _write_card(base / str(previous), old)
                changed.append(old)
        card = card.model_copy(update={"status": status, "reason": reason, "status_at": now})
        _write_card(base / str(version), card)
        changed.append(card)
        if status == "champion":
            _write_atomic(base / CHAMPION_FILE, f"{version}\n".encode())
        elif previous == version:
            (base / CHAMPION_FILE).unlink()
            _fsync_dir(base)
    mirror(cfg, *changed)
    return card


# --- reads -------------------------------------------------------------------------------------

def verify(cfg: RegistryConfig, card: Card) -> Path:
    """Check the files of ``card``'s version against it: every artifact present with its
    sha256, and no other file.

    Returns:
        The version directory.

    Raises:
        ModelIntegrityError: naming the first file that differs.
    """
    root = cfg.model_dir(card.name) / str(card.version)
    label = f"model {card.name} version {card.version}"
    expected = {a.path: a for a in card.artifacts}
    if not expected:
        raise ModelIntegrityError(f"{label}: the card lists no artifact")
    extra = sorted(set(_files(root)) - set(expected))
    if extra:
        raise ModelIntegrityError(f"{label}: files not in the card: {extra}")
    for rel, artifact in expected.items():
        path = root / rel
        if not path.is_file():
            raise ModelIntegrityError(f"{label}: artifact {rel} is missing")
        digest = file_sha256(path)
        if digest != artifact.sha256:
            raise ModelIntegrityError(f"{label}: artifact {rel} has sha256 {digest}, the card "
                                      f"says {artifact.sha256}: refusing to load it")
    return root


def check_features(card: Card, expected: Sequence[FeatureLike]) -> None:
    """Whether ``card``'s feature schema is the ``expected`` one (names, types, order).

    Raises:
        ModelIntegrityError: it is not (both lists named).
    """
    want = feature_schema_hash(expected)
    if card.feature_schema_hash != want:
        names = [s.name for s in feature_specs(expected)]
        raise ModelIntegrityError(
            f"model {card.name} version {card.version} was trained on features "
            f"{card.feature_names} (schema {card.feature_schema_hash[:12]}), the caller "
            f"computes {names} (schema {want[:12]}): refusing to load it")


def load(cfg: RegistryConfig, name: str, version: int | None = None, *,
         features: Sequence[FeatureLike]) -> LoadedModel:
    """Load version ``version`` of ``name`` (default: the champion) after checking it.

    Args:
        features: the feature names (type ``float``) or ``(name, type)`` pairs the caller
            will pass, in order (the alert worker: ``arbstream.features.FEATURE_NAMES``).

    Raises:
        ModelNotFoundError: no such version, or no champion.
        ModelIntegrityError: the feature schema differs from ``features``, or an artifact's
            sha256 differs from the card (checked before anything is unpickled).
    """
    import joblib

    if version is None:
        version = champion_version(cfg, name)
        if version is None:
            raise ModelNotFoundError(f"model {name} has no champion in {cfg.models_dir}")
    card = read_card(cfg, name, version)
    check_features(card, features)
    root = verify(cfg, card)
    mllib = root / MLLIB_DIR
    return LoadedModel(model=joblib.load(root / MODEL_FILE), card=card, path=root,
                       mllib_path=mllib if mllib.is_dir() else None)
