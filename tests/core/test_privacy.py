"""Identifier tokens (HMAC-SHA256 recomputed here with the standard library), the key's
configuration, the Laplace mechanism's distribution (Kolmogorov-Smirnov against scipy's
Laplace), and a scan of the exports the CLI produces for raw identifiers."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydantic import SecretStr, ValidationError
from pymongo import MongoClient
from scipy import stats
from typer.testing import CliRunner

from arbstream.config import Settings, get_settings
from arbstream.privacy import (
    REDACTED,
    IdHashKeyMissing,
    laplace_mechanism,
    token,
    tokenize_rows,
)

KEY = "k" * 16 + "0123456789abcdef"  # 32 bytes
OTHER_KEY = "z" * 40


def _expected(value: str, key: str) -> str:
    return "h1:" + hmac.new(key.encode(), value.encode(), hashlib.sha256).hexdigest()


def test_token_is_keyed_hmac_sha256() -> None:
    assert token("123456789", SecretStr(KEY)) == _expected("123456789", KEY)
    assert token(123456789, KEY.encode()) == _expected("123456789", KEY)
    assert token(np.int64(123456789), KEY.encode()) == _expected("123456789", KEY)
    assert token("ops@example.com", SecretStr(KEY)) == _expected("ops@example.com", KEY)
    assert token("123456789", SecretStr(OTHER_KEY)) != token("123456789", SecretStr(KEY))
    assert token("123456780", SecretStr(KEY)) != token("123456789", SecretStr(KEY))
    with pytest.raises(ValueError, match="at least 32 bytes, got 8") as info:
        token("1", SecretStr("short-k!"))
    assert "short-k!" not in str(info.value)
    with pytest.raises(TypeError):
        token(1.5, SecretStr(KEY))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        token("", SecretStr(KEY))


def test_tokenize_rows() -> None:
    rows = [{
        "trade_id": "987654321", "price": 20_000.5, "symbol": "BTC-USD", "order_id": None,
        "recipients": ["ops@example.com", "desk@fund.example.org"],
        "refused": [{"recipient": "desk@fund.example.org", "reply": "550 no such user"}],
        "error": "SMTP 550 for ops@example.com: mailbox unavailable",
        "nested": {"user_id": 42},
    }]
    key = SecretStr(KEY)
    (out,) = tokenize_rows(rows, key)
    assert out["trade_id"] == _expected("987654321", KEY) and out["order_id"] is None
    assert out["recipients"] == [_expected("ops@example.com", KEY),
                                 _expected("desk@fund.example.org", KEY)]
    assert out["refused"][0] == {"recipient": _expected("desk@fund.example.org", KEY),
                                 "reply": "550 no such user"}
    assert out["error"] == f"SMTP 550 for {_expected('ops@example.com', KEY)}: mailbox " \
                           "unavailable"
    assert out["nested"] == {"user_id": _expected("42", KEY)}
    assert (out["price"], out["symbol"]) == (20_000.5, "BTC-USD")
    assert rows[0]["trade_id"] == "987654321"  # copies, the input is unchanged
    assert tokenize_rows([out], key) == [out]  # tokens are not tokenized again
    # without a key: refused, or redacted when asked; rows without identifiers pass
    with pytest.raises(IdHashKeyMissing, match="ARB_ID_HASH_KEY"):
        tokenize_rows(rows, None)
    (red,) = tokenize_rows(rows, None, redact=True)
    assert red["recipients"] == [REDACTED, REDACTED] and "ops@example.com" not in str(red)
    plain = [{"opportunity_id": "BTC-USD|2023-03-11T04:10:00.000Z|binance|kraken", "net": 1.0}]
    assert tokenize_rows(plain, None) == plain


def test_key_from_environment_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("ARB_"):
            monkeypatch.delenv(name)
    assert Settings().id_hash_key is None and Settings().dp_enabled is False
    monkeypatch.setenv("ARB_ID_HASH_KEY", KEY)
    assert Settings().id_hash_key.get_secret_value() == KEY
    assert KEY not in repr(Settings()) and KEY not in str(Settings().model_dump())
    secret = tmp_path / "id_hash_key"
    secret.write_text(OTHER_KEY + "\n")
    monkeypatch.setenv("ARB_ID_HASH_KEY_FILE", str(secret))
    with pytest.raises(ValidationError, match="not both"):
        Settings()
    monkeypatch.delenv("ARB_ID_HASH_KEY")
    assert Settings().id_hash_key.get_secret_value() == OTHER_KEY
    secret.write_text("too-short-secret")
    with pytest.raises(ValidationError) as info:
        Settings()
    assert "too-short-secret" not in str(info.value) and "at least 32 bytes" in str(info.value)
    monkeypatch.delenv("ARB_ID_HASH_KEY_FILE")
    monkeypatch.setenv("ARB_DP_EPSILON_TOTAL", "0")
    with pytest.raises(ValidationError, match="dp_epsilon_total"):
        Settings()


def _ks_pvalue(noise_scale: float, sensitivity: float, epsilon: float, true: float,
               n: int = 10_000) -> tuple[float, np.ndarray]:
    mech = laplace_mechanism(sensitivity, epsilon)
    draws = np.array([mech(true) for _ in range(n)]) - true
    return stats.kstest(draws, "laplace", args=(0, noise_scale)).pvalue, draws


def test_laplace_noise_passes_kolmogorov_smirnov() -> None:
    """10,000 releases of a count minus the count against Laplace(0, Δ/ε) at α = 0.01.

    OpenDP draws from the OS's secure generator and cannot be seeded (by design), so one
    sample rejects a correct mechanism in 1 % of runs; the test fails only if a second,
    independent sample rejects too (false failure 1e-4 a run). The same draws must reject
    the wrong scales Δ/(2ε) and 2Δ/ε, so the test can fail."""
    sensitivity, epsilon, true = 2.0, 0.5, 137.0
    scale = sensitivity / epsilon
    p, draws = _ks_pvalue(scale, sensitivity, epsilon, true)
    if p <= 0.01:
        p, draws = _ks_pvalue(scale, sensitivity, epsilon, true)
    assert p > 0.01
    for wrong in (scale / 2, scale * 2):
        assert stats.kstest(draws, "laplace", args=(0, wrong)).pvalue < 1e-6
    assert laplace_mechanism(sensitivity, epsilon).scale == scale
    with pytest.raises(ValueError, match="epsilon must be"):
        laplace_mechanism(1.0, float("inf"))


# --- the exports ---------------------------------------------------------------------------

ADDRESSES = ("alice.trader@fund.example.com", "desk-7@hedge.example.org")


@pytest.fixture
def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
            request: pytest.FixtureRequest) -> Iterator[Settings]:
    """The session stack as ``ARB_*`` variables, a fresh database, an id hash key."""
    for name in list(os.environ):
        if name.startswith("ARB_"):
            monkeypatch.delenv(name)
    db = "t_priv_" + re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    for name, value in {
        "ARB_MONGO_URI": settings.mongo_uri.get_secret_value(), "ARB_MONGO_DB": db,
        "ARB_STATE_DIR": str(settings.state_dir), "ARB_DATA_DIR": str(settings.data_dir),
        "ARB_ID_HASH_KEY": KEY, "ARB_DP_ENABLED": "true", "ARB_DP_EPSILON_TOTAL": "1.0",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.chdir(tmp_path)
    with MongoClient(settings.mongo_uri.get_secret_value()) as client:
        client.drop_database(db)
    get_settings.cache_clear()
    yield settings.model_copy(update={"mongo_db": db})
    get_settings.cache_clear()


def _seed_alert_log(conf: Settings) -> None:
    """Decisions as the worker logs them: sent with recipients, failed with the SMTP
    error naming a refused address, two rules."""
    from arbstream.store.config import MongoConfig
    from arbstream.store.mongo.alert_log import AlertStore

    with AlertStore(MongoConfig.of(conf)) as store:
        for i in range(5):
            ctx = {"key": f"big-moves|ep{i}", "rule": "big-moves", "episode_id": f"ep{i}",
                   "net_bps": 50.0 + i}
            store.record("sent", "delivered", ctx, recipients=list(ADDRESSES),
                         refused=[{"recipient": ADDRESSES[1], "reply": "550 unknown"}],
                         message_id=f"<m{i}@arbstream.local>")
        ctx = {"key": "usdc|ep9", "rule": "usdc", "episode_id": "ep9", "net_bps": 80.0}
        store.record("failed", "permanent", ctx, recipients=[ADDRESSES[0]],
                     error=f"550 5.1.1 <{ADDRESSES[0]}>: recipient rejected")


def _invoke(*args: str) -> str:
    from arbstream.shell.cli import app

    get_settings.cache_clear()
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_exports_hold_no_raw_identifier(cli_env: Settings) -> None:
    """Every export command, run against a store holding identifiers, prints none of them
    raw: the alert log as tokens (table and JSON); opportunity and privacy outputs hold
    none."""
    from datetime import UTC, datetime

    from arbstream.store.config import MongoConfig
    from arbstream.store.mongo.opportunities import upsert_opportunities

    _seed_alert_log(cli_env)
    upsert_opportunities(MongoConfig.of(cli_env), [{
        "opportunity_id": "BTC-USD|2023-03-11T04:10:00.000Z|binance|kraken",
        "symbol": "BTC-USD", "sell_symbol": "BTC-USD", "buy_exchange": "binance",
        "sell_exchange": "kraken", "window_end": datetime(2023, 3, 11, 4, 10, tzinfo=UTC),
        "net_bps": 12.5, "gross_bps": 30.0, "episode_id": "ep1",
    }])
    outputs = {
        "alerts log --json": _invoke("alerts", "log", "--limit", "0", "--json"),
        "alerts log": _invoke("alerts", "log", "--limit", "0"),
        "opportunities json": _invoke("opportunities", "list", "--format", "json"),
        "opportunities csv": _invoke("opportunities", "list", "--format", "csv"),
        "privacy release": _invoke("privacy", "release", "alert-decisions", "--epsilon",
                                   "0.5", "--decision", "sent"),
        "privacy budget": _invoke("privacy", "budget"),
    }
    for name, text in outputs.items():
        for address in ADDRESSES:
            assert address not in text, name
            assert address.split("@")[0] not in text, name
    docs = _json_documents(outputs["alerts log --json"])
    sent = [d for d in docs if d["decision"] == "sent"]
    assert len(sent) == 5 and all(
        d["recipients"] == [_expected(a, KEY) for a in ADDRESSES] for d in sent)
    (failed,) = [d for d in docs if d["decision"] == "failed"]
    assert _expected(ADDRESSES[0], KEY) in failed["error"]
    assert "alert_decisions:sent" in outputs["privacy release"]
    assert "spent 0.5 of 1" in outputs["privacy release"]
    assert re.search(r"total ε 1, spent 0\.5, remaining 0\.5, 1 release", flat(
        outputs["privacy budget"]))


def _json_documents(text: str) -> list[dict]:
    """The consecutive (pretty-printed) JSON documents of ``text``."""
    decoder, docs, at = json.JSONDecoder(), [], 0
    while (at := text.find("{", at)) >= 0:
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    return docs


def flat(text: str) -> str:
    return " ".join(text.split())


def test_release_refused_when_budget_spent(cli_env: Settings) -> None:
    """The CLI refuses (exit 1, nothing printed as released) once the budget is spent."""
    from arbstream.shell.cli import app

    _seed_alert_log(cli_env)
    _invoke("privacy", "release", "alert-decisions", "--epsilon", "0.75")
    get_settings.cache_clear()
    result = CliRunner().invoke(app, ["privacy", "release", "alert-decisions",
                                      "--epsilon", "0.5", "--per-rule-cap", "2"])
    assert result.exit_code == 1
    assert "exhausted" in flat(result.output) and "Nothing was released" in flat(result.output)
