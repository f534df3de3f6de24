"""Exchange adapters (``producers/exchanges/``) on real recorded exchange frames, no network.

Each capture in ``<data>/exchange-ws-captures`` (cryptofeed's raw recorder: ``<url> -> <unix s>:
<body>`` REST lines, ``<unix s>: <json>`` server frames) is pushed frame by frame through the
feed's ``message_handler(frame, conn, receive_time)``, with symbols preloaded from the capture's
REST bodies and book snapshots served from them. Expected records are computed here directly
from the capture JSON, independently of cryptofeed (own L2 book replays for book-derived
quotes and top-10 books), and compared field by field: counts per kind, first and last record
of a symbol, then every record. The Binance 2024 spot file (``binance-ws-2024-08``, first
20 000 lines) covers ``@bookTicker`` and raw ``@trade``.

Timestamps: capture times are unix seconds as text, records carry UTC milliseconds (floor).
"""

from __future__ import annotations

import asyncio
import gzip
import heapq
import itertools
import json
import re
import socket
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest
from cryptofeed.defines import L2_BOOK, TICKER, TRADES
from cryptofeed.exchanges import EXCHANGE_MAP, OKX, Bitfinex, Bybit, Gemini, Kraken
from cryptofeed.symbols import Symbols

from arbstream.timestamps import seconds_to_ms
from producers.events import FeedEvent
from producers.exchanges.coinbase import CoinbaseExchange
from producers.exchanges.feed import RecordRejected, make_feed
from producers.exchanges.normalize import symbol_from_feed, symbol_map
from producers.exchanges.registry import PROFILES, exchange_id, feed_class, supported_exchanges
from testing.recorded_rest import RestBodies, preload_symbols

