"""``arbstream data fetch``: download the three public recorded data sets into ``ARB_DATA_DIR``.

Each data set is a folder of files published in a public GitHub repository (the sources of
``datasets.json``, the same as the data's README): the IAQF one-minute bars
(``dhruvk1432/IAQF_2026_Inefficient_Markets``, ``data_raw/``), the Binance websocket frames
(``nkaz001/hftbacktest``, ``examples/``) and the exchanges' raw captures
(``bmoscon/cryptofeed``, ``sample_data/``). A file is fetched from
``https://raw.githubusercontent.com/<repo>/HEAD/<path>/<file>`` (``HEAD``: the default
branch) or from a mirror (``--base-url NAME=URL``), streamed into a temporary file beside its
target while its sha256 is computed, and moved into place only when the digest and size equal
the ones recorded in ``datasets.json`` (the files the tests and benchmarks were built on). A
file already present with the recorded digest is kept; a mismatch is an error naming the
file, the expected and the received digest, and leaves nothing behind. Transient HTTP errors
are retried (tenacity, exponential backoff).
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from tenacity import retry, retry_if_exception, stop_after_attempt, wait_exponential

from arbstream.console import console, err, fail, settings_or_exit

MANIFEST = Path(__file__).with_name("datasets.json")
RAW_URL = "https://raw.githubusercontent.com/{repo}/HEAD/{path}"
CHUNK = 1 << 20

app = typer.Typer(help="The recorded market data (ARB_DATA_DIR).", no_args_is_help=True)


class FetchError(RuntimeError):
    """A file could not be downloaded, or is not the recorded one."""


@dataclass(frozen=True)
class DataFile:
    """One recorded file: data set, name, sha256 (hex) and size in bytes."""

    dataset: str
    name: str
    sha256: str
    size: int


def manifest(path: Path = MANIFEST) -> dict[str, dict[str, Any]]:
    """The data sets: name → ``repo``, ``path`` and ``files`` (name → ``sha256``,
    ``bytes``)."""
    return json.loads(path.read_text())


def files_of(sets: dict[str, dict[str, Any]], only: Iterable[str] = ()) -> list[DataFile]:
    """The files of the data sets named in ``only`` (all when empty).

    Raises:
        ValueError: an unknown data set name.
    """
    wanted = list(only) or sorted(sets)
    unknown = sorted(set(wanted) - set(sets))
    if unknown:
        raise ValueError(f"unknown data sets {unknown}; known: {sorted(sets)}")
    return [DataFile(d, f, v["sha256"], v["bytes"])
            for d in wanted for f, v in sorted(sets[d]["files"].items())]


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    return isinstance(exc, urllib.error.URLError | TimeoutError | ConnectionError)


@retry(retry=retry_if_exception(_transient), stop=stop_after_attempt(4),
       wait=wait_exponential(multiplier=0.5, max=8), reraise=True)
def _download(url: str, tmp: Path, timeout: float) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with urllib.request.urlopen(url, timeout=timeout) as resp, tmp.open("wb") as out:
        for block in iter(lambda: resp.read(CHUNK), b""):
            h.update(block)
            size += len(block)
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    return h.hexdigest(), size


def fetch_file(f: DataFile, url: str, target_dir: Path, timeout: float = 60.0) -> bool:
    """Fetch one file into ``target_dir`` unless it is there already; ``True`` when it was
    downloaded.

    Raises:
        FetchError: the download failed (after retries) or the digest or size differs.
    """
    target = target_dir / f.name
    if target.is_file() and target.stat().st_size == f.size and sha256_of(target) == f.sha256:
        return False
    target_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{f.name}.part")
    try:
        digest, size = _download(url, tmp, timeout)
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{f.dataset}/{f.name}: cannot download {url}: {exc}") from None
    if digest != f.sha256 or size != f.size:
        tmp.unlink(missing_ok=True)
        raise FetchError(f"{f.dataset}/{f.name} from {url} is not the recorded file: sha256 "
                         f"{digest} ({size} bytes), expected {f.sha256} ({f.size} bytes)")
    tmp.replace(target)
    return True


def fetch(data_dir: Path, only: Iterable[str] = (), base_urls: dict[str, str] | None = None,
          progress: Callable[[DataFile, bool], None] | None = None) -> dict[str, int]:
    """Fetch every file of the chosen data sets into ``data_dir/<data set>/``.

    Args:
        base_urls: data set → the URL of its folder (a mirror); default the upstream
            repository's raw URL.
        progress: called with each file and whether it was downloaded.

    Returns:
        ``{"downloaded": n, "kept": n}``.

    Raises:
        ValueError: an unknown data set; FetchError: as :func:`fetch_file`.
    """
    sets = manifest()
    base_urls = base_urls or {}
    counts = {"downloaded": 0, "kept": 0}
    for f in files_of(sets, only):
        base = base_urls.get(f.dataset) or RAW_URL.format(repo=sets[f.dataset]["repo"],
                                                          path=sets[f.dataset]["path"])
        got = fetch_file(f, f"{base.rstrip('/')}/{f.name}", data_dir / f.dataset)
        counts["downloaded" if got else "kept"] += 1
        if progress is not None:
            progress(f, got)
    return counts


@app.command("fetch", help="Download the recorded data sets (IAQF bars, Binance websocket "
             "frames, exchange captures) from their public sources into ARB_DATA_DIR, checking "
             "each file's sha256 against the recorded one.")
def fetch_command(
    only: Annotated[list[str] | None, typer.Option(
        help="a data set (repeatable): iaqf-2023-03, binance-ws-2024-08, "
        "exchange-ws-captures")] = None,
    base_url: Annotated[list[str] | None, typer.Option(
        help="NAME=URL: fetch data set NAME from a mirror folder (repeatable)")] = None,
) -> None:
    """:func:`fetch` into ``ARB_DATA_DIR`` with a line per file."""
    settings = settings_or_exit()
    mirrors: dict[str, str] = {}
    for item in base_url or []:
        name, sep, url = item.partition("=")
        if not sep or not url:
            raise typer.BadParameter(f"--base-url takes NAME=URL, got {item!r}")
        mirrors[name] = url

    def show(f: DataFile, got: bool) -> None:
        err.print(f"{'fetched' if got else 'present'}: {f.dataset}/{f.name}")

    try:
        counts = fetch(settings.data_dir, only or (), mirrors, show)
    except (ValueError, FetchError, OSError) as exc:
        raise fail(exc) from None
    console.print(f"{counts['downloaded']} files downloaded, {counts['kept']} already present "
                  f"and verified; data: {settings.data_dir}")
