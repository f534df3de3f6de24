"""The privacy-budget accountant on the session's real MongoDB-protocol server: sequential
composition until the budget is spent, refusal after, no overspending under concurrency,
nothing stored but noisy values."""

from __future__ import annotations

import threading

import pytest
from pymongo import MongoClient

from arbstream.store.config import MongoConfig
from arbstream.store.mongo import privacy_budget as pb
from arbstream.store.mongo.schema import PRIVACY_BUDGET


def _docs(conf: MongoConfig, kind: str) -> list[dict]:
    with MongoClient(conf.uri.get_secret_value()) as client:
        return list(client[conf.db][PRIVACY_BUDGET].find({"kind": kind}))


def test_spends_until_exhausted_then_refuses(msettings: MongoConfig) -> None:
    conf = pb.DpConfig(msettings, enabled=True, epsilon_total=1.0)
    assert pb.budget(conf) == pb.Budget("default", 1.0, 0.0, 1.0, 0, False)
    made = [pb.release_count(conf, "alert_decisions:sent", 40, 0.3) for _ in range(3)]
    assert [r.budget.spent for r in made] == pytest.approx([0.3, 0.6, 0.9], abs=1e-12)
    assert all(r.scale == pytest.approx(1 / 0.3) for r in made)
    with pytest.raises(pb.BudgetExhausted, match=r"0\.9 of 1 epsilon spent .* needs 0\.2"):
        pb.release_count(conf, "alert_decisions:sent", 40, 0.2)
    last = pb.release_count(conf, "alert_decisions:sent", 40, 0.1)  # exactly the rest
    assert last.budget == pb.Budget("default", 1.0, 1.0, 0.0, 4, True)
    with pytest.raises(pb.BudgetExhausted):
        pb.release_count(conf, "backtest_trades:bot1", 7, 1e-6)
    # every release logged with its noisy value, never the true one; refusals spent nothing
    logged = pb.releases(conf, limit=0)
    assert len(logged) == 4 and {d["state"] for d in logged} == {"released"}
    assert sorted(d["noisy_value"] for d in logged) == sorted(r.noisy_value for r in made
                                                                + [last])
    assert all(40 not in d.values() and "true_value" not in d for d in logged)
    assert _docs(msettings, "ledger")[0]["spent_units"] == pb.MICRO
    # another scope has its own budget
    assert pb.release_count(conf, "x", 1, 0.5, scope="2023-q2").budget.remaining == 0.5


def test_concurrent_spends_cannot_overspend(msettings: MongoConfig) -> None:
    conf = pb.DpConfig(msettings, enabled=True, epsilon_total=1.0)
    start = threading.Barrier(16)
    outcome: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        start.wait()
        try:
            pb.spend(conf, "alert_decisions", 0.1)
            result = "spent"
        except pb.BudgetExhausted:
            result = "refused"
        with lock:
            outcome.append(result)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcome) == ["refused"] * 6 + ["spent"] * 10
    (ledger,) = _docs(msettings, "ledger")
    assert ledger["spent_units"] == pb.MICRO and ledger["releases"] == 10
    assert len(_docs(msettings, "release")) == 10


def test_opt_in_and_fixed_total(msettings: MongoConfig) -> None:
    off = pb.DpConfig(msettings, enabled=False, epsilon_total=1.0)
    with pytest.raises(pb.DpDisabled, match="ARB_DP_ENABLED"):
        pb.release_count(off, "alert_decisions", 3, 0.5)
    assert _docs(msettings, "ledger") == []
    on = pb.DpConfig(msettings, enabled=True, epsilon_total=1.0)
    with pytest.raises(ValueError, match="count must be"):
        pb.release_count(on, "alert_decisions", -1, 0.5)
    with pytest.raises(ValueError, match="epsilon must be"):
        pb.release_count(on, "alert_decisions", 3, 0.0)
    assert _docs(msettings, "ledger") == []  # bad input spends nothing
    pb.release_count(on, "alert_decisions", 3, 0.5)
    raised = pb.DpConfig(msettings, enabled=True, epsilon_total=5.0)
    with pytest.raises(pb.BudgetMismatch, match="created with total epsilon 1"):
        pb.release_count(raised, "alert_decisions", 3, 0.5)
    with pytest.raises(pb.BudgetMismatch):
        pb.budget(raised)
