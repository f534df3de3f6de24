"""The stream core's event-time rules, early firing and dead letters (spark_jobs/engine.py).

Pure Python: each test drives :class:`Engine` over hand-made micro-batches and checks what a
user would see in the sinks. Semantics against the pandas reference are in
``tests/test_tracker.py`` and ``tests/test_engine_scenarios.py``.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
import pytest

from arbstream.config import Settings
from arbstream.timestamps import from_ms
from spark_jobs.engine import INPUT_COLUMNS, Engine, EngineConfig

T0 = 1_678_507_200_000  # 2023-03-11T04:00:00Z
NOW = 1_800_000_000_000  # processing clock (2027), later than every event time
FEES = {"coinbase": 0.001, "kraken": 0.001, "binance": 0.001}


def cfg(**over: Any) -> EngineConfig:
    base = {"watermark_seconds": 2.0, "idle_timeout_seconds": 5.0, "slippage_bps": 0.0,
            "latency_haircut_bps": 0.0, "episode_gap_seconds": 3.0, "fees": FEES}
    return EngineConfig.of(Settings(**{**base, **over}))


def quote(exchange: str, ts: int, bid: float, ask: float, symbol: str = "BTC-USD",
          recv: int | None = None, key: str | None = None, **extra: Any) -> dict[str, Any]:
    key = key or f"{exchange}|{symbol}|{ts}|{bid}|{ask}"
    row = {"kind": "quote", "exchange": exchange, "symbol": symbol, "bid": bid, "ask": ask,
           "bid_size": None, "ask_size": None, "exchange_ts": ts,
           "received_ts": ts if recv is None else recv, "dedupe_key": key,
           "dedupe_hash": hash(key) & 0x7FFFFFFFFFFFFFFF, "bids": None, "asks": None,
           "error": None, "value": None, "topic": f"md.{exchange}.quotes", "partition": 0,
           "offset": 0, "home": True}
    row.update(extra)
    return row


def heartbeat(exchange: str, ts: int, recv: int | None = None) -> dict[str, Any]:
    return quote(exchange, ts, 0.0, 0.0, kind="heartbeat", symbol=None, key="",
                 recv=recv, value=b"hb")


def run(engine: Engine, rows: list[dict], c: EngineConfig, now: int = NOW) -> list[dict]:
    frame = pd.DataFrame(rows, columns=INPUT_COLUMNS) if rows else pd.DataFrame(
        columns=INPUT_COLUMNS)
    return engine.process(frame, now, c)


def of(records: list[dict], record: str, stage: str | None = None) -> list[dict]:
    return [r for r in records if r["record"] == record
            and (stage is None or r.get("stage") == stage)]


def test_early_opportunity_in_the_batch_of_its_quote_then_final() -> None:
    c, eng = cfg(), Engine()
    first = run(eng, [quote("coinbase", T0 + 300, 99.9, 100.0),
                      quote("kraken", T0 + 400, 101.0, 101.1)], c)
    [early] = of(first, "opportunity", "early")
    assert early["opportunity_id"] == "BTC-USD|2023-03-11T04:00:01.000Z|coinbase|kraken"
    assert early["net"] == pytest.approx(101.0 / 100.0 - 1 - 0.002)
    assert early["emitted_ts"] == NOW
    assert not of(first, "spread")  # nothing is final yet
    # both exchanges move on 10 s: the watermark (min clock - 2 s) passes the first windows
    later = run(eng, [quote("coinbase", T0 + 10_300, 99.0, 99.1),
                      quote("kraken", T0 + 10_400, 99.0, 99.1)], c, NOW + 1000)
    final = of(later, "opportunity", "final")
    assert early["opportunity_id"] in {r["opportunity_id"] for r in final}
    assert not of(later, "opportunity", "retracted")
    # the quotes stay fresh for max_quote_age (5 windows): one snapshot, so one final
    # opportunity valid over the 5 windows (and one early)
    [run_] = [r for r in final if r["buy_exchange"] == "coinbase"]
    assert (run_["valid_from"], run_["valid_to"], run_["windows"]) == (
        from_ms(T0 + 1000), from_ms(T0 + 5000), 5)


def test_allowed_late_quote_retracts_an_early_opportunity() -> None:
    c, eng = cfg(), Engine()
    first = run(eng, [quote("coinbase", T0 + 300, 99.9, 100.0),
                      quote("kraken", T0 + 400, 101.0, 101.1)], c)
    [early] = of(first, "opportunity", "early")
    # kraken's later quote of the same window (allowed-late: the watermark has not passed it)
    # lowers its bid: the window is no opportunity after all
    second = run(eng, [quote("kraken", T0 + 900, 99.0, 100.5)], c, NOW + 100)
    assert not of(second, "opportunity")
    third = run(eng, [quote("coinbase", T0 + 20_000, 99.0, 99.1),
                      quote("kraken", T0 + 20_000, 99.0, 99.1)], c, NOW + 200)
    [retracted] = of(third, "opportunity", "retracted")
    assert retracted["opportunity_id"] == early["opportunity_id"]
    assert (retracted["buy_exchange"], retracted["sell_exchange"]) == ("coinbase", "kraken")
    finals = {r["opportunity_id"] for r in of(third, "opportunity", "final")}
    assert early["opportunity_id"] not in finals
    # the spread of that window is final with the late quote's bid
    [spread] = [r for r in of(third, "spread") if r["opportunity_id"] == early["opportunity_id"]]
    assert spread["sell_bid"] == 99.0


def test_allowed_late_quote_changes_an_early_opportunity() -> None:
    c, eng = cfg(), Engine()
    run(eng, [quote("coinbase", T0 + 300, 99.9, 100.0),
              quote("kraken", T0 + 400, 101.0, 101.1)], c)
    second = run(eng, [quote("kraken", T0 + 900, 100.5, 100.6)], c, NOW + 100)
    [update] = of(second, "opportunity", "early")
    assert update["sell_bid"] == 100.5
    third = run(eng, [quote("coinbase", T0 + 20_000, 99.0, 99.1),
                      quote("kraken", T0 + 20_000, 99.0, 99.1)], c, NOW + 200)
    [final] = [r for r in of(third, "opportunity", "final")
               if r["opportunity_id"] == update["opportunity_id"]]
    assert final["net"] == update["net"]
    assert final["episode_id"] is not None  # the tracker's fields are there once final


def test_each_exchange_has_its_own_clock() -> None:
    """Kraken's quotes arrive 30 s behind coinbase's (a slow feed): with one shared
    watermark (max event time - delay) every kraken quote would be late. Per exchange, none is."""
    c, eng = cfg(), Engine()
    out: list[dict] = []
    for i in range(40):
        out += run(eng, [quote("coinbase", T0 + 30_000 + i * 1000, 99.9, 100.0),
                         quote("kraken", T0 + i * 1000, 101.0, 101.1)], c, NOW + i)
    assert not of(out, "deadletter")
    assert len(of(out, "quote")) == 80
    assert {f["exchange"] for f in of(out, "feature")} == {"coinbase", "kraken"}
    assert eng.watermark == T0 + 39_000 - 2000  # the lagging exchange holds it back


def test_each_partition_has_its_own_clock() -> None:
    """One exchange's symbols on two partitions, the second read a minute behind the first (a
    backlog split over partitions): none of its records is late."""
    c, eng = cfg(), Engine()
    out: list[dict] = []
    for i in range(30):
        out += run(eng, [quote("kraken", T0 + 60_000 + i * 1000, 99.9, 100.0),
                         quote("kraken", T0 + i * 1000, 99.9, 100.0, symbol="ETH-USD",
                               partition=1)], c, NOW + i)
    assert not of(out, "deadletter")
    assert eng.clocks == {"md.kraken.quotes|0": T0 + 89_000, "md.kraken.quotes|1": T0 + 29_000}


def listed(*keys: tuple[str, int]) -> list[dict[str, Any]]:
    """``partition`` rows naming source partitions, as the arbmarket source sends them."""
    return [dict(dict.fromkeys(INPUT_COLUMNS), kind="partition", topic=t, partition=p,
                 home=True) for t, p in keys]


def test_a_listed_partition_without_records_yet_holds_the_watermark() -> None:
    """The first micro-batch of a replay reads an hour of coinbase, while kraken's partition,
    listed by the source, has no record yet; kraken's hour arrives in the next batch, 2 s
    later: none of it is late. Unlisted, it would be (the demo once lost a day this way)."""
    c = cfg()
    ahead = [quote("coinbase", T0 + i * 60_000, 99.9, 100.0) for i in range(60)]
    behind = [quote("kraken", T0 + i * 60_000, 101.0, 101.1) for i in range(60)]
    parts = listed(("md.coinbase.quotes", 0), ("md.kraken.quotes", 0))
    eng = Engine()
    run(eng, ahead + parts, c)
    assert eng.watermark == -1  # held for kraken's listed, still empty partition
    out = run(eng, behind + parts, c, NOW + 2000)
    assert not of(out, "deadletter") and eng.watermark == T0 + 59 * 60_000 - 2000
    assert not eng.flushed and "md.kraken.quotes|0" in eng.known
    unlisted = Engine()
    run(unlisted, ahead, c)
    late = of(run(unlisted, behind, c, NOW + 2000), "deadletter")
    assert len(late) == 59 and all(d["reason"].startswith("late") for d in late)


def test_a_listed_partition_that_stays_empty_stops_holding_after_the_idle_timeout() -> None:
    c = cfg()  # idle timeout 5 s
    eng = Engine()
    parts = listed(("md.coinbase.quotes", 0), ("md.coinbase.book", 0))  # no book stream
    for i in range(8):
        run(eng, [quote("coinbase", T0 + i * 10_000, 99.9, 100.0), *parts], c, NOW + i * 1000)
        assert eng.watermark == (-1 if i <= 5 else T0 + i * 10_000 - 2000), i
    run(eng, [], c, NOW + 60_000)  # every exchange idle: open state flushed once
    assert eng.flushed
    run(eng, parts, c, NOW + 61_000)
    assert eng.flushed  # partition rows alone are no input: no new flush needed


def test_an_idle_exchange_stops_holding_the_watermark_back() -> None:
    c, eng = cfg(), Engine()
    run(eng, [quote("coinbase", T0, 99.9, 100.0), quote("kraken", T0, 99.9, 100.0)], c)
    # kraken goes silent; coinbase goes on for 6 s of processing time
    for i in range(1, 7):
        run(eng, [quote("coinbase", T0 + i * 10_000, 99.9, 100.0)], c, NOW + i * 1000)
    assert eng.watermark == T0 + 60_000 - 2000


def test_future_records_are_dead_lettered_and_never_move_time() -> None:
    c, eng = cfg(), Engine()
    run(eng, [quote("coinbase", T0, 99.9, 100.0), quote("kraken", T0, 101.0, 101.1)], c)
    hour = 3_600_000
    out = run(eng, [
        quote("kraken", T0 + hour, 101.0, 101.1, recv=T0),  # ahead of its own receive time
        quote("kraken", T0 + hour + 1, 101.0, 101.1, recv=T0 + hour + 1),  # a jump
        heartbeat("coinbase", T0 + hour, recv=T0 + hour),  # a heartbeat dated 1 h ahead
        quote("coinbase", T0 + 500, 99.9, 100.0, recv=NOW + hour),  # received in the future
        quote("kraken", T0 + 600, 101.0, 101.1),  # a normal record behind them
    ], c, NOW + 10)
    letters = of(out, "deadletter")
    assert len(letters) == 4
    assert all(d["reason"].startswith("future_timestamp") for d in letters)
    assert eng.clocks == {"md.coinbase.quotes|0": T0, "md.kraken.quotes|0": T0 + 600}
    # and the stream goes on: the next quotes are neither late nor future
    nxt = run(eng, [quote("coinbase", T0 + 700, 99.9, 100.0)], c, NOW + 20)
    assert not of(nxt, "deadletter")
    [stats] = [s for s in of(out, "stream") if s["exchange"] == "kraken"]
    assert (stats["future"], stats["received"]) == (2, 3)


def test_records_behind_the_watermark_are_dead_lettered_as_late() -> None:
    c, eng = cfg(), Engine()
    run(eng, [quote("coinbase", T0 + 10_000, 99.9, 100.0),
              quote("kraken", T0 + 10_000, 99.9, 100.0)], c)
    out = run(eng, [quote("kraken", T0 + 7_000, 99.9, 100.0),
                    quote("kraken", T0 + 8_500, 99.9, 100.0)], c, NOW + 1)
    [late] = of(out, "deadletter")
    assert late["reason"].startswith("late")
    assert late["source_topic"] == "md.kraken.quotes"
    assert [q["exchange_ts"] for q in of(out, "quote")] == [T0 + 8_500]


def test_duplicates_are_dropped_within_and_across_batches() -> None:
    c, eng = cfg(), Engine()
    q = quote("coinbase", T0 + 100, 99.9, 100.0, key="k1")
    first = run(eng, [q, dict(q, bid=1.0)], c)  # same dedupe key: the first copy is kept
    second = run(eng, [dict(q, received_ts=T0 + 999)], c, NOW + 1)
    assert [x["bid"] for x in of(first, "quote")] == [99.9]
    assert not of(second, "quote")
    assert [s["duplicates"] for s in of(second, "stream")] == [1]


def test_invalid_records_come_out_as_dead_letters_with_their_payload() -> None:
    c, eng = cfg(), Engine()
    bad = quote("kraken", T0, 1.0, 1.0, kind=None, error="malformed JSON", value=b"{oops")
    [letter] = of(run(eng, [bad, quote("kraken", T0, 99.9, 100.0)], c), "deadletter")
    assert (letter["reason"], letter["value"]) == ("malformed JSON", b"{oops")


def test_idle_close_then_resume_continues_the_same_episode() -> None:
    """A finite replay closes its windows and episodes once every exchange is idle, without
    any future-dated record; a second replay that continues it extends the same episode."""
    c, eng = cfg(episode_gap_seconds=30.0), Engine()
    run(eng, [quote("coinbase", T0 + 300, 99.9, 100.0),
              quote("kraken", T0 + 400, 101.0, 101.1)], c)
    closed = run(eng, [], c, NOW + 6000)  # the processing-time timer, all idle
    assert eng.watermark == T0 + 400 + 5000 - 1
    [episode] = [e for e in of(closed, "episode")
                 if e["buy_exchange"] == "coinbase" and e["event"] == "closed"]
    assert episode["event"] == "closed" and episode["windows"] == 5
    assert run(eng, [], c, NOW + 12_000) == []  # flushed once, not on every timer
    # the next replay starts where the first ended
    run(eng, [quote("coinbase", T0 + 10_000, 99.9, 100.0),
              quote("kraken", T0 + 10_000, 101.0, 101.1)], c, NOW + 13_000)
    again = run(eng, [], c, NOW + 19_000)
    [ep2] = [e for e in of(again, "episode")
             if e["buy_exchange"] == "coinbase" and e["event"] == "closed"]
    assert ep2["episode_id"] == episode["episode_id"]
    assert ep2["windows"] == 10


def test_after_idleness_one_exchange_cannot_reanchor_time_but_two_can() -> None:
    c, eng = cfg(), Engine()
    run(eng, [quote("coinbase", T0, 99.9, 100.0), quote("kraken", T0, 99.9, 100.0)], c)
    run(eng, [], c, NOW + 6000)  # all idle
    day = 24 * 3_600_000
    lone = run(eng, [quote("kraken", T0 + day, 99.9, 100.0)], c, NOW + 7000)
    assert [d["reason"][:16] for d in of(lone, "deadletter")] == ["future_timestamp"]
    replay = run(eng, [quote("coinbase", T0 + day + 1, 99.9, 100.0),
                       quote("kraken", T0 + day + 2, 99.9, 100.0)], c, NOW + 8000)
    assert not of(replay, "deadletter")
    assert eng.clocks == {"md.coinbase.quotes|0": T0 + day + 1,
                          "md.kraken.quotes|0": T0 + day + 2}


def test_after_a_replay_a_live_feed_of_one_exchange_reanchors_time() -> None:
    c, eng = cfg(), Engine()
    run(eng, [quote("coinbase", T0, 99.9, 100.0), quote("kraken", T0, 99.9, 100.0)], c)
    run(eng, [], c, NOW + 6000)  # the replay is over: all idle
    now = NOW + 7000
    live = run(eng, [quote("kraken", now - 50, 99.9, 100.0, recv=now - 20)], c, now)
    assert not of(live, "deadletter")
    assert eng.clocks["md.kraken.quotes|0"] == now - 50
