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
"""Seconds before an operation that WAITs is resumed, or a faulting access the handler
answered RETRY (EBUSY on the no-reclaim path) tries again: the kernel retries at once
(cond_resched in a retry loop, or the task refaults); the tick lets the reclaimers, the
work item the failure queued, or an OOM victim's exit run meanwhile."""

WAIT_MAX = 0.25
"""Longest pause between two tries of an operation that keeps waiting. The kernel's task
retries for as long as nothing changes (e.g. the EPC is full, its one reclaimable page
is in a cgroup without a limit, so no work item reclaims, and nothing woke ksgxd): the
request stays pending until another task frees or reclaims a page, or the caller dies.
The pause doubles from WAIT_TICK up to this, so a pending operation costs a few model
calls a second, not a spinning daemon, and still sees a change within a quarter second."""


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
        pause = WAIT_TICK
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
                    await trio.sleep(pause)
                    pause = min(2 * pause, WAIT_MAX)
                else:
                    pause = WAIT_TICK
        except StopIteration as stop:
            return stop.value
        finally:
            steps.close()
            traced.end()
