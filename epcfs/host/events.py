"""The events membership mode: fork inheritance replayed from the proc connector.

The kernel reports every fork (PROC_EVENT_FORK: parent tgid, child pid) as it happens.
The tracker replays them in order against `Hierarchy.procs`: a child of a process in a
cgroup is put there, even if it, or its parent, has exited by the time the event is
read. What makes that exact for double forks (`sh -c '(sleep 30 &)'`, where the
intermediate exits at once):

- an exited process keeps its place in `gone` for GONE_GRACE, so the fork events of its
  children, read after its exit, still find their cgroup;
- a child whose parent is unknown waits in `pending` for PENDING_GRACE: a new process
  can fork on another CPU before its parent's fork event was even sent, so its own
  children's events may arrive first; when the parent's event arrives they follow it;
- a process no event placed is in the root: with the connector, /proc PPid chains are
  never consulted (they lead to pid 1 for orphans). Only when events were lost
  (ENOBUFS) does the tracker rescan them, and it says so in the log.

Without the connector (no CAP_NET_ADMIN in the initial namespaces) there are no events:
an untracked process is in the cgroup of its nearest tracked ancestor by PPid, which
misses children orphaned before anyone looked.
"""

from __future__ import annotations

import logging
import signal
import time

from ..model.cgroup import Cgroup, Hierarchy
from .forks import ForkEvents
from .proc import Proc
from .tracker import ProcessTracker

log = logging.getLogger(__name__)

GONE_GRACE = 1.0
"""Seconds an exited process's cgroup is remembered for its children's late fork
events. Its own events precede its exit, so this only has to cover reading them; kept
short because pids are reused (pid_max is often 32768), and a fork event naming a
reused pid as the child ends the memory at once."""

PENDING_GRACE = 0.5
"""Seconds a fork event whose parent is unknown waits for the parent's own fork event
(sent by the grandparent right after waking the parent, so microseconds late at most);
most such events come from processes in the root and are dropped after it."""


EXPIRE_EVERY = 0.1
"""Seconds between sweeps of `gone` and `pending`: every fork on the host whose parent
is untracked passes through `pending`, so sweeping at each read would cost a pass over
all of them per batch of events."""


