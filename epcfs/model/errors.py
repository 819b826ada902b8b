"""The one exception the model raises: a refusal the kernel would give, with its errno.

Every model operation that raises has changed nothing, so callers map the exception
straight to a syscall result (FUSEError, an ioctl status) without any undo.
"""

import errno as _errno
import os


class KernelError(Exception):
    """A kernel refusal. `errno` is what the syscall returns; `why` is for logs only."""

    def __init__(self, err: int, why: str = "") -> None:
        super().__init__(err, why or os.strerror(err))
        self.errno = err
        self.why = why

    def __repr__(self) -> str:
        return f"KernelError({_errno.errorcode.get(self.errno, self.errno)}, {self.why!r})"
