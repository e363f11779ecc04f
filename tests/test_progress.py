"""Progress lines where stderr is not a terminal: throttled by time, with the time left (a fake clock, no sleeps)."""

from __future__ import annotations

import io

import pytest

from distillens_trainer.progress import ProgressLines, format_duration, is_terminal, progress, track


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _lines(total: int = 100, every_s: float = 30.0) -> tuple[ProgressLines, FakeClock, list[str]]:
    clock, lines = FakeClock(), []
    return (
        ProgressLines(total, "caching", unit="rows", every_s=every_s, emit=lines.append, clock=clock),
        clock,
        lines,
    )


def test_a_line_comes_once_the_interval_has_passed_and_not_before():
    bar, clock, lines = _lines()
    for _ in range(10):  # 10 rows in 29 s: no line yet
        clock.now += 2.9
        bar.update()
    assert lines == []
    clock.now += 1.0  # 30 s since the start
    bar.update()
    assert len(lines) == 1
    clock.now += 29.0  # 29 s since that line
    bar.update()
    assert len(lines) == 1
    clock.now += 1.0
    bar.update()
    assert len(lines) == 2


def test_the_line_says_the_count_the_rate_and_the_time_left_from_the_rate_so_far():
    bar, clock, lines = _lines(total=100)
    clock.now += 40.0
    bar.update(20)  # 20 rows in 40 s: 0.5 rows/s, 80 rows left -> 160 s
    bar.set_postfix_str("loss 1.2345")
    clock.now += 0.0
    assert lines == ["caching: 20/100 rows (20%), 0.5 rows/s, 40 s elapsed, about 2 min 40 s left"]
    clock.now += 40.0
    bar.update(20)  # 40 rows in 80 s: the same rate, 120 s left
    assert (
        lines[-1]
        == "caching: 40/100 rows (40%), 0.5 rows/s, 1 min 20 s elapsed, about 2 min 00 s left, loss 1.2345"
    )


def test_the_last_unit_says_how_long_it_took_once_even_within_the_interval():
    bar, clock, lines = _lines(total=3)
    for _ in range(3):
        clock.now += 1.0
        bar.update()
    bar.close()
    bar.close()
    assert lines == ["caching: 3/3 rows done in 3 s"]


def test_an_interrupted_phase_says_nothing_on_close():
    bar, clock, lines = _lines(total=10)
    clock.now += 5.0
    bar.update(4)
    bar.close()
    assert lines == []


def test_a_line_before_any_unit_is_done_has_no_estimate():
    bar, clock, _ = _lines()
    clock.now += 31.0
    assert bar.line(clock()) == "caching: 0/100 rows (0%), 31 s elapsed, no estimate yet"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0 s"), (59.4, "59 s"), (61, "1 min 01 s"), (3599, "59 min 59 s"), (7620, "2 h 07 min")],
)
def test_durations_read_in_seconds_minutes_or_hours(seconds, text):
    assert format_duration(seconds) == text


def test_without_a_terminal_progress_is_lines_and_track_counts_what_each_item_holds(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not is_terminal()
    assert isinstance(progress(5, "x"), ProgressLines)
    batches = [[1, 2], [3, 4], [5]]
    assert list(track(batches, 5, "generating", size=len, unit="prompts")) == batches
    assert "generating: 5/5 prompts done in" in __import__("sys").stderr.getvalue()
    assert not isinstance(progress(5, "x", enabled=False), ProgressLines)  # disabled: a silent bar
