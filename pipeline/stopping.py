"""SIGTERM and SIGINT (`ray job stop`, Ctrl-C) as a request to stop a run:
job.run() then writes what it has received, records `stopped` and raises
job.JobStopped."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class Stopped(KeyboardInterrupt):
    """Raised in the driver's main thread by StopRequest while it waits for results."""


class StopRequest:
    """SIGTERM and SIGINT (`ray job stop`, Ctrl-C) as a request to stop a run.

    `install()` makes it the handler of both. A signal that comes while run()
    waits for results (inside `waiting()`) raises Stopped there; one that comes
    while the driver writes a part or its record only marks the request, and the
    run stops at its next wait. Either way run() then writes the rows it has
    received, records `stopped` and raises JobStopped. A second signal is
    handled as it was before install(): a second Ctrl-C or SIGTERM ends the
    process at once, its record left `running`."""

    def __init__(self):
        self.signum: int | None = None
        self._waiting = False
        self._previous: dict[int, Any] = {}

    def install(self) -> StopRequest:
        for s in (signal.SIGTERM, signal.SIGINT):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        """The handlers as they were before install()."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        self.signum = signum
        self.restore()  # the next signal is not ours to soften
        if self._waiting:
            raise Stopped(signal.Signals(signum).name)

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Around a wait that a stop request may cut short."""
        if self.signum is not None:
            raise Stopped(signal.Signals(self.signum).name)
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False
