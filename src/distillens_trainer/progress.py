"""Progress of a long phase: tqdm's bar on a terminal, and where stderr is not one (a log file, CI, a notebook, a
pipe) a line at most every ~30 s with the count, the rate and the time left estimated from the rate so far.

:func:`progress` picks one of the two; both take ``update(n)``, ``set_postfix_str(text)`` and ``close()``.
:class:`ProgressLines` reads the time through an injectable clock, so its throttle is tested without sleeping.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TextIO, TypeVar

PROGRESS_EVERY_S = (
    30.0  # at most one line per this many seconds (a line at least this often while work goes on)
)

Item = TypeVar("Item")


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``2 h 07 min``: a duration for people, to the second below an hour."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _print_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class ProgressLines:
    """Progress lines for output that is not a terminal: one when at least ``every_s`` seconds have passed since the
    start or the last line, and one when the count reaches ``total`` (the time it took), each through ``emit``.

    ``update(n)`` counts ``n`` more units done; ``set_postfix_str`` adds a note (e.g. the loss) to the next lines.
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        unit: str = "steps",
        every_s: float = PROGRESS_EVERY_S,
        emit: Callable[[str], None] = _print_to_stderr,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.description = description
        self.unit = unit
        self.every_s = every_s
        self.emit = emit
        self.clock = clock
        self.done = 0
        self.postfix = ""
        self.start = self.last_line = clock()
        self.finished = False

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; emit a line when the count is complete or ``every_s`` has passed."""
        self.done += n
        now = self.clock()
        if self.total and self.done >= self.total:
            self._finish(now)
        elif now - self.last_line >= self.every_s:
            self.emit(self.line(now))
            self.last_line = now

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        """The last line, if the count reached ``total`` and it was not said yet (an interrupted phase says
        nothing more)."""
        if self.total and self.done >= self.total:
            self._finish(self.clock())

    def line(self, now: float) -> str:
        """``description: done/total unit (p%), rate, elapsed, about T left[, postfix]``."""
        elapsed = now - self.start
        parts = [f"{self.description}: {self.done}/{self.total} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.done // self.total}%)"
        if self.done > 0 and elapsed > 0:
            rate = self.done / elapsed
            parts.append(f"{rate:.3g} {self.unit}/s")
            parts.append(f"{format_duration(elapsed)} elapsed")
            if self.total:
                parts.append(f"about {format_duration((self.total - self.done) / rate)} left")
        else:
            parts.append(f"{format_duration(elapsed)} elapsed, no estimate yet")
        if self.postfix:
            parts.append(self.postfix)
        return ", ".join(parts)

    def _finish(self, now: float) -> None:
        if self.finished:
            return
        self.finished = True
        note = f", {self.postfix}" if self.postfix else ""
        self.emit(
            f"{self.description}: {self.done}/{self.total} {self.unit} done in {format_duration(now - self.start)}{note}"
        )


def is_terminal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (default: stderr, where bars and lines go) is a terminal, where a bar redraws in place."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except (ValueError, OSError):  # a closed or detached stream
        return False


def progress(
    total: int,
    description: str,
    *,
    unit: str = "steps",
    enabled: bool = True,
    emit: Callable[[str], None] = _print_to_stderr,
) -> Any:
    """A tqdm bar on a terminal, else :class:`ProgressLines`; a disabled bar when not ``enabled`` (both take
    ``update``, ``set_postfix_str`` and ``close``)."""
    if enabled and not is_terminal():
        return ProgressLines(total, description, unit=unit, emit=emit)
    # the console bar: tqdm.auto would want ipywidgets in a notebook (which is no terminal anyway)
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit.rstrip("s") or unit, disable=not enabled)


def track(
    items: Iterable[Item],
    total: int,
    description: str,
    *,
    size: Callable[[Item], int] = lambda item: 1,
    unit: str = "steps",
    enabled: bool = True,
) -> Iterator[Item]:
    """Yield ``items``, counting ``size(item)`` units after each one has been handled, through :func:`progress`."""
    bar = progress(total, description, unit=unit, enabled=enabled)
    try:
        for item in items:
            yield item
            bar.update(size(item))
    finally:
        bar.close()
