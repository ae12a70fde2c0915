"""Turn SIGTERM/SIGINT (Slurm preemption, Ctrl-C) into a request to checkpoint and stop.

The handler only records the signal; the training loop notices it at the next step, shares
it with every rank through the per-step all-reduce, saves, and raises `Preempted`.
"""

from __future__ import annotations

import signal
from types import FrameType


class Preempted(Exception):
    """Training stopped on a signal after saving a checkpoint; rerunning the command resumes."""

    def __init__(self, signum: int, step: int):
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}; a checkpoint was saved. "
            "Rerun the same command to resume."
        )
        self.signum, self.step = signum, step

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopSignals:
    """Context manager recording SIGTERM/SIGINT instead of dying; restores the old handlers."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.received = signum

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals to the caller
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]  # what signal.getsignal returned
