"""Progress display that suits where the output goes.

On a terminal a tqdm bar redraws in place. When stderr is a file or a pipe (Slurm, nohup,
CI) a redrawn bar would write thousands of lines, so a short log line is written instead,
at most every ``every_s`` seconds and once at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from tqdm import tqdm


def stderr_is_terminal() -> bool:
    """True when progress bars can redraw in place."""
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


class Progress:
    """Iterate ``iterable`` showing progress: a tqdm bar on a terminal, periodic log lines elsewhere."""

    def __init__(
        self,
        iterable: Iterable[Any],
        desc: str,
        log: Callable[..., None],
        total: int | None = None,
        enabled: bool = True,
        every_s: float = 60.0,
        terminal: bool | None = None,
    ) -> None:
        self.iterable = iterable
        self.desc = desc
        self.log = log
        self.total = total if total is not None else _length(iterable)
        self.every_s = every_s
        self.postfix: dict[str, Any] = {}
        terminal = stderr_is_terminal() if terminal is None else terminal
        self.bar = (
            tqdm(iterable, desc=desc, total=self.total, leave=False, dynamic_ncols=True)
            if enabled and terminal
            else None
        )
        self.lines = enabled and not terminal

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the count (the bar's postfix, or appended to the log line)."""
        self.postfix = values
        if self.bar is not None:
            self.bar.set_postfix(**values)

    def __iter__(self) -> Iterator[Any]:
        if self.bar is not None:
            yield from self.bar
            return
        start = last = time.monotonic()
        done = 0
        for item in self.iterable:
            yield item
            done += 1
            now = time.monotonic()
            if self.lines and now - last >= self.every_s:
                last = now
                self._line(done, now - start)
        if self.lines and done:
            self._line(done, time.monotonic() - start)

    def _line(self, done: int, elapsed: float) -> None:
        of = f"/{self.total}" if self.total else ""
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        self.log("%s: %d%s in %.0f s%s", self.desc, done, of, elapsed, extra)


def _length(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None
