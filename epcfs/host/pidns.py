"""Pid namespaces: what a caller in a container writes to, and reads from, cgroup.procs.

The daemon works in its own pid namespace (that of its /proc, the one the FUSE request
context and SO_PEERCRED report pids in). A caller's pids are translated with the NSpid
lines of /proc/PID/status (the pid in each namespace from the daemon's down to the
task's own) and the identity of the namespace at the caller's level (/proc/PID/ns/pid,
its ancestors reached with the NS_GET_PARENT ioctl: `Proc.pid_ns`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from .proc import Proc


def to_daemon_ns(proc: Proc, pid: int, caller: int) -> int | None:
    """The daemon-namespace id of the task that `caller` (a daemon-namespace id) knows
    as `pid`; None if the caller's namespace has no such task. Thread ids count (the
    caller may name a thread; cgroup.procs moves its thread group)."""
    me = proc.status(caller) if caller else None
    if me is None or me.level == 0:
        return pid
    ns = proc.pid_ns(caller)
    for cand in itertools.chain(proc.pids(), _other_tids(proc)):
        st = proc.status(cand)
        if (st is not None and len(st.nspid) > me.level
                and st.nspid[me.level] == pid
                and proc.pid_ns(cand, st.level - me.level) == ns):
            return cand
    return None


def to_caller_ns(proc: Proc, pids: list[int], caller: int) -> list[int]:
    """`pids` (daemon namespace) as `caller` sees them, in order, leaving out those
    outside its namespace."""
    me = proc.status(caller) if caller else None
    if me is None or me.level == 0:
        return pids
    ns = proc.pid_ns(caller)
    out = []
    for pid in pids:
        st = proc.status(pid)
        if (st is not None and len(st.nspid) > me.level
                and proc.pid_ns(pid, st.level - me.level) == ns):
            out.append(st.nspid[me.level])
    return out


def _other_tids(proc: Proc) -> Iterator[int]:
    """Every thread that is not its group's leader, read only as far as needed."""
    for pid in proc.pids():
        yield from (tid for tid in proc.tasks(pid) if tid != pid)
