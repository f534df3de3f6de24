"""``arbmongo``: MongoDB's stream-job collections as a Spark batch source (PySpark's Python Data
Source API over pymongo), for batch jobs where no Parquet history exists yet.

The lake (:mod:`arbstream.store.lake`) is the history to train on; MongoDB holds only
opportunity windows, episodes and hourly thresholds, and only while the TTL keeps them. But a
deployment that ran before the lake existed has nothing else, and this source reads it::

    spark.dataSource.register(MongoDataSource)
    df = (spark.read.format("arbmongo")
          .option("uri", "mongodb://127.0.0.1:27017").option("db", "arbstream")
          .option("collection", "opportunities").load())

Options:

* ``uri`` (required; may hold credentials: it is a Spark option, so keep plans and logs that
  show options private), ``db`` (required), ``collection`` (required): one of
  :data:`COLLECTIONS`;
* ``since``, ``until`` (ISO-8601, naive means UTC): only documents whose time field is in
  ``[since, until)``; without either, the range of the stored documents, and documents without
  a time field come in one partition of their own (nothing is left out silently);
* ``sliceSeconds`` (default 86400): the width of one partition's time slice; slices are aligned
  to multiples of it since the epoch (UTC days by default, the lake's ``date`` partitions).

Schema: the collection's record fields (:mod:`arbstream.records`), ``_id`` as the record's id
field, timestamps UTC; a schema given with ``.schema(...)`` reads just those fields (any of the
stored ones, e.g. ``first_seen_at``). A field a document lacks is null. The driver reads the
time range with two indexed queries; each partition is one range query on an executor,
yielding Arrow batches of :data:`BATCH_ROWS` rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pyarrow as pa
from pymongo import ASCENDING, DESCENDING, MongoClient
from pyspark.sql.datasource import DataSource, DataSourceReader, InputPartition
from pyspark.sql.types import StructType

from arbstream.records import EPISODE_FIELDS, OPPORTUNITY_FIELDS, PERCENTILE_FIELDS
from arbstream.store.lake import arrow_schema
from arbstream.store.mongo.schema import EPISODES, OPPORTUNITIES, THRESHOLDS
from arbstream.timestamps import from_ms, parse_time, to_ms

FORMAT = "arbmongo"
#: Rows per Arrow batch a partition yields.
BATCH_ROWS = 10_000
DAY_S = 86_400


@dataclass(frozen=True)
class Collection:
    """How one collection maps to a record: its fields (name -> Spark SQL type), the field
    stored as ``_id``, and the time field that slices it."""

    fields: Mapping[str, str]
    id_field: str
    time_field: str


#: The collections the source reads. Episodes do not store their last ``event`` (only
#: ``status``), so it is not a column.
COLLECTIONS: dict[str, Collection] = {
    OPPORTUNITIES: Collection(OPPORTUNITY_FIELDS, "opportunity_id", "window_end"),
    EPISODES: Collection({k: v for k, v in EPISODE_FIELDS.items() if k != "event"},
                         "episode_id", "start"),
    THRESHOLDS: Collection(PERCENTILE_FIELDS, "threshold_id", "hour_start"),
}
_SPARK_TYPES = {"StringType": "string", "DoubleType": "double", "LongType": "bigint",
                "BooleanType": "boolean", "TimestampType": "timestamp"}


@dataclass(frozen=True)
class TimeSlice(InputPartition):
    """One partition: documents with the time field in ``[lo, hi)`` (UTC ms), or, with both
    ``None``, those without it."""

    lo: int | None
    hi: int | None


def collection(name: str) -> Collection:
    """The :data:`COLLECTIONS` entry of ``name``.

    Raises:
        ValueError: not one of them.
    """
    if name not in COLLECTIONS:
        raise ValueError(f"arbmongo reads the collections {sorted(COLLECTIONS)}, not {name!r}")
    return COLLECTIONS[name]


def ddl(fields: Mapping[str, str]) -> str:
    """Spark DDL of record fields, names quoted (``start``, ``end`` are SQL keywords)."""
    return ", ".join(f"`{name}` {kind}" for name, kind in fields.items())


def _client(uri: str) -> MongoClient:
    return MongoClient(uri, tz_aware=True)


def slices(lo: int, hi: int, width: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` (UTC ms) cut at the multiples of ``width`` ms since the epoch."""
    out = []
    start = lo
    while start < hi:
        end = min((start // width + 1) * width, hi)
        out.append((start, end))
        start = end
    return out


class MongoReader(DataSourceReader):
    """Plans the time slices on the driver, reads one per task; see the module docstring."""

    def __init__(self, options: Mapping[str, str], schema: StructType) -> None:
        missing = [k for k in ("uri", "db", "collection") if not options.get(k)]
        if missing:
            raise ValueError(f"arbmongo needs the options {missing}")
        self.uri, self.db, self.name = options["uri"], options["db"], options["collection"]
        self.spec = collection(self.name)
        self.since = _ms(options.get("since"))
        self.until = _ms(options.get("until"))
        self.width = round(float(options.get("sliceSeconds", DAY_S)) * 1000)
        if self.width <= 0:
            raise ValueError("sliceSeconds must be positive")
        kinds = {f.name: _SPARK_TYPES.get(type(f.dataType).__name__) for f in schema.fields}
        other = [name for name, kind in kinds.items() if kind is None]
        if other:
            raise ValueError(f"arbmongo columns are string, double, bigint, boolean or "
                             f"timestamp; not {other}")
        self.fields: dict[str, str] = kinds  # type: ignore[assignment]

    def partitions(self) -> list[InputPartition]:
        """The time slices of ``[since, until)``, or of the stored range plus the documents
        without a time field.

        Raises:
            pymongo.errors.PyMongoError: the server cannot be reached.
        """
        time = self.spec.time_field
        lo, hi, unbounded = self.since, self.until, self.since is None and self.until is None
        with _client(self.uri) as client:
            coll = client[self.db][self.name]
            has_time = {time: {"$type": "date"}}
            for bound, order in ((lo, ASCENDING), (hi, DESCENDING)):
                if bound is None:
                    doc = coll.find_one(has_time, {time: 1}, sort=[(time, order)])
                    if doc is not None:
                        edge = to_ms(doc[time])
                        lo, hi = (edge, hi) if order == ASCENDING else (lo, edge + 1)
        parts: list[InputPartition] = []
        if lo is not None and hi is not None:
            parts += [TimeSlice(a, b) for a, b in slices(lo, hi, self.width)]
        if unbounded:
            parts.append(TimeSlice(None, None))
        return parts

    def read(self, partition: TimeSlice) -> Iterator[pa.RecordBatch]:  # type: ignore[override]
        """Executor side: the slice's documents as Arrow batches of the schema.

        Raises:
            pymongo.errors.PyMongoError: connection or server errors.
            pyarrow.ArrowInvalid: a stored value of another type than its field's.
        """
        time = self.spec.time_field
        if partition.lo is None:
            query: dict[str, Any] = {"$or": [{time: None}, {time: {"$not": {"$type": "date"}}}]}
        else:
            query = {time: {"$gte": from_ms(partition.lo), "$lt": from_ms(partition.hi)}}
        stored = {name: "_id" if name == self.spec.id_field else name for name in self.fields}
        schema = arrow_schema(self.fields)
        with _client(self.uri) as client:
            cursor = client[self.db][self.name].find(
                query, {key: 1 for key in stored.values()}, batch_size=BATCH_ROWS)
            rows: list[dict[str, Any]] = []
            for doc in cursor:
                rows.append({name: doc.get(key) for name, key in stored.items()})
                if len(rows) >= BATCH_ROWS:
                    yield pa.RecordBatch.from_pylist(rows, schema=schema)
                    rows = []
            if rows:
                yield pa.RecordBatch.from_pylist(rows, schema=schema)


def _ms(value: str | None) -> int | None:
    return None if not value else to_ms(parse_time(value))


class MongoDataSource(DataSource):
    """``arbmongo`` (batch reading only); see the module docstring."""

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def schema(self) -> str:
        return ddl(collection(self.options.get("collection", "")).fields)

    def reader(self, schema: StructType) -> MongoReader:
        return MongoReader(self.options, schema)


def options(uri: str, db: str, collection: str, since: datetime | None = None,
            until: datetime | None = None, slice_seconds: float = DAY_S) -> dict[str, str]:
    """The reader options of a collection (``spark.read.format("arbmongo").options(**...)``);
    times naive-UTC or aware."""
    out = {"uri": uri, "db": db, "collection": collection,
           "sliceSeconds": json.dumps(slice_seconds)}
    for key, value in (("since", since), ("until", until)):
        if value is not None:
            out[key] = from_ms(to_ms(value)).isoformat()
    return out
