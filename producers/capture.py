"""The raw capture line format of cryptofeed's recorder, read and written.

The captures live under ``<data_dir>/exchange-ws-captures/`` (see ``../shared/data/README.md``):
cryptofeed raw-recorder files, one line per event:

  - ``NAME.ws.<conn>.0`` (one websocket connection per file):

    - ``<url> <-> <unix s>``: the connection opened;
    - ``<url> <- <unix s>: <payload>``: a frame the client sent (e.g. a subscription);
    - ``<unix s>: <payload>``: a frame the exchange sent.

  - ``NAME.0`` and ``NAME.http.*`` (REST): ``<url> -> <unix s>: <body>``. ``NAME.0`` may start
    with a ``configuration: <json>`` line (the recorder's subscription; see
    :func:`read_capture_config`).

  ``<unix s>`` is ``str(time.time())`` — float seconds since the epoch, UTC. Blank lines are
  ignored. ``NAME`` is the upper-case exchange id (``coinbase`` → ``COINBASE``).

``arbstream record`` writes this format with cryptofeed's own raw-data recorder (the tool that
made these captures), so a recording is readable by :func:`read_ws_capture` /
:func:`read_rest_capture` and replayable by the test and benchmark server
``testing.replay_server.ReplayServer``. The other recording under ``<data_dir>``,
``binance-ws-2024-08/*.gz``, has a format of its own (:mod:`producers.replay.binance`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

EventKind = Literal["connect", "sent", "received"]

CAPTURES_SUBDIR = "exchange-ws-captures"

_CONNECT_RE = re.compile(r"^(\S+) <-> (\S+)$")
_SENT_RE = re.compile(r"^(\S+) <- ([0-9.eE+-]+): (.*)$", re.S)
_RECV_RE = re.compile(r"^([0-9][0-9.eE+-]*): (.*)$", re.S)
_REST_RE = re.compile(r"^(\S+) -> ([0-9.eE+-]+): (.*)$", re.S)
_WS_FILE_RE = re.compile(r"\.ws\.(\d+)\.(\d+)$")


class CaptureFormatError(ValueError):
    """A capture line does not follow the format; the message names file and line number."""


@dataclass(frozen=True, slots=True)
class CaptureEvent:
    """One line of a websocket capture.

    Attributes:
        kind: ``connect`` (connection opened), ``sent`` (client → exchange frame) or
            ``received`` (exchange → client frame).
        url: the websocket URL. Received lines carry no URL in the file; the reader fills in
            the URL of the connection they belong to (the last ``connect`` line before them,
            ``""`` if none).
        ts: capture time, float seconds since the Unix epoch (UTC).
        payload: the frame text exactly as recorded; ``""`` for ``connect``.
    """

    kind: EventKind
    url: str
    ts: float
    payload: str = ""


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8", newline="\n") as fp:
        for lineno, raw in enumerate(fp, 1):
            line = raw.rstrip("\n").rstrip("\r")
            if line:
                yield lineno, line


def _float(text: str, path: Path, lineno: int) -> float:
    try:
        return float(text)
    except ValueError:
        raise CaptureFormatError(f"{path}:{lineno}: bad timestamp {text[:40]!r}") from None


def read_ws_capture(path: str | Path) -> list[CaptureEvent]:
    """Read one ``NAME.ws.<conn>.<n>`` file into events, in file order.

    Returns:
        the events; ``payload`` is the rest of the line after ``<ts>: `` (no trailing newline).

    Raises:
        FileNotFoundError: no such file.
        CaptureFormatError: a non-blank line matches none of the three line shapes.
    """
    path = Path(path)
    events: list[CaptureEvent] = []
    url = ""
    for lineno, line in _lines(path):
        if line[0].isdigit():
            m = _RECV_RE.match(line)
            if m:
                ts = _float(m.group(1), path, lineno)
                events.append(CaptureEvent("received", url, ts, m.group(2)))
                continue
        else:
            m = _CONNECT_RE.match(line)
            if m:
                url = m.group(1)
                events.append(CaptureEvent("connect", url, _float(m.group(2), path, lineno)))
                continue
            m = _SENT_RE.match(line)
            if m:
                ts = _float(m.group(2), path, lineno)
                events.append(CaptureEvent("sent", m.group(1), ts, m.group(3)))
                continue
        raise CaptureFormatError(f"{path}:{lineno}: not a capture line: {line[:120]!r}")
    return events


def read_rest_capture(paths: str | Path | Iterable[str | Path]) -> dict[str, str]:
    """Read REST capture files (``NAME.0``, ``NAME.http.*``) into ``{url: body}``.

    ``configuration:`` header lines are skipped (see :func:`read_capture_config`). When a URL
    occurs more than once, the last body wins. Missing files are skipped, so the result of
    :func:`capture_files` can be passed as is.

    Raises:
        CaptureFormatError: a non-blank line is neither a REST line nor a configuration line.
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    out: dict[str, str] = {}
    for p in paths:
        path = Path(p)
        if not path.exists():
            continue
        for lineno, line in _lines(path):
            if line.startswith("configuration: "):
                continue
            m = _REST_RE.match(line)
            if not m:
                raise CaptureFormatError(f"{path}:{lineno}: not a REST line: {line[:120]!r}")
            _float(m.group(2), path, lineno)
            out[m.group(1)] = m.group(3)
    return out


def read_capture_config(path: str | Path) -> dict[str, Any] | None:
    """The recorder's ``configuration: <json>`` header of ``NAME.0`` (channel → symbols), or
    ``None`` when the file has none."""
    for _, line in _lines(Path(path)):
        if line.startswith("configuration: "):
            return json.loads(line.split(": ", 1)[1])
    return None


def captures_dir(data_dir: str | Path) -> Path:
    """``data_dir/exchange-ws-captures`` if it exists, else ``data_dir`` itself."""
    data_dir = Path(data_dir)
    sub = data_dir / CAPTURES_SUBDIR
    return sub if sub.is_dir() else data_dir


def capture_files(data_dir: str | Path, exchange: str) -> tuple[list[Path], list[Path]]:
    """Find one exchange's capture files.

    Args:
        data_dir: the shared data root (``.../shared/data``) or the captures directory itself.
        exchange: exchange id, case-insensitive (``coinbase``, ``binance_us``, ...); files are
            named after it in upper case.

    Returns:
        ``(ws_paths, rest_paths)``: ``NAME.ws.<conn>.<n>`` sorted by connection number then
        rotation number (one connection per ``<conn>``; Kraken has three), and ``NAME.0``
        followed by ``NAME.http.*`` in name order. ``NAME.ws.*`` never matches another
        exchange's ``NAME_US.ws.*``.

    Raises:
        FileNotFoundError: no capture file at all for this exchange.
    """
    root = captures_dir(data_dir)
    name = exchange.upper()
    ws = [p for p in root.glob(f"{name}.ws.*") if _WS_FILE_RE.search(p.name)]
    ws.sort(key=lambda p: tuple(int(g) for g in _WS_FILE_RE.search(p.name).groups()))  # type: ignore[union-attr]
    rest = [root / f"{name}.0"] if (root / f"{name}.0").is_file() else []
    rest += sorted(root.glob(f"{name}.http.*"))
    if not ws and not rest:
        raise FileNotFoundError(f"no capture files for {exchange!r} ({name}.*) in {root}")
    return ws, rest
