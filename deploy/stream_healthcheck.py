#!/usr/bin/env python3
"""Healthcheck of the ``arbstream stream`` container (docker-compose.yml, docs/docker.md).

Healthy when both hold:

1. the Spark driver answers: the UI's REST API (``--ui``, default ``http://127.0.0.1:4040``,
   bound to the container's loopback) lists the application;
2. every streaming query (``--queries``, default ``market,trades,health``) has committed at
   least one micro-batch under ``<ARB_STATE_DIR>/checkpoints/<query>/commits/``: its initial
   offsets are pinned, so records published from then on are read (what the demo's replay
   waits for), and the query runs (``arbstream stream`` exits when any query fails).

``--max-idle SECONDS`` also requires the newest commit of the ``--fresh`` query (default
``health``, fed by the producers' ``md.health`` heartbeats every ARB_HEALTH_INTERVAL_SECONDS)
to be at most that old (file modification time, UTC wall clock): the job is processing, not
only alive. Leave it off when nothing is published (the demo after its replay).

Exit status 0 when healthy, 1 otherwise, with one line saying why. Standard library only: it
runs every few seconds next to the job.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

QUERIES = ("market", "trades", "health")


def latest_commit(checkpoint: Path) -> tuple[int, float] | None:
    """``(batch id, mtime in Unix seconds)`` of the newest commit of one query's checkpoint
    (files named by batch id in ``commits/``), or ``None`` when it has none."""
    commits = checkpoint / "commits"
    if not commits.is_dir():
        return None
    ids = [int(p.name) for p in commits.iterdir() if p.name.isdigit()]
    if not ids:
        return None
    newest = max(ids)
    return newest, (commits / str(newest)).stat().st_mtime


def check(ui: str, root: Path, queries: list[str], fresh: str, max_idle: float | None,
          timeout: float = 5.0) -> str | None:
    """``None`` when healthy, else the reason (one line).

    Args:
        ui: base URL of the Spark UI (REST API under ``/api/v1``).
        root: the checkpoint directory of the job (``<state_dir>/checkpoints``).
        queries: query names that must have committed a micro-batch.
        fresh: the query whose newest commit ``max_idle`` bounds.
        max_idle: seconds; ``None``: no freshness check.
        timeout: seconds per HTTP request.
    """
    try:
        with urllib.request.urlopen(f"{ui.rstrip('/')}/api/v1/applications",
                                    timeout=timeout) as resp:
            apps = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"Spark driver not answering at {ui}: {exc}"
    if not apps:
        return f"Spark UI at {ui} lists no application"
    commits = {q: latest_commit(root / q) for q in queries}
    waiting = sorted(q for q, c in commits.items() if c is None)
    if waiting:
        return f"queries without a committed micro-batch yet: {', '.join(waiting)} ({root})"
    if max_idle is not None:
        last = commits.get(fresh) or latest_commit(root / fresh)
        if last is None:
            return f"query {fresh} has no committed micro-batch ({root})"
        idle = time.time() - last[1]
        if idle > max_idle:
            return f"query {fresh}: last micro-batch {last[0]} committed {idle:.0f} s ago"
    return None


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring. Returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ui", default="http://127.0.0.1:4040", help="Spark UI base URL")
    parser.add_argument("--checkpoints", type=Path, default=None,
                        help="checkpoint directory (default <ARB_STATE_DIR>/checkpoints)")
    parser.add_argument("--queries", default=",".join(QUERIES), help="comma-separated names")
    parser.add_argument("--fresh", default="health", help="query checked by --max-idle")
    parser.add_argument("--max-idle", type=float, default=None, help="seconds")
    args = parser.parse_args(argv)
    root = args.checkpoints or Path(os.environ.get("ARB_STATE_DIR", ".state")) / "checkpoints"
    queries = [q for q in args.queries.split(",") if q]
    reason = check(args.ui, root, queries, args.fresh, args.max_idle)
    print(reason or f"healthy: {', '.join(queries)} committed; Spark driver at {args.ui}")
    return 1 if reason else 0


if __name__ == "__main__":
    sys.exit(main())
