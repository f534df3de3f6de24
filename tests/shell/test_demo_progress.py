"""``arbstream demo``'s drain progress line (pure: times are given)."""

from __future__ import annotations

from arbstream.shell.demo import DrainProgress


def test_progress_counts_rate_and_the_closing_phase() -> None:
    shown = DrainProgress(idle_timeout_s=5)
    shown.start = 100.0
    assert shown.text(10_000, False, 100.0) == "0 of 10,000 records read (0/s), 10,000 to go"
    assert shown.text(6_000, False, 104.0) == (
        "4,000 of 10,000 records read (1,000/s), 6,000 to go, about 6 s left")
    assert shown.text(0, True, 110.0) == (
        "all 10,000 records read in 10 s; closing the last windows (idle timer 5 s, 0 s so far)")
    assert shown.text(0, True, 113.0).endswith("(idle timer 5 s, 3 s so far)")


def test_progress_prints_a_line_per_interval_off_a_terminal(capsys) -> None:  # noqa: ANN001
    shown = DrainProgress(idle_timeout_s=5, every_s=3600)
    for left in (30, 20, 10):
        shown.update(left, False)  # the first line, then quiet within the interval
    shown.update(0, True)  # a change of phase is always shown
    lines = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 2, lines
    assert lines[0].startswith("0 of 30 records read")
    assert lines[1].startswith("all 30 records read")