DEPTH = 10
_REST = re.compile(r"^(\S+) -> ([0-9.]+): (.*)$", re.S)
_RECV = re.compile(r"^([0-9.]+): (.*)$", re.S)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test."""

    def refuse(*_a: Any, **_k: Any) -> None:
        raise AssertionError("network access attempted in test_exchanges")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def captures(data_dir: Path) -> Path:
    return data_dir / "exchange-ws-captures"


# --- reading captures (independent of producers.exchanges) ---------------------------------
def rest_bodies(captures: Path, name: str) -> dict[str, str]:
    """url → body of every REST response recorded for capture ``name``."""
    out = {}
    for path in [captures / f"{name}.0", *sorted(captures.glob(f"{name}.http.*"))]:
        if path.exists():
            for line in path.read_text().splitlines():
                m = _REST.match(line)
                if m:
                    out[m.group(1)] = m.group(3)
    return out


def rest_json(captures: Path, name: str, url_end: str) -> Any:
    return next(json.loads(b) for u, b in rest_bodies(captures, name).items()
                if u.endswith(url_end))


def server_frames(captures: Path, name: str) -> Iterator[tuple[Path, str, str]]:
    """(ws file, receive time text, frame text) of every frame the exchange sent, in order."""
    for path in sorted(captures.glob(f"{name}.ws.*")):
        for line in path.read_text().splitlines():
            if " <-> " in line or " <- " in line:
                continue
            m = _RECV.match(line)
            if m:
                yield path, m.group(1), m.group(2)


def ms(seconds_text: str | int | Decimal) -> int:
    """Unix seconds (decimal text) → integer ms, floor."""
    return int(Decimal(seconds_text) * 1000)


def iso_ms(text: str) -> int:
    return (datetime.fromisoformat(text.replace("Z", "+00:00")) - _EPOCH) // timedelta(
        milliseconds=1)


class L2:
    """A plain price → size book, rebuilt here from the raw frames.

    The top ``DEPTH`` levels per side are cached and recomputed only when a change reaches
    them, so big books stay cheap.
    """

    def __init__(self) -> None:
        self.side: dict[str, dict[Decimal, Decimal]] = {"bid": {}, "ask": {}}
        self._top: dict[str, list[tuple[Decimal, Decimal]] | None] = {"bid": None, "ask": None}

    def set(self, side: str, price: Any, size: Any) -> None:
        p, s = Decimal(str(price)), Decimal(str(size))
        if s == 0:
            self.side[side].pop(p, None)
        else:
            self.side[side][p] = s
        cached = self._top[side]
        if cached is not None and (
            len(cached) < DEPTH or (p >= cached[-1][0] if side == "bid" else p <= cached[-1][0])
        ):
            self._top[side] = None

    def _side_top(self, side: str) -> list[tuple[Decimal, Decimal]]:
        if self._top[side] is None:
            pick = heapq.nlargest if side == "bid" else heapq.nsmallest
            self._top[side] = pick(DEPTH, self.side[side].items())
        return self._top[side]

    def top(self, n: int = DEPTH) -> tuple[list, list]:
        return tuple(  # type: ignore[return-value]
            [(float(p), float(q)) for p, q in self._side_top(side)[:n]] for side in ("bid", "ask")
        )


class Expect:
    """Expected records per kind, built from frames; de-duplicates unchanged book tops."""

    def __init__(self) -> None:
        self.bbo: list[tuple] = []
        self.trades: list[tuple] = []
        self.book: list[tuple] = []
        self._top: dict[str, tuple] = {}
        self._best: dict[str, tuple] = {}

    def book_state(self, sym: str, book: L2, exchange_ts: Any, received_ts: Any,
                   quotes: bool = True, seq: int | None = None) -> None:
        """A book update: a book record if the top 10 changed, a quote if the top changed."""
        top = book.top()
        if self._top.get(sym) != top:
            self._top[sym] = top
            self.book.append((sym, top[0], top[1], exchange_ts, received_ts, seq))
        bids, asks = book.top(1)
        best = (bids[0] if bids else None, asks[0] if asks else None)
        if quotes and self._best.get(sym) != best:
            self._best[sym] = best
            if bids and asks:
                self.bbo.append((sym, bids[0][0], asks[0][0], bids[0][1], asks[0][1],
                                 exchange_ts, received_ts, None))


def quote_row(e: FeedEvent) -> tuple:
    r = e.record
    return (r.symbol, r.bid, r.ask, r.bid_size, r.ask_size, r.exchange_ts, r.received_ts,
            e.dedupe_id)


def trade_row(e: FeedEvent) -> tuple:
    r = e.record
    return (r.symbol, r.trade_id, r.price, r.size, r.side, r.exchange_ts, r.received_ts,
            e.sequence, e.dedupe_id)


def book_row(e: FeedEvent) -> tuple:
    r = e.record
    return (r.symbol, [tuple(x) for x in r.bids], [tuple(x) for x in r.asks], r.exchange_ts,
            r.received_ts, r.sequence)


ROWS: dict[str, Callable[[FeedEvent], tuple]] = {
    "bbo": quote_row, "trades": trade_row, "book": book_row,
}


def by_symbol(rows: list[tuple]) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = defaultdict(list)
    for row in rows:
        out[row[0]].append(row)
    return dict(out)


def check(events: list[FeedEvent], expect: Expect, symbol: str,
          kinds: tuple[str, ...] = ("bbo", "trades", "book")) -> None:
    """Counts, first/last of ``symbol``, then every record, per kind (order within a symbol)."""
    for kind in kinds:
        actual = [ROWS[kind](e) for e in events if e.channel == kind]
        wanted = getattr(expect, kind)
        assert len(actual) == len(wanted), kind
        assert wanted, f"capture has no {kind} for this exchange"
        mine, theirs = by_symbol(actual), by_symbol(wanted)
        if symbol in theirs:
            assert mine[symbol][0] == theirs[symbol][0], kind
            assert mine[symbol][-1] == theirs[symbol][-1], kind
        assert mine == theirs, kind


# --- driving a feed with captured frames ----------------------------------------------------
class FakeConn:
    """Stands in for cryptofeed's websocket connection: records what the feed sends."""

    def __init__(self, uuid: str, subscription: dict) -> None:
        self.uuid = self.id = uuid
        self.subscription = subscription
        self.sent: list[str] = []

    async def write(self, msg: str) -> None:
        self.sent.append(msg)


