"""Reading /proc: a process's status and stat lines, its threads, and its pid in each
pid namespace (NSpid, NS_GET_PARENT) for translating pids between the daemon's pid
namespace and a caller's."""

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

    def to_daemon_ns(self, pid: int, caller: int) -> int | None:
        """The daemon-namespace id of the task that `caller` (a daemon-namespace id) knows
        as `pid`; None if the caller's namespace has no such task. Thread ids count (the
        caller may name a thread; cgroup.procs moves its thread group)."""
        me = self.status(caller) if caller else None
        if me is None or me.level == 0:
            return pid
        ns = self.pid_ns(caller)
        for candidates in (self.pids, self._all_tids):
            for cand in candidates():
                st = self.status(cand)
                if (st is not None and len(st.nspid) > me.level
                        and st.nspid[me.level] == pid
                        and self.pid_ns(cand, st.level - me.level) == ns):
                    return cand
        return None

    def to_caller_ns(self, pids: list[int], caller: int) -> list[int]:
        """`pids` (daemon namespace) as `caller` sees them, in order, leaving out those
        outside its namespace."""
        me = self.status(caller) if caller else None
        if me is None or me.level == 0:
            return pids
        ns = self.pid_ns(caller)
        out = []
        for pid in pids:
            st = self.status(pid)
            if (st is not None and len(st.nspid) > me.level
                    and self.pid_ns(pid, st.level - me.level) == ns):
                out.append(st.nspid[me.level])
        return out

    def _all_tids(self) -> list[int]:
        return [tid for pid in self.pids() for tid in self.tasks(pid) if tid != pid]

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
