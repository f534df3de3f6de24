"""Capture format round trip and the local exchange replay server (fast; no Kafka).

Every websocket test connects over TLS (certificate made at runtime by ``trustme``) with the
``websockets`` client, sends the exchange's CAPTURED subscribe frames and compares what comes
back with the captured frames, in order.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosedError

from producers.capture import (
    CaptureEvent,
    CaptureFormatError,
    capture_files,
    read_capture_config,
    read_rest_capture,
    read_ws_capture,
)
from producers.replay.binance import read_binance_gz
from testing.replay_server import ReplayServer, binance_gz_frames

pytest.importorskip("trustme")

Message = str | bytes


# --- helpers --------------------------------------------------------------------------------


def ws_path(url: str) -> str:
    """Path and query of a captured websocket URL (``""`` for the bare host)."""
    parts = urlsplit(url)
    return parts.path + (f"?{parts.query}" if parts.query else "")


def is_control(exchange: str, payload: str) -> bool:
    """Captured exchange frames that are answers/greetings, not streamed data."""
    msg = json.loads(payload)
    if exchange == "coinbase":
        return msg.get("type") == "subscriptions"
    if exchange == "bitstamp":
        return str(msg.get("event", "")).startswith("bts:")
    if exchange == "kraken":
        return isinstance(msg, dict) and msg.get("event") in ("systemStatus", "subscriptionStatus")
    if exchange == "bitfinex":
        return isinstance(msg, dict)
    return False


def assert_same(got: list[Message], want: list[Message]) -> None:
    """List equality with a short message (the lists hold thousands of frames)."""
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        assert g == w, f"frame {i} differs:\n got  {str(g)[:200]}\n want {str(w)[:200]}"
    assert len(got) == len(want), f"got {len(got)} frames, want {len(want)}"


async def session(
    srv: ReplayServer,
    path: str = "",
    send: list[str] | None = None,
    until: Callable[[list[Message]], bool] | None = None,
    timeout: float = 20.0,
) -> tuple[list[Message], BaseException | None]:
    """Connect, send ``send``, collect messages until the server closes, ``until`` holds or
    the connection breaks. Returns the messages and the closing exception (``None`` if clean)."""
    got: list[Message] = []
    error: BaseException | None = None

    async def run() -> None:
        nonlocal error
        async with connect(srv.ws_url + path, ssl=srv.client_ssl_context(), max_size=None) as ws:
            for frame in send or []:
                await ws.send(frame)
            try:
                async for message in ws:
                    got.append(message)
                    if until is not None and until(got):
                        return
            except ConnectionClosedError as exc:
                error = exc

    await asyncio.wait_for(run(), timeout)
    return got, error


@pytest.fixture(scope="module")
def captures(data_dir: Path) -> Path:
    return data_dir / "exchange-ws-captures"


# --- capture format ---------------------------------------------------------------------------


def test_capture_files_finds_each_exchange(data_dir: Path) -> None:
    ws, rest = capture_files(data_dir, "coinbase")
    assert [p.name for p in ws] == ["COINBASE.ws.28.0"]
    assert [p.name for p in rest] == ["COINBASE.0"]
    ws, _ = capture_files(data_dir, "kraken")
    assert [p.name for p in ws] == ["KRAKEN.ws.48.0", "KRAKEN.ws.49.0", "KRAKEN.ws.50.0"]
    ws, rest = capture_files(data_dir / "exchange-ws-captures", "BINANCE")
    assert [p.name for p in ws] == ["BINANCE.ws.1.0"]  # not BINANCE_US
    assert [p.name for p in rest] == ["BINANCE.0", "BINANCE.http.0.0"]
    with pytest.raises(FileNotFoundError, match="NOPE"):
        capture_files(data_dir, "nope")


def test_read_ws_capture_shapes(captures: Path) -> None:
    events = read_ws_capture(captures / "KRAKEN.ws.48.0")
    assert events[0] == CaptureEvent("connect", "wss://ws.kraken.com", 1618678132.368463)
    assert events[1].kind == "sent" and events[1].payload.startswith('{"event":"subscribe"')
    assert events[2].kind == "received" and events[2].url == "wss://ws.kraken.com"
    assert json.loads(events[2].payload)["event"] == "systemStatus"
    assert collections.Counter(e.kind for e in events) == {"connect": 1, "sent": 1, "received": 49}


def test_read_rest_capture_and_config(captures: Path) -> None:
    bodies = read_rest_capture([captures / "BINANCE.0", captures / "BINANCE.http.0.0"])
    assert len(bodies) == 5
    depth = json.loads(bodies["https://api.binance.com/api/v3/depth?symbol=NKNUSDT&limit=1000"])
    assert {"lastUpdateId", "bids", "asks"} <= depth.keys()
    assert "configuration" not in "".join(bodies)
    config = read_capture_config(captures / "BINANCE.0")
    assert config is not None and config["l2_book"][0] == "NKN-USDT"


def test_read_binance_gz(data_dir: Path) -> None:
    path = data_dir / "binance-ws-2024-08" / "spot_btcusdt_20240808.gz"
    ns, frame = next(read_binance_gz(path))
    assert ns > 1_700_000_000 * 10**9
    assert json.loads(frame)["stream"] == "btcusdt@depth@100ms"


def test_malformed_capture_line(tmp_path: Path) -> None:
    bad = tmp_path / "X.ws.1.0"
    bad.write_text("wss://x <-> 1.0\nthis is not a capture line\n")
    with pytest.raises(CaptureFormatError, match=r"X\.ws\.1\.0:2"):
        read_ws_capture(bad)


# --- replay: every exchange, full captured subscription ------------------------------------

WS_CAPTURES = [
    ("coinbase", "COINBASE.ws.28.0"),
    ("binance", "BINANCE.ws.1.0"),
    ("binance_us", "BINANCE_US.ws.1.0"),
    ("bitstamp", "BITSTAMP.ws.1.0"),
    ("kraken", "KRAKEN.ws.48.0"),
    ("kraken", "KRAKEN.ws.49.0"),
    ("kraken", "KRAKEN.ws.50.0"),
    ("bitfinex", "BITFINEX.ws.11.0"),
    ("gemini", "GEMINI.ws.1.0"),
]


@pytest.mark.parametrize(("exchange", "name"), WS_CAPTURES)
def test_replays_captured_session_exactly(
    data_dir: Path, captures: Path, exchange: str, name: str
) -> None:
    events = read_ws_capture(captures / name)
    url = events[0].url
    sent = [e.payload for e in events if e.kind == "sent"]
    received = [e.payload for e in events if e.kind == "received"]
    want_control = [p for p in received if is_control(exchange, p)]
    want_data = [p for p in received if not is_control(exchange, p)]

    with ReplayServer(exchange, data_dir=data_dir, settle=0.05, close_when_done=True) as srv:
        got, error = asyncio.run(session(srv, ws_path(url), sent))
        assert srv.wait_drained(timeout=5)
        stats = srv.stats
    assert error is None
    got_control = [m for m in got if is_control(exchange, m)]  # type: ignore[arg-type]
    got_data = [m for m in got if not is_control(exchange, m)]  # type: ignore[arg-type]
    if exchange == "kraken":  # greetings are taken in turn from the 3 captured connections
        assert json.loads(got_control.pop(0))["event"] == "systemStatus"
        want_control.pop(0)
    if exchange == "bitfinex":  # Bitfinex acked in its own order, not the request order
        assert sorted(got_control) == sorted(want_control)
    else:
        assert got_control == want_control
    assert_same(got_data, want_data)
    assert stats.frames_sent == len(want_data)
    assert stats.connections == 1
    assert stats.subscribe_frames == sum(
        "subscribe" in json.loads(s).get("event", json.loads(s).get("type", "")) for s in sent
    )
    assert stats.unknown_subscriptions == []
    if exchange in ("kraken", "bitstamp", "coinbase", "bitfinex"):
        # acks (and greetings) come before any data
        assert all(is_control(exchange, m) for m in got[: len(want_control)])  # type: ignore[arg-type]


# --- replay: filtering by subscription -------------------------------------------------------


def binance_captured(captures: Path) -> list[str]:
    events = read_ws_capture(captures / "BINANCE.ws.1.0")
    return [e.payload for e in events if e.kind == "received"]


def test_binance_url_streams_filter(data_dir: Path, captures: Path) -> None:
    streams = ["nknusdt@bookTicker", "lrcbtc@aggTrade", "runeeur@depth@100ms"]
    want = [p for p in binance_captured(captures) if json.loads(p)["stream"] in streams]
    assert 0 < len(want) < len(binance_captured(captures))
    with ReplayServer("binance", data_dir=data_dir, close_when_done=True) as srv:
        got, _ = asyncio.run(session(srv, "/stream?streams=" + "/".join(streams)))
    assert_same(got, want)


def test_binance_raw_ws_path_and_subscribe_method(data_dir: Path, captures: Path) -> None:
    want = [
        json.loads(p)["data"]
        for p in binance_captured(captures)
        if json.loads(p)["stream"] == "blzeth@bookTicker"
    ]
    with ReplayServer("binance", data_dir=data_dir, close_when_done=True) as srv:
        raw, _ = asyncio.run(session(srv, "/ws/blzeth@bookTicker"))
        sub = '{"method":"SUBSCRIBE","params":["blzeth@bookTicker"],"id":7}'
        via_method, _ = asyncio.run(session(srv, "/ws", [sub]))
    assert [json.loads(m) for m in raw] == want
    assert all(isinstance(m, str) and m.startswith('{"u":') for m in raw)  # byte slices
    assert via_method[0] == '{"result":null,"id":7}'
    assert via_method[1:] == raw


def test_coinbase_subset_gets_synthesized_ack(data_dir: Path, captures: Path) -> None:
    products = ["SKL-USD", "BAND-GBP"]
    events = read_ws_capture(captures / "COINBASE.ws.28.0")
    received = [e.payload for e in events if e.kind == "received"]
    want = [
        p
        for p in received
        if json.loads(p).get("type") == "ticker" and json.loads(p).get("product_id") in products
    ]
    sub = json.dumps({"type": "subscribe", "product_ids": products, "channels": ["ticker"]})
    with ReplayServer("coinbase", data_dir=data_dir, settle=0.05, close_when_done=True) as srv:
        got, _ = asyncio.run(session(srv, "", [sub]))
    ack = json.loads(got[0])
    assert ack == {
        "type": "subscriptions",
        "channels": [{"name": "ticker", "product_ids": sorted(products)}],
    }
    assert len(want) > 2
    assert_same(got[1:], want)


def test_bitfinex_subset_chan_ids_line_up(data_dir: Path, captures: Path) -> None:
    received = [
        e.payload for e in read_ws_capture(captures / "BITFINEX.ws.11.0") if e.kind == "received"
    ]
    acks = {
        (m["channel"], m["symbol"]): (p, m["chanId"])
        for p in received
        if isinstance(m := json.loads(p), dict) and m.get("event") == "subscribed"
    }
    wanted = [("ticker", "tBFTUSD"), ("book", "tDOGUSD"), ("trades", "tIOTETH")]
    chan_ids = {acks[w][1] for w in wanted}
    want = [p for p in received if isinstance(m := json.loads(p), list) and m[0] in chan_ids]
    subs = [
        '{"event":"subscribe","channel":"ticker","symbol":"tBFTUSD"}',
        '{"event":"subscribe","channel":"book","symbol":"DOGUSD","prec":"P0"}',  # no t prefix
        '{"event":"subscribe","channel":"trades","symbol":"tIOTETH"}',
    ]
    with ReplayServer("bitfinex", data_dir=data_dir, settle=0.05, close_when_done=True) as srv:
        got, _ = asyncio.run(session(srv, "/ws/2", subs))
    assert json.loads(got[0])["event"] == "info"
    assert got[1:4] == [acks[w][0] for w in wanted]
    assert_same(got[4:], want)


def test_unknown_subscription_is_rejected(data_dir: Path) -> None:
    sub = '{"event":"subscribe","pair":["XBT/USD"],"subscription":{"name":"ticker"},"reqid":5}'
    with ReplayServer("kraken", data_dir=data_dir) as srv:
        got, _ = asyncio.run(session(srv, "", [sub], until=lambda g: len(g) >= 2))
        stats = srv.stats
    assert json.loads(got[0])["event"] == "systemStatus"
    err = json.loads(got[1])
    assert err["status"] == "error" and err["pair"] == "XBT/USD" and err["reqid"] == 5
    assert stats.unknown_subscriptions == ["kraken ticker XBT/USD"]
    assert stats.frames_sent == 0


# --- REST -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exchange", "path", "captured_url"),
    [
        ("binance", "/api/v3/exchangeInfo", "https://api.binance.com/api/v3/exchangeInfo"),
        (
            "binance",
            "/api/v3/depth?symbol=LRCBTC&limit=1000",
            "https://api.binance.com/api/v3/depth?symbol=LRCBTC&limit=1000",
        ),
        (
            "binance",
            "/api/v3/depth?limit=5000&symbol=LRCBTC",  # size ignored, order irrelevant
            "https://api.binance.com/api/v3/depth?symbol=LRCBTC&limit=1000",
        ),
        ("kraken", "/0/public/AssetPairs", "https://api.kraken.com/0/public/AssetPairs"),
        (
            "bitfinex",
            "/v2/conf/pub:list:pair:exchange",
            "https://api-pub.bitfinex.com/v2/conf/pub:list:pair:exchange",
        ),
        (
            "bitfinex",
            "/v2/conf/pub:list:pair:futures",  # recorded as ...:future
            "https://api-pub.bitfinex.com/v2/conf/pub:list:pair:future",
        ),
        ("coinbase", "/products", "https://api.pro.coinbase.com/products"),
        ("gemini", "/v1/symbols", "https://api.gemini.com/v1/symbols"),
        (
            "gemini",
            "/v1/symbols/details/BTCUSD",
            "https://api.gemini.com/v1/symbols/details/btcusd",
        ),
        (
            "bitstamp",
            "/api/v2/trading-pairs-info/",
            "https://www.bitstamp.net/api/v2/trading-pairs-info/",
        ),
        (
            "bitstamp",
            "/api/v2/order_book/ethusd",
            "https://www.bitstamp.net/api/v2/order_book/ethusd",
        ),
    ],
)
def test_rest_serves_captured_bodies(
    data_dir: Path, exchange: str, path: str, captured_url: str
) -> None:
    _, rest_paths = capture_files(data_dir, exchange)
    body = read_rest_capture(rest_paths)[captured_url]
    with ReplayServer(exchange, data_dir=data_dir) as srv:
        plain = requests.get(srv.http_url + path, timeout=10)
        tls = requests.get(f"{srv.https_url}{path}", verify=srv.ca_file, timeout=10)
    for r in (plain, tls):
        assert r.status_code == 200
        assert r.text == body
        assert r.headers["Content-Type"].startswith("application/json")


def test_rest_unknown_path_is_404(data_dir: Path) -> None:
    with ReplayServer("binance", data_dir=data_dir, rest={"/api/v3/ping": "{}"}) as srv:
        missing = requests.get(srv.http_url + "/api/v3/depth?symbol=BTCUSDT&limit=1000", timeout=10)
        extra = requests.get(srv.http_url + "/api/v3/ping", timeout=10)
        stats = srv.stats
    assert missing.status_code == 404
    assert "not in the binance capture: GET /api/v3/depth?symbol=BTCUSDT" in missing.text
    assert "/api/v3/exchangeInfo" in missing.text
    assert extra.status_code == 200 and extra.text == "{}"
    assert stats.http_requests == [
        ("/api/v3/depth?symbol=BTCUSDT&limit=1000", 404),
        ("/api/v3/ping", 200),
    ]


# --- faults, pacing, explicit frames --------------------------------------------------------


@pytest.mark.parametrize("resend", [0, 5])
def test_drop_after_and_resend_on_reconnect(data_dir: Path, captures: Path, resend: int) -> None:
    want = binance_captured(captures)
    path = ws_path(read_ws_capture(captures / "BINANCE.ws.1.0")[0].url)
    with ReplayServer(
        "binance",
        data_dir=data_dir,
        drop_after=50,
        resend_on_reconnect=resend,
        close_when_done=True,
    ) as srv:
        first, error = asyncio.run(session(srv, path))
        second, clean = asyncio.run(session(srv, path))
        stats = srv.stats
    assert isinstance(error, ConnectionClosedError) and error.rcvd is None  # abrupt: no close
    assert clean is None
    assert first == want[:50]
    assert_same(second, want[50 - resend :])
    assert (stats.connections, stats.drops, stats.frames_resent) == (2, 1, resend)
    assert stats.frames_sent == len(want) + resend


def test_drop_and_resend_with_resubscription(data_dir: Path, captures: Path) -> None:
    events = read_ws_capture(captures / "BITSTAMP.ws.1.0")
    sent = [e.payload for e in events if e.kind == "sent"]
    want = [
        e.payload for e in events if e.kind == "received" and not is_control("bitstamp", e.payload)
    ]
    with ReplayServer(
        "bitstamp",
        data_dir=data_dir,
        settle=0.05,
        drop_after=100,
        drop_count=2,
        resend_on_reconnect=10,
        close_when_done=True,
    ) as srv:
        runs = [asyncio.run(session(srv, "/", sent)) for _ in range(3)]
    data = [[m for m in got if not is_control("bitstamp", m)] for got, _ in runs]  # type: ignore[arg-type]
    assert [type(err) for _, err in runs] == [
        ConnectionClosedError,
        ConnectionClosedError,
        type(None),
    ]
    assert data[0] == want[:100]
    assert data[1] == want[90:190]
    assert_same(data[2], want[180:])
    # every captured frame arrives at least once; duplicates are exactly the overlaps
    seen = data[0] + data[1] + data[2]
    assert set(seen) == set(want)
    assert len(seen) - len(want) == 20


def test_inject_malformed_frames(data_dir: Path, captures: Path) -> None:
    want = binance_captured(captures)
    path = ws_path(read_ws_capture(captures / "BINANCE.ws.1.0")[0].url)
    truncated = want[0][:25]
    with ReplayServer(
        "binance",
        data_dir=data_dir,
        inject={0: truncated, 3: b"\x00\xffbinary"},
        close_when_done=True,
    ) as srv:
        got, _ = asyncio.run(session(srv, path))
        stats = srv.stats
    assert got[0] == truncated
    assert got[1:4] == want[:3]
    assert got[4] == b"\x00\xffbinary"
    assert_same(got[5:], want[3:])
    assert (stats.injected_sent, stats.frames_sent) == (2, len(want))


def test_explicit_frames_binance_2024(data_dir: Path) -> None:
    path = data_dir / "binance-ws-2024-08" / "spot_btcusdt_20240808.gz"
    frames = list(itertools.islice(binance_gz_frames(path), 3000))
    want = [f for _, f in frames if f.startswith('{"stream":"btcusdt@bookTicker"')]
    with ReplayServer(
        "binance", frames=iter(frames), data_dir=data_dir, close_when_done=True
    ) as srv:
        got, _ = asyncio.run(session(srv, "/stream?streams=btcusdt@bookTicker"))
        stats = srv.stats
    assert len(want) > 500
    assert_same(got, want)
    assert stats.frames_unroutable == 1  # the REST depth snapshot line in the file


def test_speed_paces_by_capture_time(data_dir: Path) -> None:
    a = '{"stream":"x@trade","data":{"n":1}}'
    b = '{"stream":"x@trade","data":{"n":2}}'
    frames = [(100.0, a), (100.4, b)]
    timings = {}
    for speed in (1.0, 20.0):
        with ReplayServer(
            "binance", frames=frames, data_dir=data_dir, speed=speed, close_when_done=True
        ) as srv:
            t0 = time.monotonic()
            got, _ = asyncio.run(session(srv, "/stream?streams=x@trade"))
            timings[speed] = time.monotonic() - t0
        assert got == [a, b]
    assert timings[1.0] >= 0.35
    assert timings[20.0] < 0.3


def test_wait_drained_times_out_without_client(data_dir: Path) -> None:
    with ReplayServer("gemini", data_dir=data_dir, tls=False) as srv:
        assert srv.ws_url.startswith("ws://") and srv.https_url is None
        assert not srv.wait_drained(timeout=0.1)
        assert not srv.done.is_set()


def test_bad_arguments(data_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown exchange"):
        ReplayServer("ftx", data_dir=data_dir)
    with pytest.raises(ValueError, match="speed"):
        ReplayServer("kraken", data_dir=data_dir, speed=0)
    with pytest.raises(ValueError, match="resend_on_reconnect"):
        ReplayServer("kraken", data_dir=data_dir, drop_after=5, drop_count=2, resend_on_reconnect=5)


# --- cryptofeed end to end -------------------------------------------------------------------


def run_cryptofeed(
    srv: ReplayServer, feed_cls: type, routes: object, symbols: list[str], channels: list[str]
) -> collections.Counter[str]:
    """Run one cryptofeed feed against ``srv`` until the server has streamed everything."""
    from cryptofeed import FeedHandler
    from cryptofeed.connection import RestEndpoint, WebsocketEndpoint
    from cryptofeed.symbols import Symbols

    class Local(feed_cls):  # type: ignore[misc, valid-type]
        websocket_endpoints = [
            WebsocketEndpoint(srv.ws_url, limit=20, options={"ssl": srv.client_ssl_context()})
        ]
        rest_endpoints = [RestEndpoint(srv.http_url, routes=routes)]

    got: collections.Counter[str] = collections.Counter()

    async def callback(obj: object, receipt_ts: float) -> None:
        got[type(obj).__name__] += 1

    async def main() -> None:
        Symbols.clear()
        handler = FeedHandler(config={"log": {"disabled": True}})
        handler.add_feed(
            Local(symbols=symbols, channels=channels, callbacks=dict.fromkeys(channels, callback))
        )
        handler.run(start_loop=False, install_signal_handlers=False)
        try:
            assert await asyncio.to_thread(srv.wait_drained, 20)
            await asyncio.sleep(0.3)
        finally:
            for feed in handler.feeds:
                feed.stop()
            for feed in handler.feeds:
                await feed.shutdown()
            Symbols.clear()

    asyncio.run(main())
    return got


def test_cryptofeed_binance_end_to_end(data_dir: Path) -> None:
    from cryptofeed.connection import Routes
    from cryptofeed.defines import L2_BOOK, TICKER, TRADES
    from cryptofeed.exchanges import Binance

    routes = Routes("/api/v3/exchangeInfo", l2book="/api/v3/depth?symbol={}&limit={}")
    symbols = ["NKN-USDT", "BLZ-ETH", "LRC-BTC", "RUNE-EUR"]
    with ReplayServer("binance", data_dir=data_dir) as srv:
        got = run_cryptofeed(srv, Binance, routes, symbols, [TICKER, TRADES, L2_BOOK])
        stats = srv.stats
    assert got["Ticker"] > 50 and got["OrderBook"] > 100 and got["Trade"] > 0
    assert ("/api/v3/exchangeInfo", 200) in stats.http_requests
    assert ("/api/v3/depth?symbol=NKNUSDT&limit=1000", 200) in stats.http_requests


def test_cryptofeed_kraken_end_to_end(data_dir: Path) -> None:
    from cryptofeed.connection import Routes
    from cryptofeed.defines import L2_BOOK, TICKER, TRADES
    from cryptofeed.exchanges import Kraken

    symbols = ["WAVES-EUR", "XMR-USD", "KSM-BTC", "BTC-CHF"]
    with ReplayServer("kraken", data_dir=data_dir, settle=0.1) as srv:
        got = run_cryptofeed(
            srv, Kraken, Routes("/0/public/AssetPairs"), symbols, [TICKER, TRADES, L2_BOOK]
        )
        stats = srv.stats
    assert got["Ticker"] > 0 and got["Trade"] > 0 and got["OrderBook"] > 100
    assert stats.subscribe_frames == 3 and stats.unknown_subscriptions == []
