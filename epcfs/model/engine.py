"""The engine's form: every long kernel operation is a step sequence, written once.

An operation (an allocation with its charge and the synchronous reclaim it may need, a
reclaim batch isolate → write back → free, a round of batches, direct reclaim, ksgxd's
loop, a cgroup's async work item, ADD_PAGES, the EDMM ioctls) is a generator. It yields
at each point where the kernel could be preempted and another task could see the state
in between (the window while a batch is off the LRU is the one the selftests depend on).
A step's cost is the ENCLS leaves counted in Sgx.encls between two yields; the driver
that resumes the generator turns them into time. The generator's return value is the
operation's result; a KernelError raised out of it is the syscall's answer.

What a step yields tells the driver how to go on:

- None: a preemption point. Resume whenever the driver likes.
- WAIT: the kernel would spin here (cond_resched in a retry loop) until another task
  changes something, e.g. the memcg OOM victim exits so its backing charges go away. A
  driver that has other tasks runs them first; the synchronous driver, which has none,
  throws Blocked into the operation, which gives back what it held and reports how far
  it got (Blocked.count).

The value a driver sends back in says who else runs between this operation's steps:

- ALONE: nobody. ADD_PAGES may fold whole reclaim rounds into one closed-form step
  (bulk.py), an EDMM ioctl whole cycles of direct reclaim and loads (conveyor.py),
  because nobody could have observed the states in between.
- RECLAIMERS: only the reclaimers (the queued work items, then ksgxd), each run to its
  end at every WAIT. An enclave's accesses may then fold whole cycles of faults that
  wait and the reclaim rounds that let them go on (conveyor.py).
- None: anyone (the service): every step is as the kernel takes it.

Drivers: `run` here (model tests, benchmarks, the fs layer's synchronous calls), alone
or with the reclaimers beside it; the stateful test interleaves several generators
itself; the service's trio driver (service/steps.py) awaits each step's cost in
simulated time.

If a generator is closed early (its caller is gone), it cleans up as the kernel would
at its next signal check: a batch in flight still completes, an allocation in progress
gives its charge back.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any, Generic, TypeVar

from .errors import Blocked

T = TypeVar("T")


class Wait:
    """The step value of an operation that can only go on once another task acts."""

    def __repr__(self) -> str:
        return "WAIT"


WAIT = Wait()

ALONE = object()
"""Sent into an operation by a driver that runs nothing else between its steps."""

RECLAIMERS = object()
"""Sent into an operation by a driver that runs only the reclaimers beside it, at WAITs."""

Steps = Generator["Wait | None", Any, T]


def run(steps: Steps[T], reclaimers: Callable[[], bool] | None = None) -> T:
    """The synchronous driver: run one operation to completion. Without `reclaimers`
    no other task runs between its steps: at a WAIT nothing could change, so Blocked is
    thrown into the operation and propagates out of this call. With it, each WAIT
    first runs `reclaimers()` (the reclaimers' turn, Reclaim.catch_up), and Blocked is
    thrown only if that says nothing changed."""
    token = ALONE if reclaimers is None else RECLAIMERS
    value: Any = None
    blocked = False
    while True:
        try:
            step = steps.throw(Blocked()) if blocked else steps.send(value)
        except StopIteration as stop:
            return stop.value
        blocked = step is WAIT and (reclaimers is None or not reclaimers())
        value = token


class operation(Generic[T]):  # noqa: N801 (used as a decorator, like property)
    """Marks a generator method as an engine operation. `obj.op(...)` runs it with the
    synchronous driver and returns its result; `obj.op.steps(...)` gives the step
    sequence for a driver that interleaves (the service, the stateful test)."""

    def __init__(self, fn: Callable[..., Steps[T]]) -> None:
        self.fn = fn
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def __get__(self, obj: object, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return _Bound(self.fn, obj)


class _Bound:
    __slots__ = ("fn", "obj")

    def __init__(self, fn: Callable[..., Steps[Any]], obj: object) -> None:
        self.fn = fn
        self.obj = obj

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return run(self.fn(self.obj, *args, **kwargs))

    def steps(self, *args: Any, **kwargs: Any) -> Steps[Any]:
        return self.fn(self.obj, *args, **kwargs)

    @property
    def __name__(self) -> str:
        return self.fn.__name__