class EventTracker(ProcessTracker):
    """Membership from fork events (see the module docstring). Freezing is SIGSTOP and
    SIGCONT, the closest user space gets to the kernel's freezer; cgroup.kill SIGKILLs
    the members and every child they are still forking, as its fork is reported."""

    mode = "events"

    def __init__(self, hierarchy: Hierarchy, proc: Proc | None = None,
                 use_connector: bool = True) -> None:
        super().__init__(hierarchy, proc)
        self.killed: set[int] = set()
        self.gone: dict[int, tuple[Cgroup, float]] = {}
        self.pending: dict[int, list[tuple[int, float]]] = {}
        self.expired = 0.0
        self.forks: ForkEvents | None = None
        if use_connector:
            try:
                self.forks = ForkEvents()
            except OSError as e:
                log.warning("proc connector unavailable (%s): fork inheritance falls back "
                            "to /proc PPid walks", e)

    def _kill(self, cg: Cgroup) -> None:
        self.settle()
        for pid in self.hierarchy.kill_targets(cg):
            self.pidfds.signal(pid, signal.SIGKILL)
            self.killed.add(pid)

    def set_freeze(self, cg: Cgroup, freeze: bool) -> None:
        """Stop (SIGSTOP) or resume (SIGCONT) the processes whose effective freeze state
        changes. The kernel's freezer is not job control; a waiting parent may see the
        child as stopped."""
        self.settle()
        pids = self.hierarchy.kill_targets(cg)
        before = {pid: self.hierarchy.procs[pid].frozen for pid in pids}
        cg.freeze = freeze
        for pid in pids:
            self._refreeze(pid, before[pid], self.hierarchy.procs[pid].frozen)

    def settle(self, scan: bool = True) -> None:
        """Without the proc connector, `scan` also walks /proc for orphans of tracked
        processes (a lookup of one pid does not need that: its PPid walk finds it)."""
        self._apply_forks(scan)
        super().settle(scan)

    async def run(self) -> None:
        import trio

        async with trio.open_nursery() as nursery:
            if self.forks is not None:
                nursery.start_soon(self._loop, self.forks.fileno(), self._apply_forks)
            await super().run()

    def close(self) -> None:
        super().close()
        if self.forks is not None:
            self.forks.close()

    # -- internals -------------------------------------------------------------------

    def _resolve(self, tgid: int) -> Cgroup:
        where = self.hierarchy.procs.get(tgid)
        if where is not None:
            return where
        if self.forks is not None and not self.forks.lost:
            return self.hierarchy.root  # no fork event placed it anywhere else
        return self._resolve_with(tgid, None)

    def _move(self, tgid: int, src: Cgroup, dst: Cgroup) -> None:
        if self.forks is None:
            self._pin_children(tgid, src)
        was_frozen = src.frozen
        try:
            self.hierarchy.move(tgid, dst)
        except BaseException:
            if tgid not in self.hierarchy.procs:
                self.pidfds.forget(tgid)
            raise
        self._refreeze(tgid, was_frozen, dst.frozen)

    def _apply_forks(self, scan: bool = True) -> None:
        if self.forks is None:
            if scan:
                self._adopt_all()
            return
        now = time.monotonic()
        for parent, child in self.forks.drain():
            if self.gone.pop(child, None) is not None:  # a reused pid: a new process
                self.killed.discard(child)
            self._forked(parent, child, now)
        if self.forks.lost:
            self.forks.lost = False
            log.warning("proc connector overflowed (fork events lost): rescanning /proc")
            self._adopt_all()
        if now - self.expired > EXPIRE_EVERY:
            self._expire(now)

    def _forked(self, parent: int, child: int, now: float) -> None:
        where = self.hierarchy.procs.get(parent)
        if where is None and parent in self.gone:
            where = self.gone[parent][0]
        if where is None:
            self.pending.setdefault(parent, []).append((child, now))
            return
        if parent in self.killed:
            self.pidfds.signal(child, signal.SIGKILL)
            self.killed.add(child)
        # a child already in a non-root cgroup was placed; one pinned in the root by a
        # lookup while its parent's event was pending was not
        placed = where.is_root or not self.hierarchy.procs.get(child, self.hierarchy.root).is_root
        if not placed and not self._register(child, where):
            self.gone[child] = (where, now)  # already exited: its children may follow
        for grandchild, _ in self.pending.pop(child, ()):
            self._forked(child, grandchild, now)

    def _expire(self, now: float) -> None:
        self.expired = now
        for pid in [p for p, (_, t) in self.gone.items() if now - t > GONE_GRACE]:
            del self.gone[pid]
            self.killed.discard(pid)
        for parent in [p for p, kids in self.pending.items()
                       if now - kids[-1][1] > PENDING_GRACE]:
            del self.pending[parent]

    def _exited(self, pid: int) -> None:
        self._apply_forks(scan=False)  # forks it made before exiting come first
        where = self.hierarchy.procs.get(pid)
        if where is not None and not where.is_root:
            self.gone[pid] = (where, time.monotonic())
        elif pid in self.killed:
            self.killed.discard(pid)
        super()._exited(pid)

    def _adopt_all(self) -> None:
        """Register every untracked process whose nearest tracked ancestor is in a
        non-root cgroup (fallback when fork events are missing)."""
        if not any(not cg.is_root for cg in self.hierarchy.procs.values()):
            return
        parents = self.proc.parents()
        for pid in parents:
            if pid not in self.hierarchy.procs:
                self._resolve_with(pid, parents)

    def _resolve_with(self, tgid: int, parents: dict[int, int] | None) -> Cgroup:
        """Walk PPid up to a tracked ancestor; register the chain if it leads to a
        non-root cgroup."""
        chain = []
        pid = tgid
        procs = self.hierarchy.procs
        while pid > 1 and pid not in procs and len(chain) < 4096:
            chain.append(pid)
            if parents is not None:
                pid = parents.get(pid, 0)
            else:
                st = self.proc.stat(pid)
                pid = st[1] if st is not None else 0
        where = procs.get(pid, self.hierarchy.root)
        if not where.is_root:
            for p in chain:
                self._register(p, where)
        return where

    def _register(self, pid: int, cg: Cgroup) -> bool:
        if not super()._register(pid, cg):
            return False
        if cg.frozen:
            self.pidfds.signal(pid, signal.SIGSTOP)
        return True

    def _pin_children(self, tgid: int, where: Cgroup) -> None:
        """Without fork events: before `tgid` moves, its untracked children stay where
        they are (they were forked there): pin them, so their PPid walks stop at them
        and not at the mover."""
        parents = self.proc.parents()
        for pid, ppid in parents.items():
            if ppid == tgid and pid not in self.hierarchy.procs and self.pidfds.watch(pid):
                self.hierarchy.move(pid, where)

    def _refreeze(self, pid: int, was: bool, now: bool) -> None:
        if now and not was:
            self.pidfds.signal(pid, signal.SIGSTOP)
        elif was and not now:
            self.pidfds.signal(pid, signal.SIGCONT)
