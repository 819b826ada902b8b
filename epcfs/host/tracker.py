"""Processes: which cgroup each one is in, as the kernel would have it.

The model knows pids only; a tracker connects it to real processes. It keeps
`Hierarchy.procs` (pid -> cgroup, what the model charges and OOM-kills by) true for the
processes that matter: those in non-root cgroups, and those the enclave server asked
about. Two backends (membership modes) decide where a process is:

- `MirrorTracker` (cgroup, the default where it works): every epcfs cgroup has a real
  twin in a private subtree of a writable cgroup2 hierarchy; moves are real, so the
  kernel itself does fork inheritance, cgroup.kill and the freezer.
- `EventTracker` (events): replays the proc connector's fork events against a table of
  who is where; the fallback without a writable cgroup2.

Common to both: cgroup.procs writes move a whole thread group (a thread id resolves to
its Tgid), with the kernel's checks in its order; exits are noticed with pidfds
(`Pidfds`); one trio task waits on them, and every read of a membership-dependent file
settles first, so `cgroup.procs`, `populated` and rmdir's EBUSY are exact even before
that task has run. Pids are the daemon's pid namespace's (that of its /proc, which the
FUSE request context and SO_PEERCRED report); pidns.py translates what a process in
a container writes and reads.
"""

from __future__ import annotations

import errno
import logging
import signal
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..model.cgroup import Cgroup, Hierarchy
from ..model.errors import KernelError
from .pidfds import Pidfds
from .pidns import to_daemon_ns
from .proc import PF_NO_SETAFFINITY, Proc, is_dead

if TYPE_CHECKING:
    from .caller import Caller

log = logging.getLogger(__name__)


class ProcessTracker:
    """pid -> cgroup for real processes, on top of Hierarchy.procs; the part common to
    both membership modes. Subclasses say where an untracked process is (`_resolve`),
    how a move, a kill and a freeze happen, and what `settle` replays.

    Synchronous methods are safe to call from any trio task (fs handlers, the enclave
    server); `run()` is the background task that notices exits (and forks) as they
    happen.
    """

    mode = ""
    """The --membership mode this backend implements, as logged at start."""

    def __init__(self, hierarchy: Hierarchy, proc: Proc | None = None) -> None:
        self.hierarchy = hierarchy
        self.proc = proc or Proc()
        self.pidfds = Pidfds()
        self.exit_hooks: list[Callable[[int], None]] = []
        """Called with each tracked pid that exits, after the model forgot it."""
        self.kill_hooks: list[Callable[[Cgroup, list[int]], None]] = []
        """Called with the cgroup and its member pids at each cgroup.kill, before the
        signals go out."""

    # -- lookups ---------------------------------------------------------------------

    def cgroup_of(self, pid: int) -> Cgroup:
        """The cgroup a pid or tid is in now. ESRCH if no such process. The process is
        registered there (with a pidfd), so the model charges it there and hears of its
        exit."""
        self.settle(scan=False)
        tgid = self._tgid(pid)
        where = self._resolve(tgid)
        if self.hierarchy.procs.get(tgid) is not where:
            self._register(tgid, where)
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

    def events(self, cg: Cgroup) -> tuple[bool, bool]:
        """cgroup.events: (populated, frozen)."""
        self.settle()
        return cg.populated, cg.frozen

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
        tid = to_daemon_ns(self.proc, pid, caller.pid) if pid else caller.pid
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
        if not self.pidfds.watch(tgid):
            return  # exited: PF_EXITING tasks are skipped, the write succeeds
        self._move(tgid, src, dst)

    def mkdir(self, parent: Cgroup, name: str) -> Cgroup:
        """cgroup_mkdir (the model's rules and errnos)."""
        return self.hierarchy.mkdir(parent, name)

    def rmdir(self, cg: Cgroup) -> None:
        """cgroup_rmdir: EBUSY while live processes are in it."""
        self.settle()
        self.hierarchy.rmdir(cg)

    def kill(self, cg: Cgroup) -> None:
        """cgroup.kill: SIGKILL every process in the subtree, those being forked too."""
        if self.kill_hooks:
            self.settle()
            members = self.hierarchy.kill_targets(cg)
            for hook in self.kill_hooks:
                hook(cg, members)
        self._kill(cg)

    def _kill(self, cg: Cgroup) -> None:
        """The backend's cgroup.kill."""
        raise NotImplementedError

    def set_freeze(self, cg: Cgroup, freeze: bool) -> None:
        """cgroup.freeze: freeze or thaw the subtree."""
        raise NotImplementedError

    def deliver_oom_kills(self) -> None:
        """SIGKILL the victims the model's OOM killer picked (hierarchy.oom_kills)."""
        while self.hierarchy.oom_kills:
            pid = self.hierarchy.oom_kills.pop(0)
            log.info("memory OOM: killing %d", pid)
            self.pidfds.signal(pid, signal.SIGKILL)

    def enforce_memory_limits(self) -> None:
        """Continue memory.max's reclaim/OOM loop after an exit freed memory."""
        for cg in self.hierarchy.root.walk():
            css = cg.memory
            if css is not None and not css.is_root and css.usage > css.max:
                self.hierarchy.enforce_memory_max(css)
        self.deliver_oom_kills()

    # -- exits -----------------------------------------------------------------------

    def settle(self, scan: bool = True) -> None:
        """Apply every exit (and fork) that has happened: called before any answer
        that depends on membership, so it never shows a process that is gone. `scan`
        False: a lookup of one pid follows, which needs less."""
        for pid in self.pidfds.exited():
            self._exited(pid)

    async def run(self) -> None:
        """Background task: notice exits as they happen."""
        await self._loop(self.pidfds.fileno(), self.settle)

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
        self.pidfds.close()

    # -- internals -------------------------------------------------------------------

    def _resolve(self, tgid: int) -> Cgroup:
        """The cgroup a live thread group is in now."""
        raise NotImplementedError

    def _move(self, tgid: int, src: Cgroup, dst: Cgroup) -> None:
        """Move a live, watched thread group from `src` to `dst`, checks passed."""
        raise NotImplementedError

    def _exited(self, pid: int) -> None:
        self.pidfds.forget(pid)
        self.hierarchy.exit(pid)
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

    def _register(self, pid: int, cg: Cgroup) -> bool:
        """Track a live process in `cg` without the write-path checks (fork inheritance:
        the kernel puts a child where its parent is, whatever that cgroup enables).
        False if it has exited."""
        if not self.pidfds.watch(pid):
            return False
        try:
            self.hierarchy.move(pid, cg)
        except KernelError as e:
            # only reachable for a cgroup that enabled controllers after we last looked
            log.warning("%d inherits %s: %s", pid, cg.path, e)
            if pid not in self.hierarchy.procs:
                self.pidfds.forget(pid)
            return False
        return True


def _is_descendant(cg: Cgroup, ancestor: Cgroup) -> bool:
    return any(a is ancestor for a in cg.ancestors())
