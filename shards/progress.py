"""Progress of a long command: a tqdm bar on a terminal; where stderr is a file or a pipe (a cluster
job's log), plain lines instead, one every ``PLAIN_EVERY_S`` seconds and one at the end, with no
carriage returns. The converters and ``verify`` use it; the trainer follows the same rule.
"""

from __future__ import annotations

import sys
import time
from types import TracebackType

from tqdm import tqdm

PLAIN_EVERY_S = 30.0


def on_terminal() -> bool:
    """Whether stderr (where progress goes) is a terminal."""
    return sys.stderr.isatty()


class Progress:
    """``update(n)`` as items finish; ``close()`` at the end (or use it as a context manager).
    ``enabled`` False shows nothing at all."""

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        initial: int = 0,
        enabled: bool = True,
        every_s: float = PLAIN_EVERY_S,
    ) -> None:
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.done = self.initial = initial
        self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc) if enabled and on_terminal() else None
        self.plain = enabled and self.bar is None
        self.started = self.last_line = time.monotonic()
        self.closed = False

    def update(self, count: int = 1) -> None:
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif self.plain and time.monotonic() - self.last_line >= self.every_s:
            self._line()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.plain:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self.last_line = now
        percent = 100.0 * self.done / self.total if self.total else 100.0
        rate = (self.done - self.initial) / max(now - self.started, 1e-9)
        print(
            f"{self.desc}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), {rate:.1f} {self.unit}/s",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
