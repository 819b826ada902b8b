"""The cgroup membership mode: the kernel tracks who is where, in a `Mirror`."""

from __future__ import annotations

import errno
import logging

from ..model.cgroup import Cgroup, Hierarchy
from ..model.errors import KernelError
from .mirror import Mirror
from .proc import Proc
from .tracker import ProcessTracker

log = logging.getLogger(__name__)


class MirrorTracker(ProcessTracker):
    """A move writes the pid to the mirror's cgroup.procs, so from then on the kernel
    does fork inheritance exactly; `settle` reads membership back from the mirror into
    the model, one cgroup.procs per cgroup, and `cgroup_of` reads /proc/PID/cgroup.
    cgroup.kill, cgroup.freeze and cgroup.events are the mirror's own, so they are
    atomic as on the kernel (children being forked included)."""

    mode = "cgroup"

    def __init__(self, hierarchy: Hierarchy, mirror: Mirror, proc: Proc | None = None) -> None:
        super().__init__(hierarchy, proc)
        self.mirror = mirror

    def mkdir(self, parent: Cgroup, name: str) -> Cgroup:
        """The real mkdir first (its errno wins: a name the host's cgroupfs holds, such
        as cpu.stat, is EEXIST there as on a real machine); undone if the model refuses."""
        path = f"{parent.path.rstrip('/')}/{name}"
        try:
            self.mirror.mkdir(path)
        except OSError as e:
            raise KernelError(e.errno, f"mkdir {path}") from None
        try:
            return super().mkdir(parent, name)
        except BaseException:
            self.mirror.rmdir(path)
            raise

    def rmdir(self, cg: Cgroup) -> None:
        """The real rmdir decides EBUSY (a process forked in there an instant ago
        counts); the model follows."""
        self.settle()
        if not (cg.is_root or cg.dying or cg.populated or cg.children):
            try:
                self.mirror.rmdir(cg.path)
            except OSError as e:
                raise KernelError(e.errno, f"rmdir {cg.path}") from None
        self.hierarchy.rmdir(cg)  # otherwise its errno, in the kernel's order

    def _kill(self, cg: Cgroup) -> None:
        self.mirror.kill(cg.path)

    def set_freeze(self, cg: Cgroup, freeze: bool) -> None:
        self.mirror.freeze(cg.path, freeze)
        cg.freeze = freeze

    def events(self, cg: Cgroup) -> tuple[bool, bool]:
        self.settle()
        return self.mirror.events(cg.path)

    def settle(self, scan: bool = True) -> None:
        """Exits, then (unless `scan` is False: one pid's lookup follows) every
        cgroup's members as the kernel has them: forked children join the model,
        processes that left the subtree rejoin the root."""
        super().settle(scan)
        if not scan:
            return
        seen: dict[int, Cgroup] = {}
        for cg in self.hierarchy.root.walk():
            if not cg.is_root:
                for pid in self.mirror.procs(cg.path):
                    seen[pid] = cg
        for pid, where in list(self.hierarchy.procs.items()):
            gone = not where.is_root and pid not in seen
            if gone and not self._register(pid, self.hierarchy.root):
                self._exited(pid)
        for pid, cg in seen.items():
            if self.hierarchy.procs.get(pid) is not cg:
                self._register(pid, cg)

    def close(self) -> None:
        super().close()
        self.mirror.close()

    def _resolve(self, tgid: int) -> Cgroup:
        path = self.mirror.cgroup_of(tgid)
        if path is None:
            return self.hierarchy.root
        try:
            return self.hierarchy.lookup(path)
        except KernelError:
            log.warning("%d is in %s, which epcfs does not have", tgid, path)
            return self.hierarchy.root

    def _move(self, tgid: int, src: Cgroup, dst: Cgroup) -> None:
        if not (dst.is_root and self.mirror.cgroup_of(tgid) is None):
            try:
                self.mirror.move(tgid, dst.path)
            except OSError as e:
                if e.errno == errno.ESRCH:
                    return  # exited meanwhile: the write succeeds, as for a zombie
                raise KernelError(e.errno, f"moving {tgid} to {dst.path}") from None
        self.hierarchy.move(tgid, dst)
