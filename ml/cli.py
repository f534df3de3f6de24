"""``arbstream ml``: the retraining job as a Typer sub-app (mounted by the shell).

``arbstream ml retrain`` runs :func:`ml.retrain.main` in this process on
``ARB_SPARK_MASTER``; with ``--every SECONDS`` it runs again every SECONDS (measured from
each run's start) until interrupted. ``spark-submit ml/retrain.py`` runs the same job on a
cluster.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Retrain and evaluate the spread and opportunity models.",
                  no_args_is_help=True)


@app.command("retrain")
def retrain_command(
    lake: Annotated[Path | None, typer.Option(help="lake directory (ARB_LAKE_DIR)")] = None,
    dataset: Annotated[str, typer.Option(help="iaqf or binance")] = "iaqf",
    folds: Annotated[int | None, typer.Option(help="walk-forward folds (ARB_ML_FOLDS)")] = None,
    out: Annotated[Path | None, typer.Option(help="result directory")] = None,
    no_register: Annotated[bool, typer.Option("--no-register")] = False,
    every: Annotated[float | None, typer.Option(
        help="run again every SECONDS (0: ARB_ML_RETRAIN_EVERY_SECONDS); default: once")] = None,
) -> None:
    """Build the training table, evaluate walk-forward, refit, cluster, register."""
    from arbstream.config import get_settings
    from ml.retrain import main

    settings = get_settings()
    argv = ["--dataset", dataset]
    for flag, value in (("--lake", lake), ("--folds", folds), ("--out", out)):
        if value is not None:
            argv += [flag, str(value)]
    if no_register:
        argv.append("--no-register")
    interval = settings.ml_retrain_every_seconds if every == 0 else every
    while True:
        started = time.monotonic()
        main(argv, master=settings.spark_master, driver_memory=settings.spark_driver_memory)
        if interval is None:
            return
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