def replay(captures: Path, exchange: str, name: str, symbols: list[str], channels: set[str],
           **kwargs: Any) -> tuple[list[FeedEvent], Any, list[FakeConn]]:
    """Preload symbols, build the feed, subscribe each recorded connection, push its frames."""
    bodies = rest_bodies(captures, name)
    preload_symbols(exchange, bodies)
    events: list[FeedEvent] = []

    async def on_event(event: FeedEvent) -> None:
        events.append(event)

    async def run() -> tuple[Any, list[FakeConn]]:
        feed = make_feed(exchange, symbols, channels, on_event, book_depth=DEPTH, **kwargs)
        feed.http_conn.read = RestBodies(bodies).aread  # book snapshots from the capture
        conns: dict[Path, FakeConn] = {}
        for path, ts, frame in server_frames(captures, name):
            if path not in conns:
                conns[path] = FakeConn(path.name, feed.subscription)
                await feed.subscribe(conns[path])
            await feed.message_handler(frame, conns[path], float(ts))
        return feed, list(conns.values())

    feed, conns = asyncio.run(run())
    assert feed.normalizer.rejected == 0
    return events, feed, conns


ALL = {"bbo", "trades", "book"}


# --- the six exchanges ----------------------------------------------------------------------
def test_binance_2021_capture(captures: Path) -> None:
    info = rest_json(captures, "BINANCE", "/api/v3/exchangeInfo")
    canon = {s["symbol"]: f"{s['baseAsset']}-{s['quoteAsset']}" for s in info["symbols"]}
    symbols = ["NKN-USDT", "BLZ-ETH", "LRC-BTC", "RUNE-EUR"]
    events, feed, _ = replay(captures, "binance", "BINANCE", symbols, ALL)

    exp = Expect()
    books: dict[str, L2] = {}
    last_id: dict[str, int] = {}
    for _path, ts, text in server_frames(captures, "BINANCE"):
        frame = json.loads(text)
        stream, d = frame["stream"], frame["data"]
        if stream.endswith("@bookTicker"):
            exp.bbo.append((canon[d["s"]], float(d["b"]), float(d["a"]), float(d["B"]),
                            float(d["A"]), ms(ts), ms(ts), str(d["u"])))
        elif stream.endswith("@aggTrade"):
            exp.trades.append((canon[d["s"]], str(d["a"]), float(d["p"]), float(d["q"]),
                               "sell" if d["m"] else "buy", d["T"], ms(ts), d["a"], str(d["a"])))
        elif "@depth" in stream:
            sym = canon[d["s"]]
            if sym not in books:  # first diff: the REST snapshot (limit=1000) is fetched
                snap = rest_json(captures, "BINANCE", f"depth?symbol={d['s']}&limit=1000")
                books[sym] = L2()
                for side, key in (("bid", "bids"), ("ask", "asks")):
                    for p, s in snap[key]:
                        books[sym].set(side, p, s)
                last_id[sym] = snap["lastUpdateId"]
                exp.book_state(sym, books[sym], ANY, ANY, quotes=False, seq=last_id[sym])
            if d["u"] <= last_id[sym]:
                continue
            assert d["U"] <= last_id[sym] + 1 <= d["u"]  # the capture is gap-free
            for side, key in (("bid", "b"), ("ask", "a")):
                for p, s in d[key]:
                    books[sym].set(side, p, s)
            last_id[sym] = d["u"]
            exp.book_state(sym, books[sym], d["E"], ms(ts), quotes=False, seq=d["u"])

    check(events, exp, "NKN-USDT")
    quotes = [e for e in events if e.channel == "bbo"]
    assert all(e.sequence is None for e in quotes)  # bookTicker ``u`` is not contiguous
    assert quotes[0].record.dedupe_key == f"binance:NKN-USDT:q:{quotes[0].dedupe_id}"
    assert {e.dedupe_id for e in events if e.channel == "book"} >= {str(v) for v in
                                                                    last_id.values()}


