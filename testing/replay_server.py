"""A local exchange impersonator that replays REAL captured frames to a websocket client.

Long module: one local server impersonating several exchanges' websocket and REST
endpoints; it is test infrastructure and is read beside the recorded frames it serves.

Test and benchmark infrastructure, not shipped: the tests and benches run the live producers
(:mod:`producers.live`) against it instead of the internet.

:class:`ReplayServer` serves, on ``127.0.0.1`` only:

* a websocket endpoint (``wss://`` with a runtime-generated certificate, or plain ``ws://``)
  that speaks just enough of one exchange's subscription protocol to answer a client's
  subscribe frames with the exchange's CAPTURED acks, then streams the captured data frames of
  the requested channels/symbols in capture order;
* a REST endpoint (plain ``http://``, also answered over ``https://`` on the websocket port)
  serving the captured REST bodies (symbol lists, book snapshots).

The server runs in its own thread with its own asyncio loop: cryptofeed fetches REST
metadata with blocking ``requests`` inside the client's loop, so a same-loop server would
deadlock. Use it as a context manager::

    with ReplayServer("kraken") as srv:
        ctx = srv.client_ssl_context()          # trusts the runtime CA
        async with websockets.connect(srv.ws_url, ssl=ctx) as ws: ...
        requests.get(srv.http_url + "/0/public/AssetPairs")
        srv.wait_drained(timeout=10)            # all requested frames sent

Frames and routes
-----------------
Each exchange frame is classified once as *data* of a route (a channel/symbol the client can
subscribe to), *connection-level* (heartbeats: sent to every subscribed connection whose
subscriptions intersect those of the captured connection the heartbeat came from), *control*
(acks, greetings: never streamed, used to answer requests) or *unroutable* (not streamed;
counted in :attr:`ReplayStats.frames_unroutable`). Captures with several connection files
(Kraken: one per channel) are merged by capture timestamp. Per connection, streaming starts
once the client has subscribed to something and then sent no subscribe frame for ``settle``
seconds (Binance URL streams: at once). Subscriptions made later take effect from the current
position on. After the last frame the connection stays open and idle (or is closed with code
1000 when ``close_when_done``); pings are answered.

Per-exchange rules (``exchange`` id → protocol)
-----------------------------------------------
* ``binance`` / ``binance_us``: routes are stream names (``nknusdt@bookTicker``). Streams come
  from the URL — ``/stream?streams=a/b`` (combined envelope, frames sent verbatim) or
  ``/ws/a/b`` (raw: the envelope's ``data`` is sent, sliced out byte-exact) — and/or from
  ``{"method":"SUBSCRIBE","params":[...],"id":N}`` frames, answered ``{"result":null,"id":N}``
  (also ``UNSUBSCRIBE``, ``LIST_SUBSCRIPTIONS``). Frames without the envelope are unroutable.
  No acks are captured; any stream name is accepted.
* ``coinbase``: ``{"type":"subscribe","product_ids":[...],"channels":[name | {"name",
  "product_ids"}]}``. Routes are ``(channel, product_id)``; data types map to channels
  (``snapshot``/``l2update`` → ``level2`` (``level2_batch`` is an alias), ``ticker``,
  ``match``/``last_match`` → ``matches``, ``heartbeat``, ``full``'s types, ``status``). Each
  (un)subscribe is answered with a ``subscriptions`` frame: the captured one whose channel/
  product sets equal the connection's subscriptions, else one built in the same shape. A frame
  naming a product absent from the capture is rejected as a whole with
  ``{"type":"error","message":"Failed to subscribe","reason":"<p> is not a valid product"}``.
* ``bitstamp``: ``{"event":"bts:subscribe","data":{"channel":C}}``; the route is ``C``
  (``diff_order_book_ethusd``, ``live_trades_ethusd``...); answered with the captured
  ``bts:subscription_succeeded`` for ``C``. Unknown channels get a synthesized
  ``{"event":"bts:error",...}``. ``bts:unsubscribe`` and ``bts:heartbeat`` are answered.
* ``kraken`` (v1 public): greets with a captured ``systemStatus``; ``{"event":"subscribe",
  "pair":[...],"subscription":{"name":N,...}}`` adds routes ``(N, pair)`` — a data frame
  ``[chanId, ..., "book-1000", "XBT/USD"]`` belongs to ``("book", "XBT/USD")``, whatever depth
  the client asks — and is answered with the captured ``subscriptionStatus`` per pair
  (``reqid`` added when the request has one). Unknown pairs get a ``status: error``
  ``subscriptionStatus``. ``{"event":"heartbeat"}`` is connection-level; ``ping`` → ``pong``.
* ``bitfinex`` (v2): greets with the captured ``info`` event; ``conf`` is answered with the
  captured reply when the flags match. ``{"event":"subscribe","channel":C,"symbol":S}`` (or
  ``"key"`` for candles; ``S`` with or without the ``t`` prefix) is answered with the captured
  ``subscribed`` ack for ``(C, S)``, whose ``chanId`` is the one the captured data frames
  ``[chanId, ...]`` carry, so they line up. Unknown ``(C, S)`` get an ``error`` event (code
  10300). With flag 65536 (SEQ_ALL) the frames are renumbered 1, 2, 3, ... per connection, as
  Bitfinex numbers what it sends on that connection.
* ``gemini`` (v2 market data): ``{"type":"subscribe","subscriptions":[{"name":"l2",
  "symbols":[...]}]}``; no ack (Gemini sends none). ``l2_updates``/``trade`` belong to
  ``("l2", SYMBOL)``, ``candles_<i>_updates`` to ``("candles_<i>", SYMBOL)``; ``heartbeat`` is
  connection-level.

REST
----
``GET <path>?<query>`` is matched against the captured URLs' path and query, ignoring host:
exactly; then ignoring size parameters (``limit``, ``depth``, ``level``, ``group``); then with
a case-insensitive path; then by prefix (a request path that extends a captured path by at most
3 characters without ``/`` — the Bitfinex recorder stored ``pub:list:pair:futures`` as
``...:future``). Anything else gets ``404`` with a ``text/plain`` body naming the request and
the captured paths.

Fault injection and pacing
--------------------------
``speed=None`` streams at full speed; ``speed=f`` sleeps so capture-time gaps are divided by
``f``. ``drop_after=N`` aborts the TCP connection (no close frame; the client sees 1006)
right after a connection has streamed ``N`` frames, for the first ``drop_count`` connections
that get there. A reconnecting client with the same subscriptions resumes ``resend_on_reconnect``
frames before where the dropped connection stopped (0: exactly where it stopped), so duplicate
suppression can be tested. ``inject={i: payload}`` sends ``payload`` (``str`` → text frame,
``bytes`` → binary frame) just before the ``i``-th streamed frame (0-based, counted over all
connections, resends included), once. "Streamed frames" are data and connection-level frames;
acks, greetings and injected frames are not counted in them.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import heapq
import json
import os
import shutil
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import Hashable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, unquote, urlsplit

from aiohttp import web
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from producers.capture import capture_files, read_rest_capture, read_ws_capture
from producers.replay.binance import read_binance_gz
from testing.tls import LocalTLS

__all__ = [
    "EXCHANGES",
    "FrameLike",
    "ReplayServer",
    "ReplayStats",
    "binance_gz_frames",
    "default_data_dir",
]

#: Exchange ids with a protocol here (``binance_us`` speaks Binance's).
EXCHANGES = ("binance", "binance_us", "bitfinex", "bitstamp", "coinbase", "gemini", "kraken")

#: A frame for ``frames=``: the payload, or ``(capture unix seconds, payload)`` for pacing.
FrameLike = str | bytes | tuple[float, str | bytes]

Kind = Literal["data", "conn", "control", "skip"]
Route = Hashable

_SIZE_PARAMS = frozenset({"limit", "depth", "level", "group"})


def default_data_dir() -> Path:
    """``$ARB_DATA_DIR``, else ``../shared/data`` beside the repository."""
    env = os.environ.get("ARB_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def binance_gz_frames(*paths: str | Path) -> Iterator[tuple[float, str]]:
    """``(unix seconds, frame)`` from ``binance-ws-2024-08/*.gz`` files, merged by receive
    time, for ``ReplayServer("binance", frames=...)``. Lazy; the REST snapshot lines some
    files contain are yielded too (the server does not stream them: no envelope)."""
    streams = [((ns / 1e9, frame) for ns, frame in read_binance_gz(p)) for p in paths]
    return heapq.merge(*streams, key=lambda f: f[0])


@dataclass
class ReplayStats:
    """Counters of one :class:`ReplayServer` (a snapshot copy when read from ``.stats``).

    Attributes:
        connections: websocket connections accepted.
        messages_received: frames received from clients (all kinds).
        subscribe_frames: client frames that were subscription requests.
        acks_sent: replies sent to client requests (acks, errors, pongs) and greetings.
        frames_sent: streamed frames (data + connection-level), resends included.
        frames_resent: of those, frames sent again after a reconnect (the overlap).
        injected_sent: ``inject`` payloads sent.
        drops: connections aborted by ``drop_after``.
        streams_completed: connections that streamed through to the last frame.
        frames_unroutable: source frames that can never be streamed (counted on first read).
        unknown_subscriptions: requested subscriptions absent from the capture, as text.
        http_requests: ``(path?query, status)`` of every REST request.
    """

    connections: int = 0
    messages_received: int = 0
    subscribe_frames: int = 0
    acks_sent: int = 0
    frames_sent: int = 0
    frames_resent: int = 0
    injected_sent: int = 0
    drops: int = 0
    streams_completed: int = 0
    frames_unroutable: int = 0
    unknown_subscriptions: list[str] = field(default_factory=list)
    http_requests: list[tuple[str, int]] = field(default_factory=list)


@dataclass(slots=True)
class _Frame:
    ts: float | None
    payload: str | bytes
    kind: Kind
    route: Route | None
    source: int  # captured connection index; -1 for frames given explicitly


@dataclass
class _ConnState:
    number: int
    path: str
    subs: set[Route] = field(default_factory=set)
    immediate: bool = False  # start streaming without waiting for ``settle``
    raw: bool = False  # Binance /ws: send the envelope's data only
    last_sub: float = 0.0
    subscribed_once: bool = False
    sequence: int | None = None  # Bitfinex SEQ_ALL: last number sent on this connection


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _loads(payload: str | bytes) -> Any:
    try:
        return json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None


# --- exchange protocols -------------------------------------------------------------------


class _Protocol:
    """One exchange's subscription dialect. Subclasses fill in the hooks."""

    def __init__(self, stats: ReplayStats) -> None:
        self.stats = stats
        self.greetings: list[str] = []

    def learn(self, payload: str, source: int) -> None:
        """Inspect a captured exchange frame (before classification) to learn acks."""

    def classify(self, payload: str | bytes) -> tuple[Kind, Route | None]:
        raise NotImplementedError

    def on_connect(self, state: _ConnState) -> None:
        """Set up subscriptions that come with the connection itself (URL)."""

    def hello(self, state: _ConnState) -> list[str]:
        """Frames the exchange sends right after the handshake."""
        if not self.greetings:
            return []
        return [self.greetings[(state.number - 1) % len(self.greetings)]]

    def handle(self, state: _ConnState, msg: Any) -> tuple[list[str], bool]:
        """Answer a parsed client frame: ``(replies, was_subscribe)``; updates ``state``."""
        return [], False

    def render(self, frame: _Frame, state: _ConnState) -> str | bytes:
        return frame.payload

    def unknown(self, text: str) -> None:
        self.stats.unknown_subscriptions.append(text)


class _Binance(_Protocol):
    _PREFIX = '{"stream":"'

    def classify(self, payload: str | bytes) -> tuple[Kind, Route | None]:
        if isinstance(payload, str) and payload.startswith(self._PREFIX):
            end = payload.find('"', len(self._PREFIX))
            if end > 0:
                return "data", payload[len(self._PREFIX) : end]
        return "skip", None

    def on_connect(self, state: _ConnState) -> None:
        parts = urlsplit(state.path)
        path = parts.path.rstrip("/")
        if path.startswith("/ws"):
            state.raw = True
            streams = [s for s in path[len("/ws") :].split("/") if s]
        else:
            query = dict(parse_qsl(parts.query))
            streams = [s for s in query.get("streams", "").split("/") if s]
        state.subs.update(self._norm(s) for s in streams)
        state.immediate = bool(streams)
        state.subscribed_once = bool(streams)

    @staticmethod
    def _norm(stream: str) -> str:
        sym, at, rest = stream.partition("@")
        return sym.lower() + at + rest

    def handle(self, state: _ConnState, msg: Any) -> tuple[list[str], bool]:
        if not isinstance(msg, dict) or "method" not in msg:
            return [], False
        method, rid = str(msg.get("method")).upper(), msg.get("id")
        params = [self._norm(p) for p in msg.get("params") or [] if isinstance(p, str)]
        if method == "SUBSCRIBE":
            state.subs.update(params)
            return [_dumps({"result": None, "id": rid})], True
        if method == "UNSUBSCRIBE":
            state.subs.difference_update(params)
            return [_dumps({"result": None, "id": rid})], False
        if method == "LIST_SUBSCRIPTIONS":
            return [_dumps({"result": sorted(map(str, state.subs)), "id": rid})], False
        return [_dumps({"result": None, "id": rid})], False

    def render(self, frame: _Frame, state: _ConnState) -> str | bytes:
        payload = frame.payload
        if not state.raw or not isinstance(payload, str):
            return payload
        prefix = f'{self._PREFIX}{frame.route}","data":'
        if payload.startswith(prefix) and payload.endswith("}"):
            return payload[len(prefix) : -1]
        return _dumps(json.loads(payload)["data"])


class _Coinbase(_Protocol):
    _TYPES = {
        "snapshot": "level2",
        "l2update": "level2",
        "ticker": "ticker",
        "match": "matches",
        "last_match": "matches",
        "heartbeat": "heartbeat",
        "received": "full",
        "open": "full",
        "done": "full",
        "change": "full",
        "activate": "full",
        "status": "status",
    }
    _ALIASES = {"level2_batch": "level2", "level2_50": "level2"}

    def __init__(self, stats: ReplayStats) -> None:
        super().__init__(stats)
        self.acks: list[tuple[frozenset[tuple[str, str]], str]] = []
        self.products: set[str] = set()

    def learn(self, payload: str, source: int) -> None:
        msg = _loads(payload)
        if isinstance(msg, dict) and msg.get("type") == "subscriptions":
            routes = frozenset(
                (c["name"], p) for c in msg.get("channels", []) for p in c.get("product_ids", [])
            )
            self.acks.append((routes, payload))
            self.products.update(p for _, p in routes)

    def classify(self, payload: str | bytes) -> tuple[Kind, Route | None]:
        msg = _loads(payload)
        if not isinstance(msg, dict):
            return "skip", None
        kind = msg.get("type")
        if kind in ("subscriptions", "error"):
            return "control", None
        channel = self._TYPES.get(kind)  # type: ignore[arg-type]
        if channel is None:
            return "skip", None
        product = msg.get("product_id")
        if product:
            self.products.add(product)
        return "data", (channel, product)

    def handle(self, state: _ConnState, msg: Any) -> tuple[list[str], bool]:
        if not isinstance(msg, dict) or msg.get("type") not in ("subscribe", "unsubscribe"):
            return [], False
        subscribe = msg["type"] == "subscribe"
        top = msg.get("product_ids") or []
        routes: set[tuple[str, str]] = set()
        for chan in msg.get("channels") or []:
            if isinstance(chan, dict):
                name, products = chan.get("name", ""), chan.get("product_ids") or top
            else:
                name, products = chan, top
            name = self._ALIASES.get(name, name)
            routes.update((name, p) for p in products)
        if subscribe:
            bad = sorted({p for _, p in routes if p not in self.products})
            if bad:
                for p in bad:
                    self.unknown(f"coinbase product {p}")
                err = {
                    "type": "error",
                    "message": "Failed to subscribe",
                    "reason": f"{bad[0]} is not a valid product",
                }
                return [_dumps(err)], True
            state.subs.update(routes)
        else:
            state.subs.difference_update(routes)
        return [self._ack(state)], subscribe

    def _ack(self, state: _ConnState) -> str:
        current = frozenset(r for r in state.subs if isinstance(r, tuple))
        for routes, payload in self.acks:
            if routes == current:
                return payload
        by_channel: dict[str, list[str]] = {}
        for name, product in sorted(current):
            by_channel.setdefault(name, []).append(product)
        channels = [{"name": n, "product_ids": ps} for n, ps in by_channel.items()]
        return _dumps({"type": "subscriptions", "channels": channels})


class _Bitstamp(_Protocol):
    def __init__(self, stats: ReplayStats) -> None:
        super().__init__(stats)
        self.acks: dict[str, str] = {}

    def learn(self, payload: str, source: int) -> None:
        msg = _loads(payload)
        if isinstance(msg, dict) and msg.get("event") == "bts:subscription_succeeded":
            self.acks[msg.get("channel", "")] = payload

    def classify(self, payload: str | bytes) -> tuple[Kind, Route | None]:
        msg = _loads(payload)
        if not isinstance(msg, dict):
            return "skip", None
        event = str(msg.get("event", ""))
        if event.startswith("bts:"):
            return "control", None
        channel = msg.get("channel")
        return ("data", channel) if channel else ("skip", None)

    def handle(self, state: _ConnState, msg: Any) -> tuple[list[str], bool]:
        if not isinstance(msg, dict):
            return [], False
        event = msg.get("event")
        data = msg.get("data") if isinstance(msg.get("data"), dict) else {}
        channel = str(data.get("channel", ""))
        if event == "bts:subscribe":
            ack = self.acks.get(channel)
            if ack is None:
                self.unknown(f"bitstamp channel {channel}")
                err = {
                    "event": "bts:error",
                    "channel": channel,
                    "data": {"code": None, "message": f"Unknown channel {channel} (not captured)"},
                }
                return [_dumps(err)], True
            state.subs.add(channel)
            return [ack], True
        if event == "bts:unsubscribe":
            state.subs.discard(channel)
            ok = {"event": "bts:unsubscription_succeeded", "channel": channel, "data": {}}
            return [_dumps(ok)], False
        if event == "bts:heartbeat":
            beat = {"event": "bts:heartbeat", "channel": "", "data": {"status": "success"}}
            return [_dumps(beat)], False
        return [], False


class _Kraken(_Protocol):
    def __init__(self, stats: ReplayStats) -> None:
        super().__init__(stats)
        self.acks: dict[tuple[str, str], str] = {}

    def learn(self, payload: str, source: int) -> None:
        msg = _loads(payload)
        if not isinstance(msg, dict):
            return
        if msg.get("event") == "systemStatus":
            self.greetings.append(payload)
        elif msg.get("event") == "subscriptionStatus" and msg.get("status") == "subscribed":
            name = (msg.get("subscription") or {}).get("name", "")
            self.acks[(name, msg.get("pair", ""))] = payload

    def classify(self, payload: str | bytes) -> tuple[Kind, Route | None]:
        msg = _loads(payload)
        if isinstance(msg, list) and len(msg) >= 4 and isinstance(msg[-2], str):
            return "data", (msg[-2].split("-", 1)[0], msg[-1])
        if isinstance(msg, dict):
            if msg.get("event") == "heartbeat":
                return "conn", None
            return "control", None
        return "skip", None

    def handle(self, state: _ConnState, msg: Any) -> tuple[list[str], bool]:
        if not isinstance(msg, dict):
            return [], False
        event = msg.get("event")
        if event == "ping":
            return [_dumps({"event": "pong", "reqid": msg.get("reqid")})], False
        if event not in ("subscribe", "unsubscribe"):
            return [], False
        sub = msg.get("subscription") or {}
        name = str(sub.get("name", ""))
        replies: list[str] = []
        for pair in msg.get("pair") or [None]:
            ack = self.acks.get((name, pair)) if pair else None
            if ack is None:
                self.unknown(f"kraken {name} {pair}")
                err: dict[str, Any] = {
                    "errorMessage": "Currency pair not supported (not captured)",
                    "event": "subscriptionStatus",
                    "status": "error",
                    "subscription": sub,
                }
                if pair:
                    err["pair"] = pair
                if "reqid" in msg:
                    err["reqid"] = msg["reqid"]
                replies.append(_dumps(err))
                continue
            if event == "subscribe":
                state.subs.add((name, pair))
                if "reqid" in msg:
                    ack = _dumps({**json.loads(ack), "reqid": msg["reqid"]})
                replies.append(ack)
            else:
                state.subs.discard((name, pair))
                reply = json.loads(ack)
                reply["status"] = "unsubscribed"
                if "reqid" in msg:
                    reply["reqid"] = msg["reqid"]
                replies.append(_dumps(reply))
        return replies, event == "subscribe"


class _Bitfinex(_Protocol):
    def __init__(self, stats: ReplayStats) -> None:
        super().__init__(stats)
        self.acks: dict[tuple[str, str], str] = {}
        self.channels: dict[int, tuple[str, str]] = {}
        self.conf: dict[Any, str] = {}

    def learn(self, payload: str, source: int) -> None:
        msg = _loads(payload)
        if not isinstance(msg, dict):
            return
        event = msg.get("event")
        if event == "info" and "version" in msg:
            self.greetings.append(payload)
        elif event == "conf":
            self.conf[msg.get("flags")] = payload
        elif event == "subscribed":
            route = (str(msg.get("channel")), str(msg.get("symbol") or msg.get("key")))
            self.acks[route] = payload
            self.channels[msg["chanId"]] = route

    def classify(self, payload: str | bytes) -> tuple[Kind, Route | None]:
        msg = _loads(payload)
        if isinstance(msg, list) and msg and msg[0] in self.channels:
            return "data", self.channels[msg[0]]
        if isinstance(msg, dict):
            return "control", None
        return "skip", None

    def handle(self, state: _ConnState, msg: Any) -> tuple[list[str], bool]:
        if not isinstance(msg, dict):
            return [], False
        event = msg.get("event")
        if event == "conf":
            flags = msg.get("flags")
            if isinstance(flags, int) and flags & 65536:
                state.sequence = 0
            reply = self.conf.get(flags) or _dumps(
                {"event": "conf", "status": "OK", "flags": flags}
            )
            return [reply], False
        if event == "ping":
            return [
                _dumps({"event": "pong", "ts": int(time.time() * 1000), "cid": msg.get("cid")})
            ], False
        if event == "unsubscribe":
            route = self.channels.get(msg.get("chanId"))  # type: ignore[arg-type]
            if route:
                state.subs.discard(route)
            reply = {"event": "unsubscribed", "status": "OK", "chanId": msg.get("chanId")}
            return [_dumps(reply)], False
        if event != "subscribe":
            return [], False
        channel = str(msg.get("channel"))
        key = str(msg.get("symbol") or msg.get("key") or "")
        for candidate in (key, "t" + key):
            ack = self.acks.get((channel, candidate))
            if ack is not None:
                state.subs.add((channel, candidate))
                return [ack], True
        self.unknown(f"bitfinex {channel} {key}")
        err = {"event": "error", "msg": "symbol: invalid", "code": 10300, "channel": channel}
        err["symbol"] = key
        return [_dumps(err)], True

    def render(self, frame: _Frame, state: _ConnState) -> str | bytes:
        """With SEQ_ALL, number the frames this connection gets 1, 2, 3, ... as Bitfinex does
        (the capture's numbers span channels a subset subscription does not receive)."""
        if state.sequence is None or not isinstance(frame.payload, str):
            return frame.payload
        head, comma, tail = frame.payload.rstrip().rpartition(",")
        if not comma or not tail.endswith("]") or not tail[:-1].strip().isdigit():
            return frame.payload
        state.sequence += 1  # rewrite only the number, so the rest stays byte-exact
        return f"{head},{state.sequence}]"


class _Gemini(_Protocol):
    def classify(self, payload: str | bytes) -> tuple[Kind, Route | None]:
        msg = _loads(payload)
        if not isinstance(msg, dict):
            return "skip", None
        kind = str(msg.get("type", ""))
        if kind == "heartbeat":
            return "conn", None
        symbol = msg.get("symbol")
        if kind in ("l2_updates", "trade") and symbol:
            return "data", ("l2", symbol)
        if kind.startswith("candles_") and kind.endswith("_updates") and symbol:
            return "data", (kind[: -len("_updates")], symbol)
        return "skip", None

    def handle(self, state: _ConnState, msg: Any) -> tuple[list[str], bool]:
        if not isinstance(msg, dict) or msg.get("type") not in ("subscribe", "unsubscribe"):
            return [], False
        routes = {
            (str(s.get("name")), str(sym).upper())
            for s in msg.get("subscriptions") or []
            if isinstance(s, dict)
            for sym in s.get("symbols") or []
        }
        if msg["type"] == "subscribe":
            state.subs.update(routes)
            return [], True
        state.subs.difference_update(routes)
        return [], False


_PROTOCOLS: dict[str, type[_Protocol]] = {
    "binance": _Binance,
    "binance_us": _Binance,
    "bitfinex": _Bitfinex,
    "bitstamp": _Bitstamp,
    "coinbase": _Coinbase,
    "gemini": _Gemini,
    "kraken": _Kraken,
}


# --- frame source and REST index --------------------------------------------------------------


class _FrameSource:
    """Classified frames by index, read lazily from an iterator and kept for resends."""

    def __init__(self, frames: Iterable[_Frame]) -> None:
        self._iter = iter(frames)
        self._frames: list[_Frame] = []
        self._done = False

    def get(self, index: int) -> _Frame | None:
        while len(self._frames) <= index and not self._done:
            try:
                self._frames.append(next(self._iter))
            except StopIteration:
                self._done = True
        return self._frames[index] if index < len(self._frames) else None


def _norm_path(path: str) -> str:
    path = unquote(path)
    return path.rstrip("/") or "/"


class _RestIndex:
    def __init__(self, bodies: Mapping[str, str]) -> None:
        self.entries: list[tuple[str, frozenset[tuple[str, str]], str]] = []
        for url, body in bodies.items():
            parts = urlsplit(url)
            query = frozenset(parse_qsl(parts.query, keep_blank_values=True))
            self.entries.append((_norm_path(parts.path), query, body))

    @staticmethod
    def _sizeless(query: frozenset[tuple[str, str]]) -> frozenset[tuple[str, str]]:
        return frozenset((k, v) for k, v in query if k not in _SIZE_PARAMS)

    def lookup(self, raw_path: str, raw_query: str) -> str | None:
        path = _norm_path(raw_path)
        query = frozenset(parse_qsl(raw_query, keep_blank_values=True))
        sizeless = self._sizeless(query)
        path_rules = (
            lambda p: p == path,
            lambda p: p.lower() == path.lower(),
            lambda p: (
                path.startswith(p) and 0 < len(path) - len(p) <= 3 and "/" not in path[len(p) :]
            ),
        )
        for same_path in path_rules:
            candidates = [(q, b) for p, q, b in self.entries if same_path(p)]
            for q, body in candidates:
                if q == query:
                    return body
            for q, body in candidates:
                if self._sizeless(q) == sizeless:
                    return body
        return None

    def known(self, limit: int = 12) -> list[str]:
        paths = sorted({p for p, _, _ in self.entries})
        return paths[:limit] + (["..."] if len(paths) > limit else [])


# --- the server -----------------------------------------------------------------------------


class ReplayServer:
    """Replay one exchange's captured websocket frames and REST bodies on ``127.0.0.1``.

    Args:
        exchange: one of :data:`EXCHANGES` (case-insensitive).
        frames: explicit exchange frames to stream instead of the capture's (e.g.
            :func:`binance_gz_frames`): payloads or ``(unix s, payload)`` pairs, list or lazy
            iterator (read as needed, kept for resends). Acks, greetings and REST still come
            from the exchange's capture when it exists.
        data_dir: shared data root or captures directory; default :func:`default_data_dir`.
        rest: extra REST bodies ``{url_or_path: body}``, overriding captured ones.
        tls: serve ``wss://`` (and REST over ``https://`` on the same port) with a certificate
            for ``127.0.0.1``/``localhost`` signed by a CA made at start-up
            (:class:`testing.tls.LocalTLS`, ``trustme``);
            otherwise plain ``ws://``.
        port, http_port: websocket and plain-HTTP REST ports; 0 picks free ones.
        speed: ``None`` for full speed, else capture-time gaps divided by ``speed`` (> 0).
        settle: seconds without new subscribe frames before a connection starts streaming.
        drop_after: abort a connection's TCP socket after it has streamed this many frames.
        drop_count: how many connections ``drop_after`` applies to (the first to get there).
        resend_on_reconnect: frames of overlap when a dropped stream resumes (see module doc).
        inject: ``{i: payload}`` sent before the ``i``-th streamed frame overall.
        close_when_done: close with code 1000 after the last frame instead of idling.

    Raises:
        ValueError: unknown exchange, bad ``speed``/``drop_after``/``resend_on_reconnect``.
        FileNotFoundError: no capture for the exchange and no ``frames``.
        producers.capture.CaptureFormatError: a capture file is malformed.

    Attributes (valid after :meth:`start`): ``ws_url`` (``wss://127.0.0.1:<port>``, no path),
    ``http_url`` (plain REST), ``https_url`` (REST over TLS on the websocket port, ``None``
    without TLS), ``ca_file`` (PEM of the CA, ``None`` without TLS), ``done`` (a
    ``threading.Event`` set when a connection has streamed every frame), ``stats``
    (:class:`ReplayStats` snapshot), ``client_messages`` (every frame clients sent, in order).
    """

    def __init__(
        self,
        exchange: str,
        *,
        frames: Iterable[FrameLike] | None = None,
        data_dir: str | Path | None = None,
        rest: Mapping[str, str] | None = None,
        tls: bool = True,
        port: int = 0,
        http_port: int = 0,
        speed: float | None = None,
        settle: float = 0.2,
        drop_after: int | None = None,
        drop_count: int = 1,
        resend_on_reconnect: int = 0,
        inject: Mapping[int, str | bytes] | None = None,
        close_when_done: bool = False,
    ) -> None:
        self.exchange = exchange.lower()
        if self.exchange not in _PROTOCOLS:
            raise ValueError(f"unknown exchange {exchange!r}; known: {', '.join(EXCHANGES)}")
        if speed is not None and speed <= 0:
            raise ValueError(f"speed must be > 0 or None, got {speed}")
        if drop_after is not None and drop_after < 1:
            raise ValueError(f"drop_after must be >= 1, got {drop_after}")
        if resend_on_reconnect < 0:
            raise ValueError("resend_on_reconnect must be >= 0")
        if drop_after is not None and drop_count > 1 and resend_on_reconnect >= drop_after:
            raise ValueError("with drop_count > 1, resend_on_reconnect must be < drop_after")
        self.host = "127.0.0.1"
        self.tls = tls
        self.speed = speed
        self.settle = settle
        self.drop_after = drop_after
        self._drops_left = drop_count if drop_after is not None else 0
        self.resend_on_reconnect = resend_on_reconnect
        self.close_when_done = close_when_done
        self._inject: dict[int, str | bytes] = dict(inject or {})
        self._stats = ReplayStats()
        self._proto = _PROTOCOLS[self.exchange](self._stats)
        self.client_messages: list[str | bytes] = []

        root = Path(data_dir) if data_dir is not None else default_data_dir()
        try:
            ws_paths, rest_paths = capture_files(root, self.exchange)
        except FileNotFoundError:
            if frames is None:
                raise
            ws_paths, rest_paths = [], []
        captured = [
            [(e.ts, e.payload) for e in read_ws_capture(p) if e.kind == "received"]
            for p in ws_paths
        ]
        for source, events in enumerate(captured):
            for _, payload in events:
                self._proto.learn(payload, source)
        bodies = read_rest_capture(rest_paths)
        bodies.update(rest or {})
        self._rest = _RestIndex(bodies)

        # which routes each captured connection carried: gates its connection-level frames
        self._source_routes: dict[int, set[Route]] = {}
        if frames is None:
            merged = sorted(
                (
                    (ts, i, n, payload)
                    for i, events in enumerate(captured)
                    for n, (ts, payload) in enumerate(events)
                ),
                key=lambda t: (t[0], t[1], t[2]),
            )
            built = [self._classify(ts, payload, src) for ts, src, _, payload in merged]
            for f in built:
                if f.kind == "data":
                    self._source_routes.setdefault(f.source, set()).add(f.route)
            self._source = _FrameSource(built)
        else:
            self._source = _FrameSource(self._explicit(frames))

        self._resume: dict[frozenset[Route], int] = {}  # subscriptions -> next frame index
        self._resume_end: dict[frozenset[Route], int] = {}  # ... and where the drop happened
        self._cond = threading.Condition()
        self.done = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ws_server: Server | None = None
        self._http_runner: web.AppRunner | None = None
        self._tmpdir: str | None = None
        self._server_ssl: ssl.SSLContext | None = None
        self.ca_file: str | None = None
        self.port = port
        self.http_port = http_port

    # -- frames ------------------------------------------------------------------------------

    def _classify(self, ts: float | None, payload: str | bytes, source: int) -> _Frame:
        kind, route = self._proto.classify(payload)
        if kind == "skip":
            self._stats.frames_unroutable += 1
        return _Frame(ts, payload, kind, route, source)

    def _explicit(self, frames: Iterable[FrameLike]) -> Iterator[_Frame]:
        for item in frames:
            if isinstance(item, tuple):
                ts, payload = item
                yield self._classify(float(ts), payload, -1)
            else:
                yield self._classify(None, item, -1)

    def _wanted(self, frame: _Frame, state: _ConnState) -> bool:
        if frame.kind == "data":
            return frame.route in state.subs
        if frame.kind == "conn":
            if not state.subs:
                return False
            routes = self._source_routes.get(frame.source)
            return routes is None or not routes.isdisjoint(state.subs)
        return False

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ReplayServer:
        """Start the server thread; returns once both ports listen.

        Raises:
            RuntimeError: already started, or the servers failed to start (cause attached).
        """
        if self._thread is not None:
            raise RuntimeError("ReplayServer already started")
        if self.tls:
            self._make_tls()
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
                failure.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"replay-{self.exchange}", daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            self._thread.join()
            self._thread = None
            self._cleanup_tls()
            raise RuntimeError(f"ReplayServer failed to start: {failure[0]}") from failure[0]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Close all connections (code 1001) and both servers, stop the thread. Idempotent."""
        if self._thread is None or self._loop is None:
            return
        loop = self._loop
        if loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(self._close(), loop)
            with contextlib.suppress(Exception):
                fut.result(timeout)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(timeout)
        self._thread = None
        self._loop = None
        self._cleanup_tls()

    def __enter__(self) -> ReplayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _make_tls(self) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="replay-ca-")
        self.ca_file = os.path.join(self._tmpdir, "ca.pem")
        self._server_ssl = LocalTLS.create(self.ca_file).server

    def _cleanup_tls(self) -> None:
        if self._tmpdir:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client context trusting this server's CA (for ``websockets``/cryptofeed
        ``options={'ssl': ctx}``/aiohttp).

        Raises:
            RuntimeError: TLS is off or the server is not started.
        """
        if not self.ca_file:
            raise RuntimeError("no TLS: start the server with tls=True first")
        return ssl.create_default_context(cafile=self.ca_file)

    @property
    def ws_url(self) -> str:
        """``wss://127.0.0.1:<port>`` (``ws://`` without TLS), no path."""
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.port}"

    @property
    def http_url(self) -> str:
        """Plain-HTTP REST base URL, ``http://127.0.0.1:<http_port>``."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def https_url(self) -> str | None:
        """REST over TLS on the websocket port, or ``None`` without TLS."""
        return f"https://{self.host}:{self.port}" if self.tls else None

    @property
    def stats(self) -> ReplayStats:
        """A snapshot copy of the counters."""
        return copy.deepcopy(self._stats)

    def wait_drained(self, timeout: float | None = 30.0, streams: int = 1) -> bool:
        """Block until ``streams`` connections have streamed every frame they asked for.

        Returns:
            ``True`` when they have, ``False`` on timeout.
        """
        with self._cond:
            return self._cond.wait_for(
                lambda: self._stats.streams_completed >= streams, timeout=timeout
            )

    # -- asyncio side (server thread) --------------------------------------------------------

    async def _open(self) -> None:
        self._ws_server = await serve(
            self._handler,
            self.host,
            self.port,
            ssl=self._server_ssl,
            process_request=self._process_request,
            max_size=None,
            compression=None,
        )
        self.port = self._ws_server.sockets[0].getsockname()[1]
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._http_get)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.http_port)
        await site.start()
        self._http_runner = runner
        self.http_port = runner.addresses[0][1]

    async def _close(self) -> None:
        if self._ws_server is not None:
            self._ws_server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws_server.wait_closed(), 5)
        if self._http_runner is not None:
            await self._http_runner.cleanup()

    def _rest_reply(self, raw_path: str, raw_query: str) -> tuple[int, str]:
        body = self._rest.lookup(raw_path, raw_query)
        target = raw_path + (f"?{raw_query}" if raw_query else "")
        status = 200 if body is not None else 404
        self._stats.http_requests.append((target, status))
        if body is None:
            known = ", ".join(self._rest.known())
            return 404, f"not in the {self.exchange} capture: GET {target}\ncaptured: {known}\n"
        return 200, body

    async def _http_get(self, request: web.Request) -> web.Response:
        status, body = self._rest_reply(request.rel_url.raw_path, request.rel_url.raw_query_string)
        ctype = "application/json" if status == 200 else "text/plain"
        return web.Response(status=status, text=body, content_type=ctype)

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        parts = urlsplit(request.path)
        status, body = self._rest_reply(parts.path, parts.query)
        if status != 200:
            return connection.respond(HTTPStatus.NOT_FOUND, body)
        data = body.encode()
        headers = Headers(
            [
                ("Content-Type", "application/json"),
                ("Content-Length", str(len(data))),
                ("Connection", "close"),
            ]
        )
        return Response(200, "OK", headers, data)

    async def _handler(self, ws: ServerConnection) -> None:
        self._stats.connections += 1
        state = _ConnState(number=self._stats.connections, path=ws.request.path)  # type: ignore[union-attr]
        self._proto.on_connect(state)
        loop = asyncio.get_running_loop()
        state.last_sub = loop.time()
        reader: asyncio.Task[None] | None = None
        try:
            for greeting in self._proto.hello(state):
                await ws.send(greeting)
                self._stats.acks_sent += 1
            reader = asyncio.create_task(self._read(ws, state))
            outcome = await self._stream(ws, state, reader)
            if outcome == "dropped":
                return
            if outcome == "drained" and self.close_when_done:
                await ws.close(1000, "replay finished")
                return
            await reader  # idle: keep answering the client until it leaves
        except ConnectionClosed:
            pass
        finally:
            if reader is not None and not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await reader

    async def _read(self, ws: ServerConnection, state: _ConnState) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionClosed):
            async for message in ws:
                self._stats.messages_received += 1
                self.client_messages.append(message)
                replies, subscribed = self._proto.handle(state, _loads(message))
                if subscribed:
                    self._stats.subscribe_frames += 1
                    state.last_sub = loop.time()
                    state.subscribed_once = True
                for reply in replies:
                    await ws.send(reply)
                    self._stats.acks_sent += 1

    async def _send_injected(self, ws: ServerConnection) -> None:
        payload = self._inject.pop(self._stats.frames_sent, None)
        if payload is not None:
            await ws.send(payload)
            self._stats.injected_sent += 1

    async def _stream(
        self, ws: ServerConnection, state: _ConnState, reader: asyncio.Task[None]
    ) -> Literal["drained", "dropped", "closed"]:
        loop = asyncio.get_running_loop()
        poll = max(0.005, min(0.05, self.settle / 4))
        while True:  # wait for the subscriptions to settle
            if reader.done():
                return "closed"
            quiet = loop.time() - state.last_sub
            if state.subs and (state.immediate or quiet >= self.settle):
                break
            await asyncio.sleep(poll)

        key = frozenset(state.subs)
        index = self._resume.pop(key, 0)
        resend_until = self._resume_end.pop(key, 0)
        recent: deque[int] = deque(maxlen=max(1, self.resend_on_reconnect))
        sent_here = 0
        t0_wall: float | None = None
        t0_cap: float | None = None
        while True:
            frame = self._source.get(index)
            if frame is None:
                break
            index += 1
            if not self._wanted(frame, state):
                continue
            if self.speed is not None and frame.ts is not None:
                if t0_wall is None or t0_cap is None:
                    t0_wall, t0_cap = loop.time(), frame.ts
                delay = (frame.ts - t0_cap) / self.speed - (loop.time() - t0_wall)
                if delay > 0:
                    await asyncio.sleep(delay)
            await self._send_injected(ws)
            await ws.send(self._proto.render(frame, state))
            self._stats.frames_sent += 1
            if index <= resend_until:
                self._stats.frames_resent += 1
            sent_here += 1
            recent.append(index - 1)
            if (
                self._drops_left > 0
                and self.drop_after is not None
                and sent_here >= self.drop_after
            ):
                self._drops_left -= 1
                self._stats.drops += 1
                self._resume[key] = recent[0] if self.resend_on_reconnect else index
                self._resume_end[key] = index
                ws.transport.abort()
                return "dropped"
            if sent_here % 64 == 0:
                await asyncio.sleep(0)
        await self._send_injected(ws)
        with self._cond:
            self._stats.streams_completed += 1
            self._cond.notify_all()
        self.done.set()
        return "drained"
