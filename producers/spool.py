"""The producer's optional on-disk spool: a write-ahead log of the records handed to Kafka.

With ``ARB_PRODUCER_SPOOL_DIR`` set, the publisher appends every record here *before* it
hands it to librdkafka, and acknowledges it when its delivery report confirms it. On start-up
the records not acknowledged are read back and sent first. A SIGKILL (or OOM kill, crash)
then loses nothing that reached the spool; it may duplicate records that were delivered but
whose acknowledgement was not yet persisted (see docs/producers.md).

Layout of the directory (one producer process per directory, enforced with a ``flock``):

* ``seg-<first seq, 20 digits>.log``: append-only segments of frames. A frame is
  ``u32 payload length | u32 CRC-32 of the payload | payload`` (little-endian), the payload
  ``u64 seq | u16 topic length | u16 exchange length | i32 key length (-1: no key) | topic |
  exchange | key | value``. Sequence numbers grow by one per record across segments. A new
  segment starts at each start-up and when the current one passes ``segment_bytes``.
* ``acked``: the acknowledged watermark, the highest ``seq`` such that it and every record
  before it were delivered, written atomically (temporary file + rename) at most every
  ``commit_interval`` seconds. Segments whose records are all at or below it are deleted.

A SIGKILL can leave a torn frame at the end of the last segment written (the ``write`` was
interrupted): on recovery the first frame that is incomplete or fails its CRC ends the
segment; the bytes from there are cut off (a torn tail: logged as a warning) and, when they
are more than one frame's worth of garbage in an older segment, kept in a ``.corrupt`` file
beside it and logged as an error: nothing is dropped silently.

Durability (``fsync``): ``"never"`` (default) relies on the page cache: a record is safe
from a process kill as soon as ``write`` returned, and from a machine crash once the kernel
wrote it back (about 30 s on Linux); ``"batch"`` calls ``fsync`` after each batch, before the
batch is handed to librdkafka, so a record is also safe from power loss.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import time
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, Literal, NamedTuple

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")  # payload length, CRC-32 of the payload
_META = struct.Struct("<QHHi")  # seq, topic length, exchange length, key length (-1: None)
#: Largest payload a frame may declare; anything above is treated as corruption (64 MiB).
MAX_PAYLOAD = 64 << 20

Fsync = Literal["never", "batch"]


class SpoolError(RuntimeError):
    """The spool directory cannot be used (locked by another process, unreadable)."""


class SpoolRecord(NamedTuple):
    """One spooled Kafka record; ``exchange`` is the feed it counts against (None: internal)."""

    seq: int
    topic: str
    key: bytes | None
    value: bytes
    exchange: str | None


def encode(record: SpoolRecord) -> bytes:
    """One frame holding ``record`` (header and payload)."""
    topic = record.topic.encode()
    exchange = (record.exchange or "").encode()
    key = record.key
    payload = b"".join((
        _META.pack(record.seq, len(topic), len(exchange), -1 if key is None else len(key)),
        topic, exchange, key or b"", record.value,
    ))
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _decode_payload(payload: bytes) -> SpoolRecord:
    seq, tlen, elen, klen = _META.unpack_from(payload)
    pos = _META.size
    topic = payload[pos:pos + tlen].decode()
    pos += tlen
    exchange = payload[pos:pos + elen].decode() or None
    pos += elen
    key = None if klen < 0 else payload[pos:pos + klen]
    pos += max(klen, 0)
    return SpoolRecord(seq, topic, key, payload[pos:], exchange)


def decode(data: bytes) -> tuple[list[SpoolRecord], int]:
    """The records of a segment's bytes and the length of its valid prefix (bytes).

    Decoding stops at the first frame that is incomplete, declares an impossible length or
    fails its CRC: ``valid < len(data)`` then, and ``data[valid:]`` is a torn or corrupt tail.
    """
    out: list[SpoolRecord] = []
    pos, end = 0, len(data)
    while pos + _HEADER.size <= end:
        length, crc = _HEADER.unpack_from(data, pos)
        start = pos + _HEADER.size
        if length < _META.size or length > MAX_PAYLOAD or start + length > end:
            break
        payload = data[start:start + length]
        if zlib.crc32(payload) != crc:
            break
        try:
            out.append(_decode_payload(payload))
        except (struct.error, UnicodeDecodeError):
            break
        pos = start + length
    return out, pos


def _segment_path(directory: Path, first_seq: int) -> Path:
    return directory / f"seg-{first_seq:020d}.log"


class Spool:
    """An append-only, acknowledged log of records in ``directory`` (module docstring).

    Args:
        directory: created when missing; one process at a time.
        fsync: ``"never"`` or ``"batch"`` (module docstring).
        segment_bytes: roll to a new segment past this size (bytes).
        commit_interval: most seconds between writes of the acknowledged watermark; a
            SIGKILL re-sends (duplicates) what was delivered within that time.

    Attributes:
        recovered: the records not acknowledged by the previous process, in ``seq`` order,
            to be sent before anything else.

    Raises:
        SpoolError: another process holds the directory.
    """

    def __init__(self, directory: Path, fsync: Fsync = "never",
                 segment_bytes: int = 16 << 20, commit_interval: float = 0.1) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.commit_interval = commit_interval
        self._lock = open(self.directory / "lock", "a")  # noqa: SIM115 - held while open
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise SpoolError(f"spool {self.directory} is in use by another process") from None
        self.watermark = self._read_watermark()
        self._committed = self.watermark
        self._committed_at = time.monotonic()
        self._segments: list[int] = []  # first seq of every segment on disk, ascending
        self.recovered = self._recover()
        last = max([self.watermark, *(r.seq for r in self.recovered)])
        self._next = last + 1
        # seqs above the watermark with no record to wait for (corrupt bytes): acked already
        present = {r.seq for r in self.recovered}
        self._acked: set[int] = set(range(self.watermark + 1, self._next)) - present
        self._advance()
        self._file: BinaryIO | None = None
        self._file_bytes = 0
        self._open_segment()
        self.commit(force=True)

    # --- recovery -------------------------------------------------------------------------
    def _read_watermark(self) -> int:
        try:
            return int((self.directory / "acked").read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError as exc:  # written atomically, so this is outside interference
            raise SpoolError(f"unreadable {self.directory / 'acked'}: {exc}") from exc

    def _recover(self) -> list[SpoolRecord]:
        paths = sorted(self.directory.glob("seg-*.log"))
        out: list[SpoolRecord] = []
        for i, path in enumerate(paths):
            data = path.read_bytes()
            records, valid = decode(data)
            if valid < len(data):
                self._cut(path, data, valid, last=i == len(paths) - 1)
            out.extend(r for r in records if r.seq > self.watermark)
            self._segments.append(int(path.stem.removeprefix("seg-")))
        if out:
            log.warning("spool %s: %d records not acknowledged by the previous run; "
                        "re-sending them first", self.directory, len(out))
        return out

    def _cut(self, path: Path, data: bytes, valid: int, last: bool) -> None:
        tail = len(data) - valid
        if last and tail <= _HEADER.size + MAX_PAYLOAD:
            log.warning("spool %s: torn tail of %d bytes cut (a write interrupted by a kill; "
                        "that record was never handed to Kafka)", path.name, tail)
        else:
            keep = path.with_suffix(f".corrupt-{valid}")
            keep.write_bytes(data[valid:])
            log.error("spool %s: %d corrupt bytes from offset %d moved to %s: records in "
                      "them cannot be recovered", path.name, tail, valid, keep.name)
        with open(path, "r+b") as handle:
            handle.truncate(valid)

    # --- writing --------------------------------------------------------------------------
    def _open_segment(self) -> None:
        if self._file is not None:
            self._file.close()
        path = _segment_path(self.directory, self._next)
        self._file = open(path, "ab", buffering=0)  # noqa: SIM115 - closed in close()
        self._file_bytes = 0
        if not self._segments or self._segments[-1] != self._next:  # else: an empty one reused
            self._segments.append(self._next)

    def append(self, items: Iterable[tuple[str, bytes | None, bytes, str | None]]
               ) -> list[SpoolRecord]:
        """Append ``(topic, key, value, exchange)`` items with one ``write`` (and one
        ``fsync`` with ``fsync="batch"``); return them as numbered records."""
        assert self._file is not None, "spool closed"
        records = []
        for topic, key, value, exchange in items:
            records.append(SpoolRecord(self._next, topic, key, value, exchange))
            self._next += 1
        if not records:
            return records
        data = b"".join(encode(r) for r in records)
        view = memoryview(data)
        while view:
            view = view[self._file.write(view):]
        if self.fsync == "batch":
            os.fsync(self._file.fileno())
        self._file_bytes += len(data)
        if self._file_bytes >= self.segment_bytes:
            self._open_segment()
        return records

    def ack(self, seq: int) -> None:
        """Mark record ``seq`` delivered (or settled: rerouted to the dead-letter topic)."""
        if seq == self.watermark + 1:
            self.watermark = seq
            self._advance()
        elif seq > self.watermark:
            self._acked.add(seq)

    def _advance(self) -> None:
        acked = self._acked
        while acked and self.watermark + 1 in acked:
            self.watermark += 1
            acked.discard(self.watermark)

    @property
    def pending(self) -> int:
        """Records appended and not yet acknowledged."""
        return self._next - 1 - self.watermark - len(self._acked)

    def commit(self, force: bool = False) -> None:
        """Persist the watermark (at most every ``commit_interval`` s unless ``force``) and
        delete the segments wholly below it."""
        now = time.monotonic()
        if self.watermark == self._committed or (
                not force and now - self._committed_at < self.commit_interval):
            return
        tmp = self.directory / "acked.tmp"
        tmp.write_text(str(self.watermark))
        os.replace(tmp, self.directory / "acked")
        self._committed, self._committed_at = self.watermark, now
        while len(self._segments) > 1 and self._segments[1] - 1 <= self.watermark:
            _segment_path(self.directory, self._segments.pop(0)).unlink(missing_ok=True)

    def close(self) -> None:
        """Persist the watermark, close the segment and release the directory."""
        if self._file is None:
            return
        self.commit(force=True)
        self._file.close()
        self._file = None
        if self.pending == 0:  # everything acknowledged: nothing to recover next time
            for first in self._segments:
                _segment_path(self.directory, first).unlink(missing_ok=True)
            self._segments.clear()
        fcntl.flock(self._lock, fcntl.LOCK_UN)
        self._lock.close()