def test_binance_2024_bookticker_and_raw_trades(captures: Path, data_dir: Path) -> None:
    path = data_dir / "binance-ws-2024-08" / "spot_btcusdt_20240808.gz"
    with gzip.open(path, "rt") as fh:
        lines = [line.rstrip("\n").split(" ", 1) for line in itertools.islice(fh, 20_000)]
    frames = [(int(ns), text) for ns, text in lines
              if text.startswith('{"stream"') and "@depth" not in text]  # subscribed streams

    class Near(int):
        """Receive times pass through float seconds (cryptofeed's API): ±1 ms allowed."""

        def __eq__(self, other: object) -> bool:
            return isinstance(other, int) and abs(other - int(self)) <= 1

        __hash__ = int.__hash__

    exp = Expect()
    for ns, text in frames:
        d = json.loads(text)["data"]
        got = Near(ns // 1_000_000)
        if "@bookTicker" in text:
            exp.bbo.append(("BTC-USDT", float(d["b"]), float(d["a"]), float(d["B"]),
                            float(d["A"]), got, got, str(d["u"])))
        else:
            assert d["e"] == "trade"
            exp.trades.append(("BTC-USDT", str(d["t"]), float(d["p"]), float(d["q"]),
                               "sell" if d["m"] else "buy", d["T"], got, d["t"], str(d["t"])))

    preload_symbols("binance", rest_bodies(captures, "BINANCE"))
    events: list[FeedEvent] = []

    async def on_event(event: FeedEvent) -> None:
        events.append(event)

    async def run() -> Any:
        feed = make_feed("binance", ["BTC-USDT"], {"bbo", "trades"}, on_event)
        conn = FakeConn("binance-2024", feed.subscription)
        await feed.subscribe(conn)
        for ns, text in frames:
            await feed.message_handler(text, conn, ns / 1e9)
        return feed

    feed = asyncio.run(run())
    (address,) = [c[0].address for c in feed.connect()]
    streams = set(address.split("?streams=")[1].split("/"))
    assert streams == {"btcusdt@trade", "btcusdt@bookTicker"}  # raw trades, not aggTrade
    assert len(exp.bbo) == 14_429 and len(exp.trades) == 3_589
    check(events, exp, "BTC-USDT", kinds=("bbo", "trades"))
    seqs = [e.sequence for e in events if e.channel == "trades"]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # contiguous: no gaps counted


def test_coinbase_exchange_capture(captures: Path) -> None:
    symbols = ["SKL-USD", "SKL-BTC", "BAND-GBP", "NMR-EUR", "BAND-BTC", "YFI-BTC", "DASH-BTC",
               "NU-GBP", "CRV-EUR", "SKL-GBP"]
    events, feed, conns = replay(captures, "coinbase", "COINBASE", symbols, ALL)
    assert isinstance(feed, CoinbaseExchange)
    subs = [json.loads(m) for m in conns[0].sent]
    assert {c for m in subs for c in m["channels"]} == {"ticker", "matches", "level2_batch"}

    exp = Expect()
    books: dict[str, L2] = {}
    for _path, ts, text in server_frames(captures, "COINBASE"):
        d = json.loads(text)
        kind = d["type"]
        if kind == "ticker":
            exp.bbo.append((d["product_id"], float(d["best_bid"]), float(d["best_ask"]), None,
                            None, iso_ms(d["time"]), ms(ts), str(d["sequence"])))
        elif kind in ("match", "last_match"):
            taker = "buy" if d["side"] == "sell" else "sell"
            exp.trades.append((d["product_id"], str(d["trade_id"]), float(d["price"]),
                               float(d["size"]), taker, iso_ms(d["time"]), ms(ts),
                               d["trade_id"], str(d["trade_id"])))
        elif kind == "snapshot":
            books[d["product_id"]] = book = L2()
            for side, key in (("bid", "bids"), ("ask", "asks")):
                for p, s in d[key]:
                    book.set(side, p, s)
            exp.book_state(d["product_id"], book, ms(ts), ms(ts), quotes=False)
        elif kind == "l2update":
            book = books[d["product_id"]]
            for side, p, s in d["changes"]:
                book.set("bid" if side == "buy" else "ask", p, s)
            exp.book_state(d["product_id"], book, iso_ms(d["time"]), ms(ts), quotes=False)

    check(events, exp, "BAND-GBP")
    assert len(exp.trades) == 107 and len(exp.bbo) == 107


def test_kraken_capture(captures: Path) -> None:
    symbols = ["WAVES-EUR", "XMR-USD", "KSM-BTC", "GRT-ETH", "SC-EUR", "ETH-CHF", "OCEAN-BTC",
               "OMG-USD", "BTC-CHF", "ADA-BTC"]
    # The capture subscribed book depth 1000; Kraken's checksums (top 10) must hold throughout.
    events, feed, _ = replay(captures, "kraken", "KRAKEN", symbols, ALL,
                             feed_options={"max_depth": 1000, "checksum_validation": True})
    assert type(feed) is Kraken

    pairs = rest_json(captures, "KRAKEN", "/0/public/AssetPairs")["result"]
    canon = {p["wsname"]: p["wsname"].replace("XBT", "BTC").replace("/", "-")
             for p in pairs.values() if "wsname" in p}
    exp = Expect()
    books: dict[str, L2] = {}
    for _path, ts, text in server_frames(captures, "KRAKEN"):
        d = json.loads(text)
        if not isinstance(d, list):
            continue
        channel, sym = d[-2], canon[d[-1]]
        if channel == "ticker":
            t = d[1]
            exp.bbo.append((sym, float(t["b"][0]), float(t["a"][0]), float(t["b"][2]),
                            float(t["a"][2]), ms(ts), ms(ts), None))
        elif channel == "trade":
            for price, vol, when, side, *_ in d[1]:
                exp.trades.append((sym, ANY, float(price), float(vol),
                                   "buy" if side == "b" else "sell", ms(when), ms(ts), None,
                                   None))
        elif channel.startswith("book"):
            parts = d[1:-2]
            if "as" in parts[0]:
                books[sym] = L2()
                for side, key in (("bid", "bs"), ("ask", "as")):
                    for p, s, _t in parts[0][key]:
                        books[sym].set(side, p, s)
                when = ms(ts)
            else:
                times = []
                for part in parts:
                    for side, key in (("bid", "b"), ("ask", "a")):
                        for p, s, t, *_ in part.get(key, []):
                            books[sym].set(side, p, s)
                            times.append(Decimal(t))
                when = ms(max(times))
            exp.book_state(sym, books[sym], when, ms(ts), quotes=False)

    check(events, exp, "WAVES-EUR")
    trades = [e for e in events if e.channel == "trades"]
    assert len({e.record.trade_id for e in trades}) == len(trades)  # content ids, unique


def test_bitfinex_capture(captures: Path) -> None:
    # Bitfinex spells IOTA "IOT", MANA "MNA", SNGLS "SNG"; its "DOG" is MDOGE (not DOGE).
    aliases = {"IOT": "IOTA", "MNA": "MANA", "SNG": "SNGLS", "DOG": "MDOGE"}

    def canon(sym: str) -> str:
        pair = sym[1:]
        base, quote = pair.split(":") if ":" in pair else (pair[:3], pair[3:])
        return f"{aliases.get(base, base)}-{aliases.get(quote, quote)}"

    symbols = ["BFT-USD", "IOTA-ETH", "MDOGE-USD", "MANA-BTC", "ODE-USD", "TESTBTC-TESTUSD",
               "SNGLS-USD"]
    events, feed, _ = replay(captures, "bitfinex", "BITFINEX", symbols, ALL)
    assert type(feed) is Bitfinex

    exp = Expect()
    chans: dict[int, tuple[str, str]] = {}
    books: dict[str, L2] = {}
    for _path, ts, text in server_frames(captures, "BITFINEX"):
        d = json.loads(text)
        if isinstance(d, dict):
            if d.get("event") == "subscribed":
                chans[d["chanId"]] = (d["channel"], canon(d["symbol"]))
            continue
        if d[1] == "hb":
            continue
        channel, sym = chans[d[0]]
        if channel == "ticker":
            bid, bid_size, ask, ask_size = d[1][:4]
            exp.bbo.append((sym, bid, ask, bid_size, ask_size, ms(ts), ms(ts), None))
        elif channel == "trades":
            rows = d[1] if isinstance(d[1], list) else ([d[2]] if d[1] == "te" else [])
            for tid, when, amount, price in rows:
                exp.trades.append((sym, str(tid), price, abs(amount),
                                   "buy" if amount > 0 else "sell", when, ms(ts), None,
                                   str(tid)))
        elif channel == "book":
            rows = d[1] if isinstance(d[1][0], list) else [d[1]]
            if isinstance(d[1][0], list):
                books[sym] = L2()
            for price, count, amount in rows:
                side = "bid" if amount > 0 else "ask"
                books[sym].set(side, str(price), str(abs(amount)) if count > 0 else "0")
            exp.book_state(sym, books[sym], ms(ts), ms(ts), quotes=False)

    assert {"IOTA-ETH", "MDOGE-USD", "TESTBTC-TESTUSD"} <= {r[0] for r in exp.bbo}
    check(events, exp, "IOTA-ETH")


def test_bitstamp_capture(captures: Path) -> None:
    pairs = rest_json(captures, "BITSTAMP", "/api/v2/trading-pairs-info/")
    canon = {p["url_symbol"]: p["name"].replace("/", "-") for p in pairs}
    symbols = ["SGB-EUR", "ETH-USD", "XRP-EUR", "BAT-EUR", "USDT-EUR", "USDT-USD", "XLM-GBP",
               "ADA-EUR", "BAT-BTC", "GALA-EUR"]
    events, _feed, _ = replay(captures, "bitstamp", "BITSTAMP", symbols, ALL,
                              feed_options={"snapshot_delay": 0})

    exp = Expect()
    books: dict[str, L2] = {}
    snap_micro: dict[str, int] = {}
    for url_symbol, sym in canon.items():
        if sym in symbols:  # bitstamp has no ticker: quotes come from the book
            snap = rest_json(captures, "BITSTAMP", f"/api/v2/order_book/{url_symbol}")
            books[sym] = L2()
            for side, key in (("bid", "bids"), ("ask", "asks")):
                for p, s in snap[key]:
                    books[sym].set(side, p, s)
            snap_micro[sym] = int(snap["microtimestamp"])
            exp.book_state(sym, books[sym], snap_micro[sym] // 1000, ANY)
    for _path, ts, text in server_frames(captures, "BITSTAMP"):
        d = json.loads(text)
        if d["event"] == "trade":
            t = d["data"]
            exp.trades.append((canon[d["channel"].split("_")[-1]], str(t["id"]),
                               float(t["price_str"]), float(t["amount_str"]),
                               "buy" if t["type"] == 0 else "sell",
                               int(t["microtimestamp"]) // 1000, ms(ts), None, str(t["id"])))
        elif d["event"] == "data" and d["channel"].startswith("diff_order_book"):
            sym, t = canon[d["channel"].split("_")[-1]], d["data"]
            micro = int(t["microtimestamp"])
            if sym in snap_micro:  # diffs the snapshot already holds are skipped
                if micro <= snap_micro[sym]:
                    continue
                del snap_micro[sym]
            for side in ("bid", "ask"):
                for p, s in t[side + "s"]:
                    books[sym].set(side, p, s)
            exp.book_state(sym, books[sym], micro // 1000, ms(ts))

    check(events, exp, "XRP-EUR")


def test_gemini_by_configuration_only(captures: Path) -> None:
    """Gemini has no arbstream-specific code: the registry name picks cryptofeed's class."""
    assert feed_class("gemini") is Gemini and feed_class("GEMINI") is Gemini
    assert Gemini.id not in PROFILES and TICKER not in Gemini.websocket_channels

    bodies = rest_bodies(captures, "GEMINI")
    canon = {}
    for url, body in bodies.items():
        if "/v1/symbols/details/" in url:
            d = json.loads(body)
            canon[d["symbol"].upper()] = f"{d['base_currency']}-{d['quote_currency']}"
    symbols = ["BTC-GBP", "LINK-ETH", "FIL-USD", "ZEC-LTC", "BAT-BTC", "ETH-EUR", "LTC-ETH",
               "GRT-USD", "ANKR-USD", "ALCX-USD"]
    events, feed, conns = replay(captures, "gemini", "GEMINI", symbols, ALL)
    assert type(feed) is Gemini
    assert json.loads(conns[0].sent[0])["subscriptions"][0]["name"] == "l2"

    exp = Expect()
    books: dict[str, L2] = defaultdict(L2)
    for _path, ts, text in server_frames(captures, "GEMINI"):
        d = json.loads(text)
        if d["type"] == "trade":
            exp.trades.append((canon[d["symbol"]], str(d["event_id"]), float(d["price"]),
                               float(d["quantity"]), d["side"], d["timestamp"], ms(ts), None,
                               str(d["event_id"])))
        elif d["type"] == "l2_updates":
            sym = canon[d["symbol"]]
            for side, p, s in d["changes"]:
                books[sym].set("bid" if side == "buy" else "ask", p, s)
            exp.book_state(sym, books[sym], ms(ts), ms(ts))

    check(events, exp, "ALCX-USD")


# --- registry, symbols, endpoints, rejects --------------------------------------------------
def test_registry_ids() -> None:
    assert feed_class("coinbase") is CoinbaseExchange
    assert issubclass(feed_class("binance"), EXCHANGE_MAP["BINANCE"])
    assert feed_class("kraken") is Kraken and feed_class("bitfinex") is Bitfinex
    assert feed_class("okx") is OKX and feed_class("bybit") is Bybit
    assert exchange_id("Binance-US") == "binance_us"
    assert exchange_id("CRYPTO.COM") == "crypto_com"
    assert feed_class("crypto.com") is EXCHANGE_MAP["CRYPTO.COM"]
    every = {n.lower().replace(".", "_") for n in EXCHANGE_MAP}
    assert every <= set(supported_exchanges())
    assert all(re.fullmatch(r"[a-z][a-z0-9_]*", i) for i in supported_exchanges())
    with pytest.raises(ValueError, match=r"unknown exchange 'mtgox'.*gemini"):
        feed_class("mtgox")


@pytest.mark.parametrize(("name", "cls", "channels"), [
    ("okx", OKX, {TICKER, TRADES, L2_BOOK}),
    ("bybit", Bybit, {TICKER, TRADES, L2_BOOK}),
])
def test_config_only_exchange_builds_without_network(name: str, cls: type, channels: set
                                                     ) -> None:
    Symbols.set(cls.id, {"BTC-USDT": "BTC-USDT", "BTC-USDT-PERP": "BTCUSDT"},
                {"instrument_type": {"BTC-USDT": "spot", "BTC-USDT-PERP": "perpetual"}})

    async def on_event(_e: FeedEvent) -> None:
        pass

    feed = make_feed(name, ["BTC-USDT"], {"bbo", "trades", "book"}, on_event)
    assert isinstance(feed, cls)
    assert set(feed.subscription) == {cls.std_channel_to_exchange(c) for c in channels}
    assert feed.normalizer.exchange == name and not feed.normalizer.bbo_from_book
    assert symbol_map(cls) == {"BTC-USDT": "BTC-USDT"}  # perpetuals are not BASE-QUOTE
    with pytest.raises(ValueError, match="unknown symbol"):
        make_feed(name, ["ETH-USDT"], {"bbo"}, on_event)
    with pytest.raises(ValueError, match="channels"):
        make_feed(name, ["BTC-USDT"], {"candles"}, on_event)


def test_symbols_and_time() -> None:
    assert symbol_from_feed("BITFINEX", "DOG-USD") == "MDOGE-USD"
    assert symbol_from_feed("BITFINEX", "TESTBTC-TESTUSD") == "TESTBTC-TESTUSD"
    assert symbol_from_feed("KRAKEN", "BTC-CHF") == "BTC-CHF"
    with pytest.raises(ValueError):
        symbol_from_feed("BINANCE_FUTURES", "BTC-USDT-PERP")
    assert seconds_to_ms(1633998523963 / 1000.0) == 1633998523963
    assert seconds_to_ms(1618678142.557535) == 1618678142557
    assert seconds_to_ms(Decimal("1641343695.999999")) == 1641343695999


def test_preload_and_canonical_subscription(captures: Path) -> None:
    native = preload_symbols("bitfinex", rest_bodies(captures, "BITFINEX"))
    assert native["IOTA-ETH"] == "tIOTETH" and native["TESTBTC-TESTUSD"] == "tTESTBTC:TESTUSD"

    async def on_event(_e: FeedEvent) -> None:
        pass

    with pytest.raises(ValueError, match="canonical name is 'IOTA-ETH'"):
        make_feed("bitfinex", ["IOT-ETH"], {"bbo"}, on_event)
    with pytest.raises(KeyError, match="no recorded REST body"):
        preload_symbols("kraken", {"https://api.kraken.com/0/public/Assets": "{}"})


def test_endpoint_overrides_keep_routes(captures: Path) -> None:
    preload_symbols("gemini", rest_bodies(captures, "GEMINI"))
    preload_symbols("binance", rest_bodies(captures, "BINANCE"))

    async def on_event(_e: FeedEvent) -> None:
        pass

    feed = make_feed("gemini", ["BTC-GBP"], {"trades"}, on_event,
                        ws_url="ws://127.0.0.1:9001", rest_url="http://127.0.0.1:9002")
    assert [c[0].address for c in feed.connect()] == ["ws://127.0.0.1:9001/v2/marketdata/"]
    assert feed.rest_endpoints[0].route("currencies") == "http://127.0.0.1:9002/v1/symbols"
    assert feed.id == Gemini.id

    import ssl

    ctx = ssl.create_default_context()
    feed = make_feed("binance", ["NKN-USDT"], {"bbo"}, on_event,
                        ws_url="wss://127.0.0.1:9443", ssl_context=ctx, timeout=7)
    ((conn, *_),) = feed.connect()
    assert conn.address == "wss://127.0.0.1:9443/stream?streams=nknusdt@bookTicker"
    assert conn.ws_kwargs["ssl"] is ctx and feed.timeout == 7


def test_rejected_records_raise_after_the_frame_or_go_to_on_reject(captures: Path) -> None:
    preload_symbols("binance", rest_bodies(captures, "BINANCE"))
    crossed = json.dumps({"stream": "nknusdt@bookTicker", "data": {
        "u": 1, "s": "NKNUSDT", "b": "0.4", "B": "1", "a": "0.3", "A": "1"}})
    good = json.dumps({"stream": "nknusdt@bookTicker", "data": {
        "u": 2, "s": "NKNUSDT", "b": "0.3", "B": "1", "a": "0.4", "A": "1"}})
    events: list[FeedEvent] = []
    rejected: list[tuple[str, str, str]] = []

    async def on_event(e: FeedEvent) -> None:
        events.append(e)

    async def on_reject(exchange: str, raw: str, reason: str) -> None:
        rejected.append((exchange, raw, reason))

    async def run() -> None:
        feed = make_feed("binance", ["NKN-USDT"], {"bbo"}, on_event)
        conn = FakeConn("c", feed.subscription)
        with pytest.raises(RecordRejected, match="crossed quote"):
            await feed.message_handler(crossed, conn, 1.0)
        await feed.message_handler(good, conn, 2.0)
        feed = make_feed("binance", ["NKN-USDT"], {"bbo"}, on_event, on_reject=on_reject)
        await feed.message_handler(crossed, conn, 3.0)
        assert feed.normalizer.rejected == 1

    asyncio.run(run())
    assert [e.dedupe_id for e in events] == ["2"]
    assert rejected[0][0] == "binance" and "crossed quote" in rejected[0][2]
    assert json.loads(rejected[0][1])["u"] == 1
