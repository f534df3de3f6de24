"""Dead letters keep a capped prefix of huge payloads, with the original's length and SHA-256,
so a letter always fits in one Kafka message (librdkafka's default ``message.max.bytes`` is
1,000,000 bytes): checked against the session's real broker."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import uuid

import pytest
from confluent_kafka import KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from arbstream.config import Settings
from arbstream.schemas import DEADLETTER_MAX_RAW_BYTES, DeadLetter
from testing.support import consume

KAFKA_DEFAULT_MAX_BYTES = 1_000_000  # librdkafka's default message.max.bytes


def random_bytes(n: int, seed: int = 7) -> bytes:
    """``n`` reproducible random bytes; not valid UTF-8 (checked)."""
    data = random.Random(seed).randbytes(n)
    with pytest.raises(UnicodeDecodeError):
        data.decode("utf-8")
    return data


def big_json(min_bytes: int) -> bytes:
    """A valid JSON array of quote-like objects, at least ``min_bytes`` bytes, with non-ASCII
    text so multi-byte characters are everywhere."""
    row = {"exchange": "kraken", "symbol": "BTC-USD", "bid": 20000.5, "ask": 20001.0,
           "note": "prix €, 价格, émoji 😀 \"quoted\""}
    one = len(json.dumps(row, ensure_ascii=False).encode())
    rows = [{**row, "seq": i} for i in range(min_bytes // one + 1)]
    data = json.dumps(rows, ensure_ascii=False).encode()
    assert len(data) >= min_bytes
    return data


def assert_describes(letter: DeadLetter, original: bytes) -> None:
    assert letter.raw_length == len(original)
    assert letter.raw_sha256 == hashlib.sha256(original).hexdigest()


def kept_bytes(letter: DeadLetter) -> bytes:
    if letter.raw_encoding == "base64":
        return base64.b64decode(letter.raw, validate=True)
    return letter.raw.encode("utf-8")


def test_800kb_random_bytes_keep_a_base64_prefix() -> None:
    data = random_bytes(800_000)
    letter = DeadLetter.of(data, "not JSON", "stream", source_topic="md.quotes.kraken",
                           source_partition=1, source_offset=42)

    assert letter.truncated is True and letter.raw_encoding == "base64"
    assert kept_bytes(letter) == data[:DEADLETTER_MAX_RAW_BYTES]
    assert_describes(letter, data)
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        "md.quotes.kraken", 1, 42)
    encoded = letter.to_json()
    assert len(encoded) < 100_000  # 64 KiB as base64 is 87,384 characters
    assert DeadLetter.model_validate_json(encoded) == letter


def test_1200kb_json_keeps_a_utf8_prefix_on_a_character_boundary() -> None:
    data = big_json(1_200_000)
    letter = DeadLetter.of(data, "record too large", "alerts")

    assert letter.truncated is True and letter.raw_encoding == "utf-8"
    kept = kept_bytes(letter)
    assert DEADLETTER_MAX_RAW_BYTES - 3 <= len(kept) <= DEADLETTER_MAX_RAW_BYTES
    assert data.startswith(kept)
    assert_describes(letter, data)
    encoded = letter.to_json()
    assert len(encoded) < 200_000  # JSON escaping of the quotes adds a little
    assert DeadLetter.model_validate_json(encoded) == letter
    # the same payload handed over as str gives the same letter
    same = DeadLetter.of(data.decode(), "record too large", "alerts")
    assert same.model_dump(exclude={"rejected_ts"}) == letter.model_dump(exclude={"rejected_ts"})


@pytest.mark.parametrize("raw", [
    b'{"type":"quote","bid":1}',
    "crossed quote, prix 20 000 € 😀",
    b"kraken,BTC-USD,2023-03-11T04:00:01Z,20005,20004,1,1",
    b"",
])
def test_small_payloads_are_kept_byte_exact(raw: bytes | str) -> None:
    letter = DeadLetter.of(raw, "why", "replay")
    original = raw.encode() if isinstance(raw, str) else raw
    assert letter.truncated is False and letter.raw_encoding == "utf-8"
    assert letter.raw == (raw if isinstance(raw, str) else raw.decode())
    assert_describes(letter, original)


def test_small_binary_payload_is_whole_base64() -> None:
    data = b"\xff\xfe\x00binary\x80"
    letter = DeadLetter.of(data, "why", "producer")
    assert letter.truncated is False and letter.raw_encoding == "base64"
    assert kept_bytes(letter) == data
    assert_describes(letter, data)


def test_cap_is_exact_in_bytes() -> None:
    at_cap = b"x" * 100
    assert DeadLetter.of(at_cap, "r", "s", max_raw_bytes=100).truncated is False
    over = DeadLetter.of(at_cap + b"y", "r", "s", max_raw_bytes=100)
    assert over.truncated is True and over.raw == "x" * 100 and over.raw_length == 101
    binary = b"\xff" * 101
    cut = DeadLetter.of(binary, "r", "s", max_raw_bytes=100)
    assert cut.raw_encoding == "base64" and kept_bytes(cut) == b"\xff" * 100
    with pytest.raises(ValueError, match="max_raw_bytes"):
        DeadLetter.of(at_cap, "r", "s", max_raw_bytes=-1)


@pytest.mark.parametrize(("text", "cap", "kept"), [
    ("a€€€€", 10, "a€€€"),  # the cut falls on the lead byte of the 4th €: no back-off
    ("a€€€€", 9, "a€€"),    # 2 bytes into the 3rd € (3 bytes): back off to its start
    ("a€€€€", 8, "a€€"),    # 1 byte into it
    ("😀😀😀", 7, "😀"),     # 3 bytes into a 4-byte emoji
    ("😀😀😀", 3, ""),       # not even one character fits
    ("é" * 10, 5, "éé"),
])
def test_multibyte_utf8_is_cut_on_a_character_boundary(text: str, cap: int, kept: str) -> None:
    for raw in (text, text.encode()):
        letter = DeadLetter.of(raw, "r", "s", max_raw_bytes=cap)
        assert letter.truncated is True and letter.raw_encoding == "utf-8"
        assert letter.raw == kept
        assert_describes(letter, text.encode())


def test_invalid_utf8_after_the_cap_keeps_the_text_prefix() -> None:
    data = b"a" * 100 + b"\xff"  # only the cut-off part is invalid UTF-8
    letter = DeadLetter.of(data, "r", "s", max_raw_bytes=50)
    assert letter.raw_encoding == "utf-8" and letter.raw == "a" * 50 and letter.truncated
    assert_describes(letter, data)


def test_sha256_is_of_the_whole_original_payload() -> None:
    for raw in (random_bytes(200_000, seed=1), big_json(300_000), "naïve ☃", b"\x00"):
        original = raw.encode() if isinstance(raw, str) else raw
        letter = DeadLetter.of(raw, "r", "s")
        assert letter.raw_sha256 == hashlib.sha256(original).hexdigest()
        assert letter.raw_length == len(original)


def test_reason_is_capped_at_1000_characters() -> None:
    letter = DeadLetter.of(b"{}", "x" * 5000, "stream")
    assert len(letter.reason) == DeadLetter.MAX_REASON_CHARS == 1000
    assert letter.reason.endswith("…") and letter.reason.startswith("x" * 999)
    assert DeadLetter.of(b"{}", "y" * 1000, "stream").reason == "y" * 1000


def test_letters_without_the_new_fields_still_parse() -> None:
    old = (b'{"schema_version":1,"type":"deadletter","stage":"stream","reason":"r",'
           b'"source_topic":"t","source_partition":0,"source_offset":3,"raw":"x",'
           b'"raw_encoding":"utf-8","rejected_ts":1678507205000}')
    letter = DeadLetter.model_validate_json(old)
    assert (letter.raw_length, letter.raw_sha256, letter.truncated) == (None, None, False)


def test_huge_payload_letters_fit_in_one_kafka_message(settings: Settings) -> None:
    """Real broker, default producer limits: capped letters go through, an uncapped one of
    the same payload is refused by librdkafka as too large."""
    topic = f"test.deadletter.{uuid.uuid4().hex[:8]}"
    admin = AdminClient(settings.kafka_client_config())
    for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        future.result(15)
    payloads = [random_bytes(800_000), big_json(1_200_000)]
    letters = [DeadLetter.of(p, "too big to validate", "stream") for p in payloads]

    producer = Producer(settings.kafka_client_config())
    errors: list[str] = []
    for letter in letters:
        assert len(letter.to_json()) < KAFKA_DEFAULT_MAX_BYTES // 5
        producer.produce(topic, letter.to_json(),
                         on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
    assert producer.flush(15) == 0 and errors == []
    uncapped = DeadLetter.of(payloads[0], "r", "stream", max_raw_bytes=len(payloads[0]))
    assert not uncapped.truncated
    with pytest.raises(KafkaException, match="MSG_SIZE_TOO_LARGE"):
        producer.produce(topic, uncapped.to_json())

    got = [DeadLetter.model_validate_json(m.value()) for m in consume(settings, topic)]
    assert got == letters
    for letter, payload in zip(got, payloads, strict=True):
        assert payload.startswith(kept_bytes(letter))
        assert letter.raw_sha256 == hashlib.sha256(payload).hexdigest()
