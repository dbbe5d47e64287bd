"""Progress bars that suit where the output goes: redrawn in place on a terminal, a few plain lines in a log.

tqdm redraws a bar by rewriting its line, which a terminal shows as one moving line but a file or CI log keeps
as text: a demo run written to a file held 24,000 lines, most of them redraws. So when standard error is not a
terminal, ``progress_bar`` hands out a bar that writes whole lines only: one every ``LOG_INTERVAL_S`` seconds
while it runs, and one when it ends (unless it was opened with ``leave=False``, as the per-epoch bars of the
training loop are, which print their own summary line).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

#: Seconds between two lines of a running bar in a log.
LOG_INTERVAL_S = 60.0


class _LogProgress:
    """The part of tqdm's interface the project uses, writing complete lines to standard error."""

    def __init__(self, iterable: Iterable[Any] | None = None, *, desc: str | None = None, total: int | None = None,
                 unit: str = "it", leave: bool = True, disable: bool = False) -> None:
        self.iterable = iterable
        self.desc = desc or "progress"
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.unit = unit
        self.leave = leave
        self.disable = disable
        self.n = 0
        self.postfix = ""
        self._started = self._last_line = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("this progress bar was created without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._last_line >= LOG_INTERVAL_S:
            self._last_line = now
            self._write()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if not self._closed and self.leave:
            self._write()
        self._closed = True

    def _write(self) -> None:
        if self.disable:
            return
        elapsed = time.monotonic() - self._started
        done = f"{self.n:,}/{self.total:,}" if self.total else f"{self.n:,}"
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        rate = f", {self.n / elapsed:.1f} {self.unit}/s" if elapsed > 0 else ""
        postfix = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done} {self.unit}{share} in {elapsed:.0f}s{rate}{postfix}", file=sys.stderr, flush=True)


def _length(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _on_terminal() -> bool:
    return sys.stderr.isatty()


def progress_bar(iterable: Iterable[Any] | None = None, *, desc: str | None = None, total: int | None = None,
             unit: str = "it", leave: bool = True, disable: bool = False) -> Any:
    """A progress bar over ``iterable`` (or updated by hand): tqdm on a terminal, plain lines in a log."""
    if _on_terminal():
        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable)
    return _LogProgress(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=disable)


def write(message: str) -> None:
    """Print a line to standard output without breaking a bar being drawn on the terminal."""
    if _on_terminal():
        tqdm.write(message)
    else:
        print(message, flush=True)
