"""Processes: which cgroup each one is in, as the kernel would have it.

The model knows pids only; this module connects it to real processes:

- `cgroup.procs` writes move a whole thread group (a thread id resolves to its Tgid).
- Fork semantics: a process inherits its parent's cgroup at fork. The kernel's proc
  connector (netlink, PROC_EVENT_FORK) reports every fork as it happens, so a child of a
  process in a cgroup is registered there even if its parent exits a moment later. Where
  the connector is unavailable (no CAP_NET_ADMIN in the initial namespaces) the tracker
  falls back to walking PPid chains in /proc, which misses children orphaned before
  anyone looked at them.
- Exits are noticed with pidfds (readable once the whole thread group has exited, zombie
  or not), collected in one epoll set: one trio task waits on it, and every read of a
  membership-dependent file polls it first, so `cgroup.procs`, `populated` and rmdir's
  EBUSY are exact even before that task has run.

Everything that reads /proc is in `Proc`, pid namespaces included. The tracker works in
the daemon's pid namespace (that of its /proc, which is the one the FUSE request context
and SO_PEERCRED report pids in); `Proc.to_daemon_ns` and `Proc.to_caller_ns` translate
what a process in a container writes to or reads from cgroup.procs, using the NSpid
lines of /proc/PID/status (the pid in each namespace from the daemon's down to the
task's own) and the identity of the namespace at the caller's level (/proc/PID/ns/pid,
its ancestors reached with the NS_GET_PARENT ioctl).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..model.cgroup import Cgroup, Hierarchy
from ..model.errors import KernelError
from .forks import ForkEvents
from .proc import PF_NO_SETAFFINITY, Proc, is_dead

if TYPE_CHECKING:
    from ..fs.cftype import Caller

log = logging.getLogger(__name__)


class ProcessTracker:
    """pid -> cgroup for real processes, on top of Hierarchy.procs.

    A pid absent from `hierarchy.procs` is in the cgroup of its nearest tracked ancestor,
    or in the root. Pids are tracked (with a pidfd) once they are moved, inherit a
    non-root cgroup at fork, or are pinned where they are because an ancestor moves.

    Synchronous methods are safe to call from any trio task (fs handlers, the enclave
    server); `run()` is the background task that notices forks and exits as they happen.
    """

    def __init__(self, hierarchy: Hierarchy, proc: Proc | None = None,
                 use_connector: bool = True) -> None:
        self.hierarchy = hierarchy
        self.proc = proc or Proc()
        self.fds: dict[int, int] = {}
        self.epoll = select.epoll()
        self.by_fd: dict[int, int] = {}
        self.killed: set[int] = set()
        self.exit_hooks: list[Callable[[int], None]] = []
        """Called with each tracked pid that exits, after the model forgot it."""
        self.forks: ForkEvents | None = None
        if use_connector:
            try:
                self.forks = ForkEvents()
            except OSError as e:
                log.warning("proc connector unavailable (%s): fork inheritance falls back "
                            "to /proc PPid walks", e)

    # -- lookups ---------------------------------------------------------------------

    def cgroup_of(self, pid: int) -> Cgroup:
        """The cgroup a pid or tid is in now. ESRCH if no such process.

        An untracked process is registered in the cgroup of its nearest tracked
        ancestor (with every untracked process between them), so it keeps that cgroup
        when the ancestor exits, as after a fork; one found in the root is pinned there
        (as it is: an ancestor moving later does not take it along), so asking again
        costs two syscalls.
        """
        self.settle(scan=False)
        tgid = self._tgid(pid)
        where = self._resolve(tgid)
        if tgid not in self.hierarchy.procs:
            self._register(tgid, where)  # pinned in the root: the next lookup is O(1)
        return where

    def members(self, cg: Cgroup) -> list[int]:
        """Live thread-group ids directly in `cg` (cgroup.procs).

        The root has every process not in a non-root cgroup, kernel threads included.
        """
        self.settle()
        if not cg.is_root:
            return sorted(cg.procs)
        elsewhere = {pid for pid, where in self.hierarchy.procs.items() if not where.is_root}
        out = []
        for pid in self.proc.pids():
            if pid in elsewhere:
                continue
            st = self.proc.stat(pid)
            if st is not None and not is_dead(st[0], st[3]):
                out.append(pid)
        return out

    def threads(self, cg: Cgroup) -> list[int]:
        """Thread ids of the members (cgroup.threads)."""
        return [tid for pid in self.members(cg) for tid in self.proc.tasks(pid)]

    # -- writes ----------------------------------------------------------------------

    def attach(self, pid: int, dst: Cgroup, caller: Caller, threadgroup: bool = True,
               may_write: Callable[[Cgroup, Caller], bool] | None = None) -> None:
        """__cgroup_procs_write: move the process (or, for cgroup.threads, the thread)
        `pid` (0: the caller; otherwise a pid in the caller's pid namespace) into `dst`,
        with the kernel's checks in its order: ESRCH no such task (in that namespace),
        EINVAL kthreadd or a per-cpu kthread, EACCES no write access to the common
        ancestor's cgroup.procs, EOPNOTSUPP a thread across domains, EBUSY
        (the model's no-internal-process rule). An exited (zombie) process is accepted
        and not moved.
        """
        self.settle(scan=False)
        tid = self.proc.to_daemon_ns(pid, caller.pid) if pid else caller.pid
        if tid is None:
            raise KernelError(errno.ESRCH, f"no process {pid} in the writer's pid namespace")
        status = self.proc.status(tid)
        if status is None:
            raise KernelError(errno.ESRCH, f"no process {tid}")
        tgid = status.tgid
        st = self.proc.stat(tgid if threadgroup else tid)
        if st is None:
            raise KernelError(errno.ESRCH, f"no process {tid}")
        if st[2] & PF_NO_SETAFFINITY or (st[1] == 0 and tgid != 1):
            raise KernelError(errno.EINVAL, f"{tid} is kthreadd or a per-cpu kernel thread")
        src = self._resolve(tgid)
        if may_write is not None and caller.uid != 0:
            common = src
            while not _is_descendant(dst, common):
                common = common.parent
            if not may_write(common, caller):
                raise KernelError(errno.EACCES, f"no write access to {common.path}/cgroup.procs")
        if not threadgroup:
            if src is not dst:
                raise KernelError(errno.EOPNOTSUPP, "a thread cannot leave its domain cgroup")
            return
        if not dst.is_root and dst.subtree_control:
            raise KernelError(errno.EBUSY, f"{dst.path} enables controllers")
        if src is dst and tgid in self.hierarchy.procs:
            return
        fd = self._pidfd(tgid)
        if fd is None:
            return  # exited: PF_EXITING tasks are skipped, the write succeeds
        self._pin_children(tgid, src)
        was_frozen = src.frozen
        try:
            self.hierarchy.move(tgid, dst)
        except BaseException:
            if tgid not in self.fds:
                os.close(fd)
            raise
        self._watch(tgid, fd)
        self._refreeze(tgid, was_frozen, dst.frozen)

    def kill(self, cg: Cgroup) -> None:
        """cgroup.kill: SIGKILL every process in the subtree; children they are still
        forking are killed as their fork is reported."""
        self.settle()
        for pid in self.hierarchy.kill_targets(cg):
            self._signal(pid, signal.SIGKILL)
            self.killed.add(pid)

    def set_freeze(self, cg: Cgroup, freeze: bool) -> None:
        """cgroup.freeze: stop (SIGSTOP) or resume (SIGCONT) the processes whose
        effective freeze state changes. The kernel's freezer is not job control; this is
        the closest user space gets (a waiting parent may see the child as stopped)."""
        self.settle()
        pids = self.hierarchy.kill_targets(cg)
        before = {pid: self.hierarchy.procs[pid].frozen for pid in pids}
        cg.freeze = freeze
        for pid in pids:
            self._refreeze(pid, before[pid], self.hierarchy.procs[pid].frozen)

    def deliver_oom_kills(self) -> None:
        """SIGKILL the victims the model's OOM killer picked (hierarchy.oom_kills)."""
        while self.hierarchy.oom_kills:
            pid = self.hierarchy.oom_kills.pop(0)
            log.info("memory OOM: killing %d", pid)
            self._signal(pid, signal.SIGKILL)

    def enforce_memory_limits(self) -> None:
        """Continue memory.max's reclaim/OOM loop after an exit freed memory."""
        for cg in self.hierarchy.root.walk():
            css = cg.memory
            if css is not None and not css.is_root and css.usage > css.max:
                self.hierarchy.enforce_memory_max(css)
        self.deliver_oom_kills()

    # -- exits and forks -------------------------------------------------------------

    def settle(self, scan: bool = True) -> None:
        """Apply every fork and exit that has happened: called before any answer that
        depends on membership, so it never shows a process that is gone. Without the
        proc connector, `scan` also walks /proc for orphans of tracked processes (a
        lookup of one pid does not need that: its PPid walk finds its cgroup)."""
        self._apply_forks(scan)
        if self.fds:
            for fd, _ in self.epoll.poll(0):
                pid = self.by_fd.get(fd)
                if pid is not None:
                    self._exited(pid)

    async def run(self) -> None:
        """Background task: notice forks and exits as they happen."""
        import trio

        async with trio.open_nursery() as nursery:
            if self.forks is not None:
                nursery.start_soon(self._loop, self.forks.fileno(), self._apply_forks)
            await self._loop(self.epoll.fileno(), self.settle)

    @staticmethod
    async def _loop(fd: int, step: Callable[[], None]) -> None:
        """Run `step` whenever `fd` is readable; a failing step is logged, not fatal."""
        import trio

        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                step()
            except Exception:
                log.exception("process tracking step failed")
                await trio.sleep(0.1)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        self.by_fd.clear()
        self.epoll.close()
        if self.forks is not None:
            self.forks.close()

    # -- internals -------------------------------------------------------------------

    def _apply_forks(self, scan: bool = True) -> None:
        if self.forks is None:
            if scan:
                self._adopt_all()
            return
        procs = self.hierarchy.procs
        for parent, child in self.forks.drain():
            where = procs.get(parent)
            if child in procs or where is None:
                continue
            if parent in self.killed:
                self._signal(child, signal.SIGKILL)
                self.killed.add(child)
            if not where.is_root:
                self._register(child, where)
        if self.forks.lost:
            self.forks.lost = False
            log.warning("proc connector overflowed: rescanning /proc")
            self._adopt_all()

    def _adopt_all(self) -> None:
        """Register every untracked process whose nearest tracked ancestor is in a
        non-root cgroup (fallback when fork events are missing)."""
        if not any(not cg.is_root for cg in self.hierarchy.procs.values()):
            return
        parents = self.proc.parents()
        for pid in parents:
            if pid not in self.hierarchy.procs:
                self._resolve_with(pid, parents)

    def _exited(self, pid: int) -> None:
        self._apply_forks(scan=False)  # forks it made before exiting come first
        fd = self.fds.pop(pid, None)
        if fd is not None:
            self.by_fd.pop(fd, None)
            self.epoll.unregister(fd)
            os.close(fd)
        self.hierarchy.exit(pid)
        self.killed.discard(pid)
        for hook in self.exit_hooks:
            try:
                hook(pid)
            except Exception:
                log.exception("exit hook failed for %d", pid)
        self.enforce_memory_limits()

    def _tgid(self, pid: int) -> int:
        if pid in self.hierarchy.procs:
            return pid
        status = self.proc.status(pid)
        if status is None:
            raise KernelError(errno.ESRCH, f"no process {pid}")
        return status.tgid

    def _resolve(self, tgid: int) -> Cgroup:
        where = self.hierarchy.procs.get(tgid)
        if where is not None:
            return where
        return self._resolve_with(tgid, None)

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

    def _register(self, pid: int, cg: Cgroup) -> None:
        """Track a live process in `cg` without the write-path checks (fork inheritance:
        the kernel puts a child where its parent is, whatever that cgroup enables)."""
        fd = self._pidfd(pid)
        if fd is None:
            return
        if not cg.is_root and cg.subtree_control:
            # only reachable for a cgroup that enabled controllers after we last looked
            log.warning("%d inherits %s which enables controllers", pid, cg.path)
            os.close(fd)
            return
        self.hierarchy.move(pid, cg)
        self._watch(pid, fd)
        if cg.frozen:
            self._signal(pid, signal.SIGSTOP)

    def _pin_children(self, tgid: int, where: Cgroup) -> None:
        """Before `tgid` moves, its untracked children stay where they are (they were
        forked there): pin them, so their PPid walks stop at them and not at the mover."""
        parents = self.proc.parents()
        for pid, ppid in parents.items():
            if ppid == tgid and pid not in self.hierarchy.procs:
                fd = self._pidfd(pid)
                if fd is not None:
                    self.hierarchy.move(pid, where)
                    self._watch(pid, fd)

    def _pidfd(self, pid: int) -> int | None:
        """A pidfd for a live thread-group leader, or None if it has exited."""
        fd = self.fds.get(pid)
        if fd is not None:
            return fd
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return None
        except OSError as e:
            if e.errno == errno.EINVAL:  # not a thread-group leader
                return None
            raise
        if select.select([fd], [], [], 0)[0]:
            os.close(fd)
            return None
        return fd

    def _watch(self, pid: int, fd: int) -> None:
        if pid in self.fds:
            return
        self.fds[pid] = fd
        self.by_fd[fd] = pid
        self.epoll.register(fd, select.EPOLLIN)

    def _refreeze(self, pid: int, was: bool, now: bool) -> None:
        if now and not was:
            self._signal(pid, signal.SIGSTOP)
        elif was and not now:
            self._signal(pid, signal.SIGCONT)

    def _signal(self, pid: int, signum: int) -> None:
        fd = self.fds.get(pid)
        try:
            if fd is not None:
                signal.pidfd_send_signal(fd, signum)
            else:
                os.kill(pid, signum)
        except ProcessLookupError:
            pass


def _is_descendant(cg: Cgroup, ancestor: Cgroup) -> bool:
    return any(a is ancestor for a in cg.ancestors())


class LegacyTrackers:
    """cgroup v1: a process is in one cgroup of each hierarchy, so each hierarchy has its
    own tracker (fork inheritance, moves and exits are independent per hierarchy). This
    is what the service (enclave server, stepper) sees in place of a single tracker."""

    def __init__(self, *trackers: ProcessTracker) -> None:
        self.trackers = trackers

    def cgroup_of(self, pid: int) -> Cgroup:
        """Resolve (and register) `pid` in every hierarchy; its cgroup in the first."""
        found = [tracker.cgroup_of(pid) for tracker in self.trackers]
        return found[0]

    def settle(self, scan: bool = True) -> None:
        for tracker in self.trackers:
            tracker.settle(scan)

    def deliver_oom_kills(self) -> None:
        for tracker in self.trackers:
            tracker.deliver_oom_kills()

    async def run(self) -> None:
        import trio

        async with trio.open_nursery() as nursery:
            for tracker in self.trackers:
                nursery.start_soon(tracker.run)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
