"""The Parquet history of the stream ("the lake"): every spread, feature, episode and final
opportunity record, for retraining models on what the stream really computed.

MongoDB keeps only opportunity windows (a selection-biased sample); the lake keeps every
record of the types in :data:`RECORDS`, written by the stream job
(:mod:`spark_jobs.sinks.records`) and by ``arbstream backfill`` (:mod:`spark_jobs.backfill`).

Layout (Hive partitioning, readable by pyarrow, pandas, DuckDB and ``spark.read.parquet``)::

    <lake_dir>/<record>/date=YYYY-MM-DD/<key>.parquet

* ``record``: ``spread``, ``feature``, ``episode`` or ``opportunity``; the columns are exactly
  that record's fields (:mod:`arbstream.records`), in that order, timestamps
  ``timestamp[us, tz=UTC]``, ``emitted_ts`` int64 UTC ms.
* ``date``: the UTC date of :data:`TIME_COLUMN` (``window_end``; an episode's ``start``); a
  writer's rows spanning midnight go to one file per date.
* ``key``: the writer's batch, e.g. ``market-0000000042-00001`` (the stream: micro-batch id,
  task partition) or ``backfill-iaqf-00000007-1`` (a backfill: chunk, bucket). A file is
  written to a temporary name beside it, flushed to disk and renamed into place, so a reader
  never sees a partial file and a replayed batch overwrites its own files instead of adding
  rows; two writes of one key are idempotent only if they carry the same rows, which the
  stream's deterministic batches guarantee.

Versions: ``episode`` holds every event (``opened``, ``closed``), ``opportunity`` the
``final`` and ``retracted`` versions (no ``early`` one). When input resumes after every
exchange went idle, the stream emits an open episode or opportunity again, complete, under
the same id: take the last version per id (:func:`latest`).

Compaction (:func:`compact`, ``arbstream lake compact``): the stream writes a file per
micro-batch, task and date (about 30,000 an hour at a 0.5 s trigger); compaction merges a
date partition's stream files into one ``compacted-<digest>.parquet`` (a manifest beside it
while it runs makes it crash-safe), and leaves alone the newest micro-batch of each checkpoint
(the one Spark may still replay after a crash, which would rewrite its files). Readers of many
files take the lake's shared lock (:func:`locked`) and compaction the exclusive one.

Configuration: :class:`LakeConfig` (``ARB_LAKE_DIR``, default ``<state_dir>/lake``), small and
picklable for Spark executors.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import operator
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from arbstream.records import EPISODE_FIELDS, FEATURE_FIELDS, OPPORTUNITY_FIELDS, SPREAD_FIELDS
from arbstream.timestamps import to_utc

if TYPE_CHECKING:
    from arbstream.config import Settings

#: The record types of the lake and their fields (name -> Spark SQL type).
RECORDS: dict[str, dict[str, str]] = {
    "spread": SPREAD_FIELDS, "feature": FEATURE_FIELDS, "episode": EPISODE_FIELDS,
    "opportunity": OPPORTUNITY_FIELDS,
}
#: The column whose UTC date partitions each record type.
TIME_COLUMN: dict[str, str] = {
    "spread": "window_end", "feature": "window_end", "episode": "start",
    "opportunity": "window_end",
}
#: The id of each record type: rows of one id are versions of one thing (:func:`latest`).
ID_COLUMN: dict[str, str] = {
    "spread": "opportunity_id", "feature": "feature_id", "episode": "episode_id",
    "opportunity": "opportunity_id",
}
#: The Hive partition column Spark and pyarrow add when reading a record's directory.
PARTITION = "date"
_ARROW = {"string": pa.string(), "double": pa.float64(), "bigint": pa.int64(),
          "boolean": pa.bool_(), "timestamp": pa.timestamp("us", tz="UTC")}


def arrow_schema(fields: Mapping[str, str]) -> pa.Schema:
    """The Arrow schema of record fields (name -> Spark SQL type of
    :mod:`arbstream.records`): timestamps ``timestamp[us, tz=UTC]``, ``bigint`` int64.

    Raises:
        KeyError: a type other than ``string``, ``double``, ``bigint``, ``boolean``,
            ``timestamp``.
    """
    return pa.schema([(name, _ARROW[kind]) for name, kind in fields.items()])


#: The Parquet schema of each record type.
SCHEMAS: dict[str, pa.Schema] = {record: arrow_schema(f) for record, f in RECORDS.items()}
_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$")


@dataclass(frozen=True)
class LakeConfig:
    """Where the lake is: ``dir``, the root holding one directory per record type."""

    dir: Path

    @classmethod
    def of(cls, settings: Settings) -> LakeConfig:
        """The lake of ``settings``: ``ARB_LAKE_DIR``, or ``<state_dir>/lake``."""
        return cls(Path(settings.lake_root))


def _check_record(record: str) -> None:
    if record not in RECORDS:
        raise ValueError(f"unknown lake record {record!r}; one of {sorted(RECORDS)}")


def path(cfg: LakeConfig, record: str) -> Path:
    """The directory of one record type: ``spark.read.parquet(str(path(cfg, "spread")))`` reads
    it with ``date`` (DateType) as the partition column.

    Raises:
        ValueError: ``record`` is not one of :data:`RECORDS`.
    """
    _check_record(record)
    return cfg.dir / record


def to_table(record: str, rows: pa.Table | Iterable[Mapping[str, Any]]) -> pa.Table:
    """``rows`` as a table of the record's schema (:data:`SCHEMAS`).

    Args:
        record: a key of :data:`RECORDS`.
        rows: a table holding at least the record's columns (others are dropped, types cast:
            naive timestamps are UTC), or dicts (missing keys are null, others ignored;
            datetimes naive or aware).

    Raises:
        ValueError: an unknown record, a table without one of the record's columns, or a
            value that does not convert (``pyarrow.ArrowInvalid`` is a ``ValueError``).
    """
    _check_record(record)
    schema = SCHEMAS[record]
    if not isinstance(rows, pa.Table):
        return pa.Table.from_pylist(list(rows), schema=schema)
    missing = [n for n in schema.names if n not in rows.column_names]
    if missing:
        raise ValueError(f"{record} rows lack columns {missing}")
    columns = []
    for field in schema:
        column = rows.column(field.name)
        if pa.types.is_timestamp(column.type) and column.type.tz is None:
            column = pc.assume_timezone(column, "UTC")
        columns.append(column.cast(field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def _atomic_write(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``target`` through a hidden temporary file in the same directory (ignored by
    pyarrow and Spark): ``write(handle)``, fsync, then rename over ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the rename itself survives a crash
    finally:
        os.close(fd)


def write(cfg: LakeConfig, record: str, rows: pa.Table | Iterable[Mapping[str, Any]],
          key: str) -> list[Path]:
    """Write one batch of ``record`` rows as ``<record>/date=YYYY-MM-DD/<key>.parquet``, one
    file per UTC date of the rows' :data:`TIME_COLUMN`, each atomically (an existing file of
    that key and date is replaced).

    Args:
        cfg: the lake.
        record: a key of :data:`RECORDS`.
        rows: a table or dicts (:func:`to_table`); none writes nothing.
        key: the writer's batch, ``[A-Za-z0-9][A-Za-z0-9_.-]*`` (at most 200 characters).

    Returns:
        The files written, by date.

    Raises:
        ValueError: an unknown record, a bad key, rows that do not convert, or a row without
            its time column.
        OSError: the lake cannot be written.
    """
    if not _KEY_RE.match(key):
        raise ValueError(f"lake key {key!r} must match {_KEY_RE.pattern}")
    table = to_table(record, rows)
    if table.num_rows == 0:
        return []
    column = TIME_COLUMN[record]
    days = pc.cast(table.column(column), pa.date32())
    if days.null_count:
        raise ValueError(f"{days.null_count} {record} row(s) without {column}")
    written = []
    for day in sorted(pc.unique(days).to_pylist()):
        part = table.filter(pc.equal(days, pa.scalar(day, pa.date32())))
        target = path(cfg, record) / f"{PARTITION}={day.isoformat()}" / f"{key}.parquet"
        _atomic_write(target, lambda h, part=part: pq.write_table(part, h, compression="zstd"))
        written.append(target)
    return written


def remove(cfg: LakeConfig, key_prefix: str) -> int:
    """Delete every file whose key starts with ``key_prefix`` (any record type and date), e.g.
    an input's earlier backfill before it is backfilled again. Returns the files deleted.

    Raises:
        ValueError: an empty prefix (it would delete the whole history).
    """
    if not key_prefix:
        raise ValueError("refusing to remove the whole lake: give a key prefix")
    removed = 0
    for record in RECORDS:
        for file in path(cfg, record).glob(f"date=*/{key_prefix}*.parquet"):
            file.unlink()
            removed += 1
    return removed


def _utc(value: datetime) -> pa.Scalar:
    return pa.scalar(to_utc(value), pa.timestamp("us", tz="UTC"))


def read(cfg: LakeConfig, record: str, since: datetime | None = None,
         until: datetime | None = None) -> pa.Table:
    """The rows of ``record`` whose :data:`TIME_COLUMN` is in ``[since, until)`` (naive means
    UTC; ``None`` is unbounded), in no particular order; only the date partitions that can
    hold them are opened. An empty lake gives an empty table.

    Returns:
        A table of the record's schema (:data:`SCHEMAS`; no ``date`` column).

    Raises:
        ValueError: an unknown record.
        OSError, pyarrow.ArrowInvalid: a file cannot be read.
    """
    root = path(cfg, record)
    schema = SCHEMAS[record]
    if not root.is_dir():
        return schema.empty_table()
    partitioning = ds.partitioning(pa.schema([(PARTITION, pa.date32())]), flavor="hive")
    dataset = ds.dataset(root, format="parquet", partitioning=partitioning,
                         schema=pa.schema([*schema, pa.field(PARTITION, pa.date32())]))
    time, day = ds.field(TIME_COLUMN[record]), ds.field(PARTITION)
    where = []
    if since is not None:  # the partitions' dates prune the files, the times the rows
        where += [time >= _utc(since), day >= pa.scalar(to_utc(since).date(), pa.date32())]
    if until is not None:
        where += [time < _utc(until), day <= pa.scalar(to_utc(until).date(), pa.date32())]
    with locked(cfg):  # no compaction deletes a listed file meanwhile
        return dataset.to_table(columns=schema.names, filter=functools.reduce(
            operator.and_, where) if where else None)


def latest(table: pa.Table, record: str) -> pa.Table:
    """The last version of each id (:data:`ID_COLUMN`) among ``record`` rows: for
    opportunities the largest ``emitted_ts`` (then ``windows``), for episodes the most
    ``windows`` (then the latest ``end``, ``closed`` after ``opened``); spreads and features
    have one version each and are returned as they are.

    Raises:
        ValueError: an unknown record.
    """
    _check_record(record)
    if record not in ("opportunity", "episode") or table.num_rows == 0:
        return table
    ranks = ([table["emitted_ts"], table["windows"]] if record == "opportunity" else
             [table["windows"], table["end"], pc.equal(table["event"], "closed")])
    ranked = pa.table({"id": table[ID_COLUMN[record]],
                       **{f"r{i}": r for i, r in enumerate(ranks)},
                       "row": pa.array(range(table.num_rows), pa.int64())})
    order = ranked.sort_by([("id", "ascending"),
                            *[(f"r{i}", "descending") for i in range(len(ranks))]])
    ids = order["id"].to_pylist()
    rows = order["row"].to_pylist()
    first = [rows[i] for i in range(len(ids)) if i == 0 or ids[i] != ids[i - 1]]
    return table.take(pa.array(first, pa.int64()))


# --- compaction ---------------------------------------------------------------------------------

#: A stream file's key: ``market[-<query id, 12 hex>]-<batch, 10 digits>-<partition, 5>``.
STREAM_KEY = re.compile(r"^(?P<run>market(?:-[0-9a-f]{12})?)-(?P<batch>\d{10})-\d{5}$")
#: Prefix of a compacted file's name.
COMPACTED = "compacted-"
#: Prefix of a compaction's manifest (``_``: pyarrow and Spark do not read it as data).
MANIFEST = "_compaction-"
#: Hidden temporary files older than this are a crashed writer's and are removed, s.
STALE_TMP_S = 3600.0
LOCK_FILE = ".lock"


@contextmanager
def locked(cfg: LakeConfig, shared: bool = True) -> Iterator[None]:
    """Hold the lake's lock (``<lake>/.lock``, ``fcntl.flock``): shared for readers of many
    files (a retrain), exclusive for :func:`compact`, so a compaction never deletes a file
    a reader listed and a reader never sees a file and its compacted copy. Blocks until
    granted. The stream's writers take no lock (see :func:`compact`). ``flock`` is
    per-host: on a lake shared by several hosts, run compaction where nothing reads.

    Raises:
        OSError: the lock file cannot be created.
    """
    cfg.dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.dir / LOCK_FILE, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _recover(directory: Path, dry_run: bool) -> int:
    """Finish or discard the compactions a crash interrupted in ``directory``: a manifest
    whose compacted file exists has its remaining sources deleted; one without it (the crash
    came before the compacted file was in place) is discarded, its sources untouched.
    Returns the source files deleted."""
    removed = 0
    for manifest in sorted(directory.glob(f"{MANIFEST}*.json")):
        entry = json.loads(manifest.read_text())
        if (directory / entry["compacted"]).is_file():
            for name in entry["sources"]:
                source = directory / name
                if source.is_file():
                    removed += 1
                    if not dry_run:
                        source.unlink()
        if not dry_run:
            manifest.unlink()
    return removed


def _remove_stale_tmp(directory: Path, now: float) -> None:
    for tmp in directory.glob(".*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if now - tmp.stat().st_mtime > STALE_TMP_S:
                tmp.unlink()


def compact(cfg: LakeConfig, records: Iterable[str] | None = None,
            dry_run: bool = False) -> dict[str, int]:
    """Merge the stream's small files (:data:`STREAM_KEY`) of each record type and date into
    one ``compacted-<sha256 of the source names, 16 hex>.parquet`` per run of compaction,
    rows sorted by the record's time column, written atomically; then delete the sources.
    Run it once a day after the date closed and each date ends as one file.

    Safe while the stream writes, while readers hold :func:`locked` (it waits for them), and
    after a crash at any point:

    * the newest micro-batch of each checkpoint run (across all records and dates) is left
      alone: Spark replays at most that batch after a restart, and a replay rewrites its
      files by key;
    * before the compacted file, a manifest ``_compaction-<digest>.json`` (ignored by pyarrow
      and Spark) names it and its sources; a later run finishes a compaction whose compacted
      file exists (deletes the sources left) and discards one whose compacted file does not;
    * backfill files (``backfill-*``) are left alone: they are written in large chunks;
    * hidden temporary files older than :data:`STALE_TMP_S` (a crashed writer's) are removed.

    Args:
        cfg: the lake.
        records: the record types (default all of :data:`RECORDS`).
        dry_run: count only, change nothing.

    Returns:
        ``{"partitions": date partitions merged, "merged": source files merged, "removed":
        source files deleted (merged now, or by an interrupted run), "kept": stream files
        left as they are (the newest batches, single files)}``.

    Raises:
        ValueError: an unknown record type.
        OSError, pyarrow.ArrowInvalid: a file cannot be read or written.
    """
    chosen = list(records) if records is not None else list(RECORDS)
    for record in chosen:
        _check_record(record)
    counts = {"partitions": 0, "merged": 0, "removed": 0, "kept": 0}
    with locked(cfg, shared=False):
        now = time.time()
        directories = [d for r in chosen for d in sorted(path(cfg, r).glob(f"{PARTITION}=*"))]
        for directory in directories:
            counts["removed"] += _recover(directory, dry_run)
            if not dry_run:
                _remove_stale_tmp(directory, now)
        keyed = [(f, m["run"], int(m["batch"])) for d in directories
                 for f in sorted(d.glob("market*.parquet"))
                 if (m := STREAM_KEY.match(f.stem)) and f.is_file()]
        newest: dict[str, int] = {}
        for _, run, batch in keyed:
            newest[run] = max(newest.get(run, -1), batch)
        groups: dict[Path, list[Path]] = {}
        for f, run, batch in keyed:
            if batch == newest[run]:
                counts["kept"] += 1
            else:
                groups.setdefault(f.parent, []).append(f)
        for directory, sources in groups.items():
            if len(sources) == 1:
                counts["kept"] += 1
                continue
            counts["partitions"] += 1
            counts["merged"] += len(sources)
            counts["removed"] += len(sources)
            if dry_run:
                continue
            names = sorted(f.name for f in sources)
            digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
            target = directory / f"{COMPACTED}{digest}.parquet"
            manifest = directory / f"{MANIFEST}{digest}.json"
            entry = json.dumps({"compacted": target.name, "sources": names}).encode()
            _atomic_write(manifest, lambda h, e=entry: h.write(e))
            record = directory.parent.name
            table = pa.concat_tables([to_table(record, pq.read_table(f)) for f in sources])
            table = table.sort_by([(TIME_COLUMN[record], "ascending")])
            _atomic_write(target, lambda h, t=table: pq.write_table(t, h, compression="zstd"))
            for f in sources:
                f.unlink()
            manifest.unlink()
    return counts
