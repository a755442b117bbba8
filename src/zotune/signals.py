"""Stopping a run cleanly: SIGINT and SIGTERM let the step in progress finish and be saved."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

from .errors import TrainingError


class RunInterrupted(TrainingError):
    """SIGINT or SIGTERM arrived; the step in progress finished and was checkpointed."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number


@contextmanager
def stop_requests():
    """Within the block, SIGINT and SIGTERM set ``requested[0]`` instead of killing the process, so the loop
    can finish its step and save it. Outside the main thread (where handlers cannot be set) a no-op."""
    requested: list[int | None] = [None]
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number in previous:
        signal.signal(number, lambda received, _frame: requested.__setitem__(0, received))
    try:
        yield requested
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
