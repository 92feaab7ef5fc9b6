"""Progress display: a tqdm bar that renders on any terminal, plain timed lines (no carriage returns) in logs.

A terminal that reports a width of 0 columns (a fresh pseudo-terminal: ``docker exec -t``,
``script``, Python's ``pty``) made tqdm draw an empty bar, so only carriage returns reached the
screen; :func:`terminal_bar` takes the size from ``$COLUMNS``/``$LINES`` or 80 x 24 then. Off a terminal
:class:`Progress` prints one plain line at most every ``every_s`` seconds and one at the end.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Optional, TextIO


def is_terminal(stream: Optional[TextIO] = None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def _reported_columns(stream: TextIO) -> int:
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def terminal_bar(stream: Optional[TextIO] = None, **tqdm_kwargs):
    """A tqdm bar on ``stream`` (stderr) that draws even where the terminal reports no width."""
    from tqdm import tqdm

    stream = sys.stderr if stream is None else stream
    if _reported_columns(stream) > 0:  # follows resizes
        return tqdm(file=stream, dynamic_ncols=True, **tqdm_kwargs)
    size = shutil.get_terminal_size((80, 24))  # tqdm would take 0 x 0 and draw nothing
    return tqdm(file=stream, ncols=size.columns, nrows=size.lines, **tqdm_kwargs)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """``with Progress(total, desc, unit) as p: p.update(n)``: a bar on a terminal, else a plain
    ``desc: n/total unit (pct%) elapsed, rate`` line every ``every_s`` seconds (and at the end
    when there was one); ``enabled=False`` shows nothing."""

    def __init__(self, total: Optional[int], desc: str, unit: str = "it", *, enabled: bool = True,
                 stream: Optional[TextIO] = None, every_s: float = 10.0):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = sys.stderr if stream is None else stream
        self.n = 0
        self.postfix = ""
        self.start = self._last = time.monotonic()
        self._bar = None
        self._lines = 0
        self.enabled = enabled
        if enabled and is_terminal(self.stream):
            self._bar = terminal_bar(self.stream, total=total, desc=desc, unit=unit)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.enabled and time.monotonic() - self._last >= self.every_s:
            self._line()
            self._lines += 1

    def set_postfix(self, **values) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())
        if self._bar is not None:
            self._bar.set_postfix(**values)

    def _line(self) -> None:
        now = time.monotonic()
        self._last = now
        elapsed = now - self.start
        done = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}{pct} {_clock(elapsed)}{rate}{extra}", file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self._lines:  # a long run: its last count too (a short one stays quiet)
            self._line()
        self.enabled = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
