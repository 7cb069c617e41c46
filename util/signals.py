"""Graceful stops: SIGTERM (what cluster schedulers send) and a first Ctrl-C request a stop.

The training loop polls :attr:`StopRequest.signal` at step boundaries, saves a checkpoint
and exits; a second Ctrl-C interrupts at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class TrainingInterruptedError(Exception):
    """Raised after a requested stop has been honoured (checkpoint saved when training)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell convention 128 + signal number (143 for SIGTERM, 130 for SIGINT)."""
        return 128 + self.signum


class StopRequest:
    """Context manager that turns SIGTERM / the first SIGINT into a flag instead of an exit."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        """``SIGTERM`` / ``SIGINT`` for messages."""
        return signal.Signals(self.signal).name if self.signal is not None else ""
