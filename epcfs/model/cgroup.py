"""The cgroup v2 hierarchy: directories, controllers, process membership, and the rules
(with the kernel's errnos) that kernel/cgroup/cgroup.c applies to them.

Pure data: processes are plain pids. Finding out whether a pid exists, which thread
group it belongs to and when it exits is the service's job; it calls move() and exit().
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable, Iterator

from .constants import INT_MAX, PAGE_COUNTER_MAX
from .errors import KernelError
from .memory import MemCss
from .misc import Misc, MiscCss

CONTROLLERS = ("memory", "misc")
"""The controllers this hierarchy offers, in the kernel's subsystem order
(cpuset cpu io memory hugetlb pids rdma misc, less the ones epcfs does not have)."""


class Cgroup:
    """One cgroup directory. `procs` holds the thread-group ids directly in it."""

    def __init__(self, name: str, parent: Cgroup | None) -> None:
        self.name = name
        self.parent = parent
        self.level = 0 if parent is None else parent.level + 1
        self.children: dict[str, Cgroup] = {}
        self.subtree_control: frozenset[str] = frozenset()
        self.max_depth = INT_MAX
        self.max_descendants = INT_MAX
        self.nr_descendants = 0
        self.nr_dying_descendants = 0
        self.procs: set[int] = set()
        self.nr_procs_subtree = 0
        self.freeze = False
        self.dying = False
        self.misc: MiscCss | None = None
        self.memory: MemCss | None = None
        self.legacy: frozenset[str] | None = None if parent is None else parent.legacy
        """cgroup v1: the controllers of the (legacy) hierarchy this cgroup is in, all of
        them always on everywhere; None in the v2 hierarchy."""
        self.clone_children = parent is not None and parent.clone_children
        self.notify_on_release = parent is not None and parent.notify_on_release
        """cgroup v1 flags, inherited at mkdir (cgroup1 copies them from the parent);
        stored and shown only: no cpuset to clone, no release agent is ever run."""

    @property
    def path(self) -> str:
        if self.parent is None:
            return "/"
        parent = self.parent.path
        return f"{parent}{self.name}" if parent == "/" else f"{parent}/{self.name}"

    @property
    def is_root(self) -> bool:
        return self.parent is None

    @property
    def populated(self) -> bool:
        return self.nr_procs_subtree > 0

    @property
    def frozen(self) -> bool:
        """Effective freeze: set here or on any ancestor (cgroup.events `frozen`)."""
        cg: Cgroup | None = self
        while cg is not None:
            if cg.freeze:
                return True
            cg = cg.parent
        return False

    @property
    def controllers(self) -> frozenset[str]:
        """cgroup.controllers: everything at the root, the parent's subtree_control below
        (v1: the hierarchy's controllers, everywhere)."""
        if self.legacy is not None:
            return self.legacy
        return frozenset(CONTROLLERS) if self.parent is None else self.parent.subtree_control

    def ancestors(self) -> Iterator[Cgroup]:
        """This cgroup and every ancestor, nearest first."""
        cg: Cgroup | None = self
        while cg is not None:
            yield cg
            cg = cg.parent

    def walk(self) -> Iterator[Cgroup]:
        """This cgroup and its live descendants, pre-order."""
        yield self
        for child in self.children.values():
            yield from child.walk()

    def effective_misc(self) -> MiscCss:
        """The css misc charges go to: the nearest cgroup where misc is enabled."""
        for cg in self.ancestors():
            if cg.misc is not None:
                return cg.misc
        raise AssertionError("the root always has a misc css")

    def effective_memory(self) -> MemCss:
        """The memcg memory charges go to: the nearest cgroup where memory is enabled."""
        for cg in self.ancestors():
            if cg.memory is not None:
                return cg.memory
        raise AssertionError("the root always has a memcg")


def sorted_controllers(names: frozenset[str] | set[str]) -> list[str]:
    """Controllers in the kernel's print order."""
    return [c for c in CONTROLLERS if c in names]


class Hierarchy:
    """The whole tree, the misc controller's capacities and the pid → cgroup map.

    Memory OOM decisions land in `oom_kills`: pids the service must SIGKILL (the model
    does no I/O). `oom_victims` are pids killed but not yet seen to exit; while one of
    them is in an OOM-ing memcg, the kernel's OOM killer waits instead of killing more.
    """

    def __init__(self, misc_capacity: dict[str, int] | None = None,
                 legacy: str | None = None) -> None:
        """`legacy` makes this a cgroup v1 hierarchy of that one controller ("misc" or
        "memory"), mounted at a directory of that name: every cgroup in it has the
        controller (no subtree_control, no no-internal-process rule). A v1 machine is two
        of them; the misc one reaches the memory one through `mem` (see memcg_of)."""
        self.root = Cgroup(legacy or "", None)
        self.misc = Misc(misc_capacity)
        if legacy is not None:
            if legacy not in CONTROLLERS:
                raise ValueError(f"no controller {legacy!r}")
            self.root.legacy = frozenset({legacy})
        if legacy in (None, "misc"):
            self.root.misc = MiscCss(self.root, None)
        if legacy in (None, "memory"):
            self.root.memory = MemCss(self.root, None)
        self.mem: Hierarchy = self
        """The hierarchy holding the memory controller, whose memory_* methods charge and
        OOM-kill: this one in v2; in v1 the separate memory hierarchy."""
        self.procs: dict[int, Cgroup] = {}
        self.proc_memory: dict[int, int] = {}
        self.oom_kills: list[int] = []
        self.oom_victims: set[int] = set()
        self.dying: set[Cgroup] = set()
        self.lingering: set[MiscCss | MemCss] = set()
        self.declared: dict[int, Counter[MemCss]] = {}
        """Memory each process declared (declare_memory), by the memcg it was charged to."""
        self.cftype_names: dict[str, frozenset[str]] = {}
        """Each controller's interface-file names in non-root cgroups (add_cftypes)."""
        self.misc_release_hooks: list[Callable[[MiscCss], None]] = []
        """Called with a misc css just before it is unlinked for good (its last charge is
        gone after offlining), like the misc_res_ops .free callback (sgx_cgroup_free)."""

    # -- lookup --------------------------------------------------------------------

    def lookup(self, path: str) -> Cgroup:
        """The live cgroup at `path` ("/" or "/a/b"); ENOENT if there is none."""
        cg = self.root
        for part in path.strip("/").split("/"):
            if not part:
                continue
            try:
                cg = cg.children[part]
            except KeyError:
                raise KernelError(errno.ENOENT, path) from None
        return cg

    # -- mkdir / rmdir -------------------------------------------------------------

    def mkdir(self, parent: Cgroup, name: str) -> Cgroup:
        """cgroup_mkdir: EINVAL for a newline, EAGAIN past a limit, then EEXIST."""
        if "\n" in name:
            raise KernelError(errno.EINVAL, "newline in cgroup name")
        self._check_alive(parent)
        level = 1
        for cg in parent.ancestors():
            if cg.nr_descendants >= cg.max_descendants or level > cg.max_depth:
                raise KernelError(errno.EAGAIN, f"hierarchy limit at {cg.path}")
            level += 1
        if name in parent.children:
            raise KernelError(errno.EEXIST, name)
        child = Cgroup(name, parent)
        parent.children[name] = child
        for cg in parent.ancestors():
            cg.nr_descendants += 1
        for controller in child.controllers:
            self._css_online(child, controller)
        return child

    def rmdir(self, cg: Cgroup) -> None:
        """cgroup_destroy_locked: EBUSY while populated or with live children.

        What is still charged keeps the cgroup as a dying descendant until it is freed.
        """
        if cg.is_root:
            raise KernelError(errno.EBUSY, "root")
        self._check_alive(cg)
        if cg.populated or cg.children:
            raise KernelError(errno.EBUSY, f"{cg.path} in use")
        del cg.parent.children[cg.name]
        cg.dying = True
        for above in cg.parent.ancestors():
            above.nr_descendants -= 1
            above.nr_dying_descendants += 1
        self.dying.add(cg)
        for controller in CONTROLLERS:
            self._css_offline(cg, controller)
        self._maybe_release(cg)

    # -- controllers ---------------------------------------------------------------

    def add_cftypes(self, controller: str, names: frozenset[str]) -> None:
        """cgroup_add_dfl_cftypes: the file names `controller` creates in each non-root
        cgroup where it is enabled (enabling it where a child cgroup is so named fails)."""
        self.cftype_names[controller] = self.cftype_names.get(controller, frozenset()) | names

    def write_subtree_control(self, cg: Cgroup, text: str) -> None:
        """cgroup_subtree_control_write, token rules and errnos in the kernel's order.
        `text` is already strstrip()ped: tokens split at single spaces, nothing else."""
        enable: set[str] = set()
        disable: set[str] = set()
        for tok in text.split(" "):
            if not tok:
                continue
            if tok[1:] not in CONTROLLERS or tok[0] not in "+-":
                raise KernelError(errno.EINVAL, f"bad token {tok!r}")
            (enable if tok[0] == "+" else disable).add(tok[1:])
            (disable if tok[0] == "+" else enable).discard(tok[1:])
        self._check_alive(cg)
        for name in CONTROLLERS:
            if name in enable:
                if name in cg.subtree_control:
                    enable.discard(name)
                elif name not in cg.controllers:
                    raise KernelError(errno.ENOENT, f"{name} not in cgroup.controllers")
            elif name in disable:
                if name not in cg.subtree_control:
                    disable.discard(name)
                elif any(name in child.subtree_control for child in cg.children.values()):
                    raise KernelError(errno.EBUSY, f"a child of {cg.path} enables {name}")
        if not enable and not disable:
            return
        if enable and not cg.is_root and cg.procs:
            raise KernelError(errno.EBUSY, f"{cg.path} has processes")
        # cgroup_apply_control: css_populate_dir meets a name taken by a grandchild
        # cgroup (kernfs_add_one's EEXIST), and cgroup_restore_control undoes it all.
        for name in enable:
            for child in cg.children.values():
                if self.cftype_names.get(name, frozenset()) & child.children.keys():
                    raise KernelError(errno.EEXIST, f"a cgroup in {child.path} is named "
                                                    f"like a {name} file")
        cg.subtree_control = (cg.subtree_control | enable) - disable
        for child in cg.children.values():
            for name in enable:
                self._css_online(child, name)
            for name in disable:
                self._css_offline(child, name)
                self._maybe_release(child)

    def _css_online(self, cg: Cgroup, controller: str) -> None:
        if controller == "misc":
            cg.misc = MiscCss(cg, cg.parent.misc)
        else:
            cg.memory = MemCss(cg, cg.parent.memory)

    def _css_offline(self, cg: Cgroup, controller: str) -> None:
        """Kill the css: it stays reachable from what is charged to it until released."""
        css = cg.misc if controller == "misc" else cg.memory
        if css is None:
            return
        css.dead = True
        if controller == "misc":
            cg.misc = None
        else:
            cg.memory = None
        if css.idle():
            self._unlink(css)
        else:
            self.lingering.add(css)

    def _unlink(self, css: MiscCss | MemCss) -> None:
        if isinstance(css, MiscCss):
            for hook in self.misc_release_hooks:
                hook(css)
            css.parent.children.remove(css)

    def _css_released(self, css: MiscCss | MemCss) -> None:
        """A dead css was uncharged to zero: unlink it and maybe free its dying cgroup."""
        self.lingering.discard(css)
        self._unlink(css)
        self._maybe_release(css.cgroup)

    def _maybe_release(self, cg: Cgroup) -> None:
        if cg not in self.dying or any(css.cgroup is cg for css in self.lingering):
            return
        self.dying.discard(cg)
        for above in cg.parent.ancestors():
            above.nr_dying_descendants -= 1

    # -- misc charging -------------------------------------------------------------

    def misc_uncharge(self, name: str, css: MiscCss, amount: int) -> None:
        self.misc.uncharge(name, css, amount)
        self._release_idle(css)

    def _release_idle(self, css: MiscCss | MemCss) -> None:
        """Free every dead css on the way up that the uncharge left idle: a dying parent
        lives only as long as its dying children do (they hold a reference on it)."""
        for level in list(css.ancestors()):
            if level.dead and level.idle() and level in self.lingering:
                self._css_released(level)

    # -- limits --------------------------------------------------------------------

    def set_max_depth(self, cg: Cgroup, value: int) -> None:
        self._check_alive(cg)
        cg.max_depth = value

    def set_max_descendants(self, cg: Cgroup, value: int) -> None:
        self._check_alive(cg)
        cg.max_descendants = value

    # -- processes -----------------------------------------------------------------

    def move(self, pid: int, dst: Cgroup) -> None:
        """Attach a whole thread group to `dst` (cgroup_migrate_vet_dst's EBUSY rule).

        Charges already made stay with the css that was charged, as in the kernel.
        """
        self._check_alive(dst)
        if not dst.is_root and dst.subtree_control:
            raise KernelError(errno.EBUSY,
                              f"{dst.path} enables controllers (no internal processes)")
        src = self.procs.get(pid)
        if src is dst:
            return
        if src is not None:
            self._leave(pid, src)
        self.procs[pid] = dst
        dst.procs.add(pid)
        for cg in dst.ancestors():
            cg.nr_procs_subtree += 1

    def exit(self, pid: int) -> None:
        """A tracked process has exited: forget it (and any OOM verdict against it)."""
        cg = self.procs.pop(pid, None)
        if cg is not None:
            self._leave(pid, cg)
        for css, pages in self.declared.pop(pid, {}).items():
            self.memory_uncharge(css, pages, pid)
        self.oom_victims.discard(pid)
        self.proc_memory.pop(pid, None)

    def _leave(self, pid: int, cg: Cgroup) -> None:
        cg.procs.discard(pid)
        for above in cg.ancestors():
            above.nr_procs_subtree -= 1

    def cgroup_of(self, pid: int) -> Cgroup:
        """The cgroup a tracked pid is in; untracked pids are in the root."""
        return self.procs.get(pid, self.root)

    def misc_of(self, pid: int) -> MiscCss:
        """The misc css a process's charges go to."""
        return self.cgroup_of(pid).effective_misc()

    def memcg_of(self, pid: int) -> MemCss:
        """The memcg a process's charges go to: in v1, from its cgroup in the memory
        hierarchy (a process is in one cgroup of each hierarchy)."""
        return self.mem.cgroup_of(pid).effective_memory()

    def kill_targets(self, cg: Cgroup) -> list[int]:
        """cgroup.kill: every process in the subtree."""
        return [pid for sub in cg.walk() for pid in sub.procs]

    # -- memory charging and the OOM killer ----------------------------------------

    def memory_try_charge(self, css: MemCss, pages: int, owner: int | None,
                          current: int | None) -> bool:
        """try_charge_memcg for pages nothing can reclaim (shmem without swap).

        `owner` is the process the pages are attributed to (the OOM killer's badness),
        `current` the task doing the charge (None for ksgxd and the async workers).
        Returns True if charged. Over a limit: a `max` event at the limiting level, then
        its OOM killer picks the process of that memcg's subtree holding the most memory.
        If that victim is `current` the charge is forced (a dying task bypasses the
        limit); otherwise it fails and the caller backs off. While an earlier victim has
        not exited yet no new one is picked (the kernel waits for it instead).
        """
        refused = css.over_limit(pages) if not css.is_root else None
        if refused is not None:
            over, counter = refused
            if counter == "memsw":
                over.memsw_failcnt += 1
            else:
                over.failcnt += 1
            over.event("max")
            self._oom(over)
            if current is None or current not in self.oom_victims:
                return False
        css.commit(pages)
        if owner is not None:
            self.proc_memory[owner] = self.proc_memory.get(owner, 0) + pages
        return True

    def memory_uncharge(self, css: MemCss, pages: int, owner: int | None) -> None:
        css.uncharge(pages)
        if owner in self.proc_memory:
            self.proc_memory[owner] -= pages
            if not self.proc_memory[owner]:
                del self.proc_memory[owner]
        self._release_idle(css)

    def declare_memory(self, pid: int, pages: int) -> None:
        """A workload process says it now holds `pages` more memory (an enclave's source
        image, its heap mapping): charged to its memcg now, uncharged when it exits.

        Over memory.max this is a page fault that found no memory: the OOM decision is
        queued as for any charge, and ENOMEM (nothing charged) tells the service the
        process is waiting for it, unless it is the victim itself (then the charge is
        forced, as for a dying task).
        """
        css = self.memcg_of(pid)
        if not self.memory_try_charge(css, pages, owner=pid, current=pid):
            raise KernelError(errno.ENOMEM, f"memory.max reached in {css.cgroup.path}")
        held = self.declared.setdefault(pid, Counter())
        held[css] += pages

    def _oom(self, memcg: MemCss) -> None:
        """mem_cgroup_out_of_memory: count the OOM, queue one victim for SIGKILL."""
        memcg.event("oom")
        victim = self._oom_pick(memcg.cgroup)
        if victim is not None:
            self.oom_victims.add(victim)
            self.oom_kills.append(victim)
            self.memcg_of(victim).event("oom_kill")

    def _oom_pick(self, scope: Cgroup) -> int | None:
        """The OOM victim in `scope`'s subtree, or None while an earlier one is exiting."""
        candidates = [pid for cg in scope.walk() for pid in cg.procs]
        if any(pid in self.oom_victims for pid in candidates):
            return None
        candidates = [pid for pid in candidates if pid not in self.oom_victims]
        if not candidates:
            return None
        return max(candidates, key=lambda pid: (self.proc_memory.get(pid, 0), -pid))

    def set_memory_max(self, css: MemCss, pages: int) -> None:
        """memory.max write: store it, and if usage is above it, OOM-kill in that memcg.

        The kernel loops reclaim → OOM kill until usage fits. Nothing epcfs charges is
        reclaimable, so one victim is queued now; the service calls enforce_memory_max
        again after each exit, which continues the loop.
        """
        css.max = min(pages, PAGE_COUNTER_MAX)
        self.enforce_memory_max(css)

    def set_memory_limit_v1(self, css: MemCss, pages: int, memsw: bool) -> None:
        """cgroup v1 memory.limit_in_bytes / memory.memsw.limit_in_bytes
        (mem_cgroup_resize_max): the memory limit may not exceed the memory+swap one
        (EINVAL either way round); a limit below usage needs reclaim, and nothing epcfs
        charges is reclaimable, so that is EBUSY and nothing changes (v1 does not
        OOM-kill for a limit write, unlike v2's memory.max)."""
        if css.is_root:
            raise KernelError(errno.EINVAL, "the root memcg has no limit")
        pages = min(pages, PAGE_COUNTER_MAX)
        if memsw and pages < css.max or not memsw and pages > css.memsw_max:
            raise KernelError(errno.EINVAL, "memory.limit_in_bytes > memory.memsw.limit_in_bytes")
        if css.usage > pages:
            raise KernelError(errno.EBUSY, f"usage {css.usage} pages cannot be reclaimed")
        if memsw:
            css.memsw_max = pages
        else:
            css.max = pages

    def enforce_memory_max(self, css: MemCss) -> None:
        if not css.dead and css.usage > css.max:
            self._oom(css)

    # -- helpers -------------------------------------------------------------------

    def _check_alive(self, cg: Cgroup) -> None:
        if cg.dying:
            raise KernelError(errno.ENODEV, f"{cg.path} was removed")
