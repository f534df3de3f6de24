"""Which incarnation of a topic a streaming checkpoint's offsets belong to.

Kafka gives every topic a UUID (its *topic id*, KIP-516) when it is created; deleting and
recreating a topic gives it a new one, and its offsets start again at 0. A checkpoint holds
only offsets, so a query restarted on a topic that was recreated *and refilled past the
checkpointed offset* would see offsets that look valid and silently skip the new topic's first
records. Offsets going backwards is caught by the end-offset check; this catches the rest.

:class:`TopicIdentity` pins the id of every topic a query reads in a small JSON file next to
its checkpoint (``{"<topic>": "<topic id>"}``), and compares the broker's current ids with it
before each micro-batch is planned. The Kafka source (:mod:`spark_jobs.kafka_source`, option
``topicIdsFile``) does the comparing; the stream job passes one file per query
(:func:`ids_file`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: Directory, under the job's checkpoint root, holding ``<query>.json`` files.
IDS_DIR = "topic-ids"


def ids_file(checkpoint_root: Path, query: str) -> Path:
    """Where the stream job pins the topic ids of ``query``'s checkpoint."""
    return checkpoint_root / IDS_DIR / f"{query}.json"


class TopicIdentity:
    """The pinned topic ids of one query, loaded from and saved to ``path``.

    ``path`` must be on storage the driver can write with ordinary file I/O (the checkpoint
    root of a local or POSIX-mounted checkpoint).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pinned: dict[str, str] = (
            json.loads(path.read_text()) if path.is_file() else {}
        )

    def changed(self, current: dict[str, str]) -> list[tuple[str, str, str]]:
        """``(topic, pinned id, current id)`` of every topic of ``current`` whose id differs
        from its pinned one (topics pinned but absent from ``current`` are not reported: a
        deleted topic shows up as offsets going backwards)."""
        return [(t, self.pinned[t], cid) for t, cid in sorted(current.items())
                if t in self.pinned and self.pinned[t] != cid]

    def pin(self, current: dict[str, str]) -> None:
        """Record ``current``'s ids (over any pinned before) and save atomically when
        anything changed."""
        merged = {**self.pinned, **current}
        if merged == self.pinned and self.path.is_file():
            return
        self.pinned = merged
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(merged, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
