"""A one-line progress display for the long commands (report, conformance, bench).

It writes to stderr, and only when stderr is a terminal: piped or redirected
output, CI logs and captured test output stay free of it.
"""

from __future__ import annotations

import shutil
import sys
import time

__all__ = ["Progress"]


class Progress:
    """``[done/total] what is running`` on one line, redrawn in place.

    ``enabled`` defaults to whether ``stream`` is a terminal.  Redraws are
    limited to ten a second so that short steps cost nothing.
    """

    def __init__(self, total: int, title: str, *, stream=None, enabled: bool | None = None) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = _isatty(self.stream) if enabled is None else enabled
        self.total, self.title, self.done = total, title, 0
        self._drawn = 0.0
        self._width = 0

    def step(self, text: str = "") -> None:
        """One unit of work is starting (``text`` says which)."""
        self.done += 1
        now = time.monotonic()
        if not self.enabled or (now - self._drawn < 0.1 and self.done < self.total):
            return
        self._drawn = now
        columns = shutil.get_terminal_size((100, 20)).columns - 1
        line = f"{self.title} [{self.done}/{self.total}] {text}"[:columns]
        self.stream.write("\r" + line.ljust(self._width))
        self.stream.flush()
        self._width = len(line)

    def note(self, line: str) -> None:
        """A line that stays (e.g. a finished target's summary), on a terminal only."""
        if self.enabled:
            self.clear()
            self.stream.write(line + "\n")
            self.stream.flush()

    def clear(self) -> None:
        if self.enabled and self._width:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._width = 0

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.clear()


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False
