"""The engine's trio driver: every model step the service takes goes through Stepper.

It is the one place where model work becomes time (the timing model), where OOM
verdicts become SIGKILLs, and where the reclaimers hear that something changed. Long
operations (engine.py's step sequences) go through `drive`, which knows each one's name
and the misc css it works for: the place a tracer hooks in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import trio

from ..host.tracker import ProcessTracker
from ..model.engine import WAIT, Steps
from ..model.misc import MiscCss
from ..model.sgx import Sgx
from .timing import cost
from .trace import Tracer

T = TypeVar("T")

WAIT_TICK = 0.001
"""Seconds before an operation that WAITs (the kernel spins in cond_resched until an OOM
victim exits) is resumed: the kernel retries at once; the tick lets the victim's exit
and the reclaimers run meanwhile."""


class Stepper:
    def __init__(self, sgx: Sgx, tracker: ProcessTracker, scale: float) -> None:
        self.sgx = sgx
        self.tracker = tracker
        self.scale = scale
        self.listeners: list[Callable[[], None]] = []
        self.tracer = Tracer()
        """Sees every step (EWB/ELDU per cgroup, spans' costs); the daemon's --trace
        replaces it with a ChromeTrace."""

    def settle(self) -> None:
        """After model state changed outside a timed step (e.g. a release)."""
        self.tracker.deliver_oom_kills()
        for listener in self.listeners:
            listener()

    async def run(self, fn: Callable[..., T], *args: Any, css: MiscCss | None = None) -> T:
        """One atomic model call as one step, working for `css` (e.g. a fault's ELDU)."""
        before = dict(self.sgx.encls)
        try:
            return fn(*args)
        finally:
            self.tracer.step(before, self.sgx.encls, css)
            self.settle()
            await trio.sleep(cost(before, self.sgx.encls, self.scale))

    async def drive(self, name: str, steps: Steps[T], *, css: MiscCss | None = None,
                    pid: int | None = None, alive: Callable[[], None] | None = None) -> T:
        """Run one engine operation to its end: resume it step by step, and after each
        step settle and sleep the step's cost, so other tasks run between steps as other
        CPUs would. `name` says what it is (e.g. "add_pages", "ksgxd"), `css` whom it
        works for, `pid` the process it runs for (None: a kernel thread); the tracer
        sees each step and which operations are in progress. `alive` is called before
        each step; whatever it raises (the caller is gone) closes the operation, which
        cleans up as the kernel would at a signal check, and propagates. So does cancellation."""
        traced = self.tracer.operation(name, steps, css, pid)
        value = None
        try:
            while True:
                if alive is not None:
                    alive()
                before = dict(self.sgx.encls)
                try:
                    step = steps.send(value)
                finally:
                    traced.stepped(before, self.sgx.encls)
                    self.settle()
                    await trio.sleep(cost(before, self.sgx.encls, self.scale))
                    traced.settled()
                if step is WAIT:
                    await trio.sleep(WAIT_TICK)
        except StopIteration as stop:
            return stop.value
        finally:
            steps.close()
            traced.end()
