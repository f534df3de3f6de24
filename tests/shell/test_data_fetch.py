"""``arbstream data fetch`` against a local HTTP server that serves the recorded data (no
test needs the internet): the manifest's digests are those of the recorded files, a fetch
reproduces them byte for byte, a second fetch downloads nothing, and a corrupted or missing
file is an error that leaves nothing behind."""

from __future__ import annotations

import functools
import hashlib
import http.server
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from arbstream.shell import data as D

SMALL = "exchange-ws-captures"


@pytest.fixture(scope="module")
def server(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """An HTTP server of a copy of the recorded data (so a test can corrupt a file)."""
    root = tmp_path_factory.mktemp("mirror")
    shutil.copytree(data_dir / SMALL, root / SMALL)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()


def test_manifest_is_the_recorded_data(data_dir: Path) -> None:
    sets = D.manifest()
    assert set(sets) == {"iaqf-2023-03", "binance-ws-2024-08", SMALL}
    for f in D.files_of(sets):
        path = data_dir / f.dataset / f.name
        assert path.stat().st_size == f.size
        assert hashlib.sha256(path.read_bytes()).hexdigest() == f.sha256, f
    listed = {(f.dataset, f.name) for f in D.files_of(sets)}
    on_disk = {(p.parent.name, p.name) for d in sets for p in (data_dir / d).iterdir()}
    assert listed == on_disk


def test_fetch_from_a_mirror(server, data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from arbstream.config import get_settings
    from arbstream.shell.cli import app

    url, _ = server
    monkeypatch.setenv("ARB_DATA_DIR", str(tmp_path / "data"))
    args = ["data", "fetch", "--only", SMALL, "--base-url", f"{SMALL}={url}/{SMALL}"]
    get_settings.cache_clear()
    first = CliRunner().invoke(app, args)
    second = CliRunner().invoke(app, args)
    get_settings.cache_clear()
    assert first.exit_code == 0, first.output
    n = len(D.manifest()[SMALL]["files"])
    assert f"{n} files downloaded, 0 already present" in first.output
    assert f"0 files downloaded, {n} already present" in second.output
    for src in (data_dir / SMALL).iterdir():
        assert (tmp_path / "data" / SMALL / src.name).read_bytes() == src.read_bytes()


def test_a_corrupted_or_missing_file_is_refused(server, tmp_path: Path) -> None:
    url, root = server
    victim = root / SMALL / "KRAKEN.ws.48.0"
    original = victim.read_bytes()
    victim.write_bytes(original[:-1] + b"!")
    try:
        with pytest.raises(D.FetchError, match="KRAKEN.ws.48.0 .* is not the recorded file"):
            D.fetch(tmp_path, [SMALL], {SMALL: f"{url}/{SMALL}"})
    finally:
        victim.write_bytes(original)
    assert not (tmp_path / SMALL / "KRAKEN.ws.48.0").exists()
    assert not list((tmp_path / SMALL).glob(".*.part"))
    with pytest.raises(D.FetchError, match="cannot download"):
        D.fetch(tmp_path / "other", [SMALL], {SMALL: f"{url}/nowhere"})
    with pytest.raises(ValueError, match="unknown data sets"):
        D.fetch(tmp_path, ["nope"])
