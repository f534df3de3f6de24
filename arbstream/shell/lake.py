"""``arbstream lake``: housekeeping of the Parquet history (``ARB_LAKE_DIR``,
:mod:`arbstream.store.lake`)."""

from __future__ import annotations

from typing import Annotated

import typer

from arbstream.console import console, fail, settings_or_exit
from arbstream.store import lake

app = typer.Typer(help="The Parquet history (ARB_LAKE_DIR).", no_args_is_help=True)


@app.command(help="Merge the stream's per-micro-batch files of each record and date into one "
             "file; safe while the stream runs (its newest micro-batch is left alone).")
def compact(
    record: Annotated[list[str] | None, typer.Option(
        help=f"record type, repeatable (default all: {', '.join(lake.RECORDS)})")] = None,
    dry_run: Annotated[bool, typer.Option(help="count only, change nothing")] = False,
) -> None:
    """``lake.compact`` over ``ARB_LAKE_DIR``, with a one-line report."""
    settings = settings_or_exit()
    cfg = lake.LakeConfig.of(settings)
    try:
        counts = lake.compact(cfg, record or None, dry_run=dry_run)
    except (ValueError, OSError) as exc:
        raise fail(exc) from None
    verb = "would merge" if dry_run else "merged"
    console.print(f"{verb} {counts['merged']} files into {counts['partitions']} (date "
                  f"partitions), removed {counts['removed']}, kept {counts['kept']} "
                  f"as they are; lake: {cfg.dir}")
