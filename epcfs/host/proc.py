"""Reading /proc: a process's status and stat lines, its threads, its pid in each pid
namespace (NSpid) and the identity of those namespaces (nsfs, NS_GET_PARENT), which
pidns.py uses to translate pids between the daemon's pid namespace and a caller's."""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass

PF_NO_SETAFFINITY = 0x04000000
"""Per-cpu kernel threads: cgroup_procs_write_start refuses to move them (EINVAL), as it
refuses kthreadd (the one process besides init whose parent is 0)."""


@dataclass(frozen=True)
class ProcStatus:
    tgid: int
    ppid: int
    state: str
    threads: int
    nspid: tuple[int, ...] = ()
    """The pid in each pid namespace from the daemon's (first) to the task's own (last)."""

    @property
    def level(self) -> int:
        """Depth of the task's pid namespace below the daemon's (0: the same one)."""
        return max(len(self.nspid) - 1, 0)


NS_GET_PARENT = 0xB702
"""_IO(0xb7, 0x2): a file descriptor for the parent of a pid namespace."""


class Proc:
    """Every read of /proc in one place."""

    def __init__(self, root: str = "/proc") -> None:
        self.root = root

    def status(self, pid: int) -> ProcStatus | None:
        """Tgid, PPid, state and thread count of a pid or tid; None if it does not exist."""
        try:
            with open(f"{self.root}/{pid}/status", "rb") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            return None
        fields = {}
        for line in text.split(b"\n"):
            key, _, value = line.partition(b":")
            if key in (b"Tgid", b"PPid", b"State", b"Threads", b"NSpid"):
                fields[key] = value.strip()
        try:
            return ProcStatus(int(fields[b"Tgid"]), int(fields[b"PPid"]),
                              fields[b"State"][:1].decode(), int(fields.get(b"Threads", b"1")),
                              tuple(int(n) for n in fields.get(b"NSpid", b"").split()))
        except (KeyError, ValueError):
            return None

    def pid_ns(self, pid: int, up: int = 0) -> str | None:
        """Identity ("pid:[inode]") of the pid namespace `up` levels above that of `pid`;
        None if the process is gone or the namespace is out of reach."""
        path = f"{self.root}/{pid}/ns/pid"
        try:
            if up == 0:
                return os.readlink(path)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError, PermissionError):
            return None
        try:
            for _ in range(up):
                parent = fcntl.ioctl(fd, NS_GET_PARENT)
                os.close(fd)
                fd = parent
            return f"pid:[{os.fstat(fd).st_ino}]"
        except OSError:
            return None
        finally:
            os.close(fd)

    def stat(self, pid: int) -> tuple[str, int, int, int] | None:
        """(state, ppid, flags, num_threads) from /proc/PID/stat; None if gone."""
        try:
            with open(f"{self.root}/{pid}/stat", "rb") as f:
                text = f.read()
        except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
            return None
        fields = text[text.rfind(b")") + 2:].split()
        # state ppid pgrp session tty_nr tpgid flags ... num_threads (field 20)
        return fields[0].decode(), int(fields[1]), int(fields[6]), int(fields[17])

    def pids(self) -> list[int]:
        return [int(name) for name in os.listdir(self.root) if name.isdigit()]

    def tasks(self, pid: int) -> list[int]:
        try:
            return sorted(int(t) for t in os.listdir(f"{self.root}/{pid}/task"))
        except (FileNotFoundError, ProcessLookupError):
            return []

    def parents(self) -> dict[int, int]:
        """pid -> ppid for every live process."""
        out = {}
        for pid in self.pids():
            st = self.stat(pid)
            if st is not None and not is_dead(st[0], st[3]):
                out[pid] = st[1]
        return out


def is_dead(state: str, threads: int) -> bool:
    """A zombie whose whole thread group has exited: not alive for cgroup purposes."""
    return state in "ZX" and threads <= 1
