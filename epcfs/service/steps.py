"""Every model step the service takes goes through Stepper.run.

It is the one place where model work becomes time (the timing model), where OOM
verdicts become SIGKILLs, and where the reclaimers hear that something changed.
"""

from __future__ import annotations

from collections.abc import Callable

import trio

from ..host.tracker import ProcessTracker
from ..model.sgx import Sgx
from .timing import cost


class Stepper:
    def __init__(self, sgx: Sgx, tracker: ProcessTracker, scale: float) -> None:
        self.sgx = sgx
        self.tracker = tracker
        self.scale = scale
        self.listeners: list[Callable[[], None]] = []

    def settle(self) -> None:
        """After model state changed outside a timed step (e.g. a release)."""
        self.tracker.deliver_oom_kills()
        for listener in self.listeners:
            listener()

    async def run(self, fn: Callable, *args):
        before = dict(self.sgx.encls)
        try:
            return fn(*args)
        finally:
            self.settle()
            await trio.sleep(cost(before, self.sgx.encls, self.scale))
