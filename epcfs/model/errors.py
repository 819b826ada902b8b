"""The exceptions the model raises: a refusal the kernel would give, with its errno, and
the one non-error, Blocked, where the kernel would keep looping.

Every model operation that raises KernelError has changed nothing beyond what the kernel
itself had done by then (for a multi-page ioctl, `count` pages were processed and stay
processed, exactly as the ioctl reports them), so callers map the exception straight to a
syscall result (FUSEError, an ioctl status) without any undo.
"""

import errno as _errno
import os


class KernelError(Exception):
    """A kernel refusal. `errno` is what the syscall returns; `why` is for logs only.

    `count` is how many pages a multi-page operation (ADD_PAGES, the EDMM ioctls)
    completed before the failing one: the ioctl's `count` field. 0 elsewhere.
    """

    count = 0

    def __init__(self, err: int, why: str = "", count: int = 0) -> None:
        super().__init__(err, why or os.strerror(err))
        self.errno = err
        self.why = why
        self.count = count

    def __repr__(self) -> str:
        return f"KernelError({_errno.errorcode.get(self.errno, self.errno)}, {self.why!r})"


class Blocked(Exception):  # noqa: N818 (a state, not an error: nothing went wrong)
    """The kernel would spin here until something else happens, and nothing else can: the
    synchronous driver (engine.run) throws it into an operation at a WAIT step.

    That happens on the reclaim-allowed allocation paths (ECREATE, ADD_PAGES) when a
    synchronous reclaim round freed nothing because every backing-store charge failed
    against memory.max: the kernel loops (cond_resched) until the memcg OOM victim it
    picked exits or a signal arrives. A caller delivers the OOM kills in
    Hierarchy.oom_kills and calls the operation again for the rest (the service's driver
    instead waits at the WAIT and resumes the same operation).

    `count` pages were completed before blocking and stay completed. The page being
    allocated when the model blocked was given back, not held while waiting: the one
    difference from the kernel, which keeps that page's charge while it spins.
    """

    def __init__(self, count: int = 0) -> None:
        super().__init__(count)
        self.count = count
