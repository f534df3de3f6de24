"""Pack arbstream's code for a Spark cluster: one zip for ``spark-submit --py-files``.

    python tools/pack_job.py [--out dist/arbstream-jobs.zip] [--package NAME ...]

The zip holds the packages the Spark jobs run from, as importable top-level packages:
``arbstream`` (configuration, schemas, the stores), ``spark_jobs`` (the stream job, whose
Python data sources, ``foreachBatch`` sinks and stateful operator run in the executors) and
``ml`` (``ml/retrain.py``). Spark puts it on ``sys.path`` of the driver and of every executor's
Python worker. The third-party dependencies (pyspark's own aside: pandas, pyarrow, orjson,
xxhash, pydantic-settings, pymongo, ...) are not in it: the executors' interpreter
(``PYSPARK_PYTHON``) must have them (docs/cluster.md).

The archive is reproducible: entries sorted, every timestamp 1980-01-01, no ``__pycache__``,
so the same code gives the same bytes (its sha256 is printed).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: The packages the Spark jobs import (``spark_jobs/arbitrage.py``, ``ml/retrain.py``).
JOB_PACKAGES = ("arbstream", "spark_jobs", "ml")
_SKIP = {"__pycache__"}
_SKIP_SUFFIXES = {".pyc", ".pyo"}


def package_files(package: str, root: Path = REPO) -> list[Path]:
    """Every file of ``package`` under ``root`` (sources and package data), relative to
    ``root``, sorted; caches left out.

    Raises:
        FileNotFoundError: ``root/package/__init__.py`` does not exist.
    """
    base = root / package
    if not (base / "__init__.py").is_file():
        raise FileNotFoundError(f"{base} is not a Python package (no __init__.py)")
    return sorted(p.relative_to(root) for p in base.rglob("*") if p.is_file()
                  and not _SKIP & set(p.relative_to(root).parts)
                  and p.suffix not in _SKIP_SUFFIXES)


def pack(out: Path, packages: Sequence[str] = JOB_PACKAGES, root: Path = REPO) -> Path:
    """Write the zip of ``packages`` (top-level package directories under ``root``) to
    ``out`` (its parent created); returns ``out``.

    Raises:
        FileNotFoundError: a package is not under ``root``.
    """
    files = sorted({f for p in packages for f in package_files(p, root)})
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for rel in files:
            info = zipfile.ZipInfo(rel.as_posix(), date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, (root / rel).read_bytes())
    tmp.replace(out)
    return out


def sha256(path: Path) -> str:
    """The hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: pack, print the zip's path, size, file count and sha256."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "arbstream-jobs.zip",
                        help="the zip to write (default dist/arbstream-jobs.zip)")
    parser.add_argument("--package", action="append", dest="packages", metavar="NAME",
                        help=f"a top-level package to ship (repeatable; default "
                        f"{' '.join(JOB_PACKAGES)})")
    args = parser.parse_args(argv)
    try:
        out = pack(args.out, args.packages or JOB_PACKAGES)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    with zipfile.ZipFile(out) as archive:
        count = len(archive.namelist())
    print(f"{out} ({out.stat().st_size:,} bytes, {count} files, sha256 {sha256(out)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
