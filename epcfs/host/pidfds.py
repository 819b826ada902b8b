"""Pidfds: exit notification and race-free signals for the processes the daemon tracks."""

from __future__ import annotations

import errno
import os
import select
import signal


class Pidfds:
    """One pidfd per watched thread-group leader, all in one epoll set: it is readable
    once some watched process has exited (its whole thread group, zombie or not)."""

    def __init__(self) -> None:
        self.fds: dict[int, int] = {}
        self.by_fd: dict[int, int] = {}
        self.epoll = select.epoll()

    def watch(self, pid: int) -> bool:
        """Watch `pid` for its exit; False if it is not a live thread-group leader."""
        if pid in self.fds:
            return True
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        except OSError as e:
            if e.errno == errno.EINVAL:  # not a thread-group leader
                return False
            raise
        if select.select([fd], [], [], 0)[0]:
            os.close(fd)
            return False
        self.fds[pid] = fd
        self.by_fd[fd] = pid
        self.epoll.register(fd, select.EPOLLIN)
        return True

    def forget(self, pid: int) -> None:
        fd = self.fds.pop(pid, None)
        if fd is not None:
            self.by_fd.pop(fd, None)
            self.epoll.unregister(fd)
            os.close(fd)

    def exited(self) -> list[int]:
        """Watched pids that have exited since they were last forgotten; never blocks."""
        if not self.fds:
            return []
        return [self.by_fd[fd] for fd, _ in self.epoll.poll(0) if fd in self.by_fd]

    def signal(self, pid: int, signum: int) -> None:
        """Send `signum`, through the pidfd if watched (no pid-reuse race); a process
        already gone is not an error."""
        fd = self.fds.get(pid)
        try:
            if fd is not None:
                signal.pidfd_send_signal(fd, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            pass

    def fileno(self) -> int:
        return self.epoll.fileno()

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.by_fd.clear()
        self.epoll.close()
