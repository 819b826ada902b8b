"""A hypothesis state machine over everything the service can do to the model, with
check_invariants() after every step.

The machine plays the service too: it delivers the OOM killer's SIGKILLs (the victim's
enclaves and vEPCs are released, the process exits) and keeps reclaim batches between
their steps for a while, so releases, EDMM and faults land in the window the kernel's
races live in. It also drives the engine as the daemon does, interleaved: it starts
operations (ADD_PAGES, ECREATE, EDMM ioctls, ksgxd, work items, direct and global
reclaim) as step sequences and advances any of them by one step at a time, so several
tasks are between their steps at once. A task whose process dies or whose enclave is
released is closed first, as the service abandons an ioctl whose caller is gone.

At least EPCFS_HYPOTHESIS_STEPS steps run (default 10 000, the CI budget: ~15 s here).
"""

from __future__ import annotations

import errno
import os

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from epcfs.model import Blocked, Fault, Hierarchy, KernelError, Sgx, SgxPageType
from epcfs.model.constants import PAGE_SIZE, SGX_EPC
from epcfs.model.enclave import Enclave as Encl
from epcfs.model.engine import WAIT
from epcfs.model.invariants import check_invariants
from epcfs.model.reclaim import Stage
from epcfs.model.runs import RunState

KiB = 1 << 10
STEPS = int(os.environ.get("EPCFS_HYPOTHESIS_STEPS", "10000"))
STEPS_PER_RUN = 100
PIDS = st.integers(1, 6)
INDEX = st.integers(0, 1 << 16)
FRACTION = st.floats(0, 1)
steps_taken = 0


def pick(items, i):
    return items[i % len(items)] if items else None


class EpcMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.h = Hierarchy()
        self.sgx = Sgx(self.h, [(0, 512 * KiB), (1, 256 * KiB)])  # 192 pages: pressure
        self.h.write_subtree_control(self.h.root, "+misc +memory")
        self.encls = []
        self.vepcs = []
        self.batches = []
        self.names = 0
        self.tasks = []  # [steps, pid, enclave or None, errnos it may fail with]

    def teardown(self) -> None:
        for task in self.tasks:
            task[0].close()
        self.tasks.clear()
        check_invariants(self.sgx)
        for batch in self.batches:
            if batch.stage is Stage.ISOLATED:
                self.sgx.reclaim.writeback(batch)
            self.sgx.reclaim.free_batch(batch)
        for encl in self.encls:
            self.sgx.release(encl)
        for vepc in self.vepcs:
            self.sgx.release_vepc(vepc)
        check_invariants(self.sgx)
        assert self.h.root.misc.res[SGX_EPC].usage == 0
        assert self.sgx.free_pages + self.sgx.epc.dirty_total == self.sgx.epc.total_pages
        for pid in list(self.h.procs):  # check_invariants saw no backing left; now the rest
            self.h.exit(pid)
        assert all(cg.memory is None or cg.memory.usage == 0 for cg in self.h.root.walk())

    @initialize(dirty=st.integers(0, 60), limit=st.sampled_from([None, 40, 100, 150]),
                nested=st.booleans(), bulk=st.booleans())
    def boot(self, dirty, limit, nested, bulk) -> None:
        """ksgxd sanitizes most of the EPC; /a (maybe limited, maybe with children) and /b
        hold the processes. Half the runs take ADD_PAGES page by page."""
        self.sgx.bulk = bulk
        self.sgx.sanitize(self.sgx.epc.total_pages - dirty)
        a, b = self.h.mkdir(self.h.root, "a"), self.h.mkdir(self.h.root, "b")
        if limit is not None:
            a.misc.res[SGX_EPC].max = limit * PAGE_SIZE
        if nested:
            self.h.write_subtree_control(a, "+misc +memory")
            a = self.h.mkdir(a, "x")
        for pid in (1, 2, 3):
            self.h.move(pid, a)
        for pid in (4, 5, 6):
            self.h.move(pid, b)
        for pid in (1, 4):
            self.create(pid, 20)

    @invariant()
    def whole_truth(self) -> None:
        global steps_taken
        steps_taken += 1
        check_invariants(self.sgx)

    # -- the service's duties ----------------------------------------------------------

    def _close_tasks(self, pid: int | None = None, encl=None) -> None:
        for task in [t for t in self.tasks
                     if (pid is not None and t[1] == pid) or (encl is not None and t[2] is encl)]:
            task[0].close()
            self.tasks.remove(task)

    def kill(self, pid: int) -> None:
        """SIGKILL: the process's fds close (its enclaves and vEPCs go), then it exits."""
        self._close_tasks(pid)
        for encl in [e for e in self.encls if e.owner == pid]:
            self._close_tasks(encl=encl)
        for encl in [e for e in self.encls if e.owner == pid]:
            self.sgx.release(encl)
            self.encls.remove(encl)
        for vepc in [v for v in self.vepcs if v.owner == pid]:
            self.sgx.release_vepc(vepc)
            self.vepcs.remove(vepc)
        self.h.exit(pid)

    @rule()
    def deliver_oom_kills(self) -> None:
        kills, self.h.oom_kills = self.h.oom_kills, []
        for pid in kills:
            self.kill(pid)

    @rule(pid=PIDS)
    def process_exits(self, pid) -> None:
        self.kill(pid)

    # -- cgroups -----------------------------------------------------------------------

    @rule(parent=INDEX, enable=st.booleans())
    def mkdir(self, parent, enable) -> None:
        cg = pick(list(self.h.root.walk()), parent)
        try:
            if enable:
                self.h.write_subtree_control(cg, "+misc +memory")
            self.names += 1
            self.h.mkdir(cg, f"c{self.names}")
        except KernelError as e:
            assert e.errno in (errno.EBUSY, errno.ENOENT)

    @rule(which=INDEX)
    def rmdir(self, which) -> None:
        cg = pick([c for c in self.h.root.walk() if not c.is_root], which)
        if cg is not None:
            try:
                self.h.rmdir(cg)
            except KernelError as e:
                assert e.errno == errno.EBUSY

    @rule(pid=PIDS, which=INDEX)
    def move(self, pid, which) -> None:
        try:
            self.h.move(pid, pick(list(self.h.root.walk()), which))
        except KernelError as e:
            assert e.errno == errno.EBUSY

    @rule(which=INDEX, pages=st.sampled_from([0, 3, 20, 60, 128, 129, 200, 1000]))
    def set_misc_max(self, which, pages) -> None:
        cg = pick([c for c in self.h.root.walk() if c.misc is not None and not c.is_root], which)
        if cg is not None:
            cg.misc.res[SGX_EPC].max = pages * PAGE_SIZE

    @rule(which=INDEX, pages=st.sampled_from([5, 50, 400, 1 << 40]))
    def set_memory_max(self, which, pages) -> None:
        cg = pick([c for c in self.h.root.walk() if c.memory is not None and not c.is_root],
                  which)
        if cg is not None:
            self.h.set_memory_max(cg.memory, pages)

    @rule(pid=PIDS, pages=st.integers(1, 40))
    def declare_memory(self, pid, pages) -> None:
        try:
            self.h.declare_memory(pid, pages)
        except KernelError as e:
            assert e.errno == errno.ENOMEM

    # -- enclaves ----------------------------------------------------------------------

    @rule(pid=PIDS, size=st.integers(12, 22))
    def create(self, pid, size) -> None:
        try:
            self.encls.append(self.sgx.create(pid, 1 << size))
        except KernelError as e:
            assert e.errno == errno.ENOMEM
        except Blocked:
            pass

    @rule(which=INDEX, where=FRACTION, count=st.integers(1, 300), measured=st.booleans(),
          tcs=st.booleans())
    def add_pages(self, which, where, count, measured, tcs) -> None:
        encl = pick([e for e in self.encls if not e.initialized and e.nr_pages < e.size_pages],
                    which)
        if encl is None:  # a new loader comes along
            self.create(which % 6 + 1, 16 + which % 5)
            return
        first = int(where * (encl.size_pages - 1))
        if where < 0.9:  # mostly into a gap; sometimes onto a present page (EBUSY)
            first = self._gap(encl, first)
        count = min(count, encl.size_pages - first)
        ptype = SgxPageType.TCS if tcs else SgxPageType.REG
        try:
            assert self.sgx.add_pages(encl, encl.owner, first, count, measured, ptype) == count
        except KernelError as e:
            assert e.errno in (errno.ENOMEM, errno.EBUSY) and 0 <= e.count < count
        except Blocked as b:
            assert 0 <= b.count < count

    @staticmethod
    def _gap(encl, i: int) -> int:
        """The first absent page index at or after i, wrapping to 0."""
        for start in (i, 0):
            pos = start
            for run in encl.pages.overlapping(start, encl.size_pages):
                if run.start > pos:
                    return pos
                pos = run.end
            if pos < encl.size_pages:
                return pos
        raise AssertionError("no gap in an enclave that is not full")

    @rule(which=INDEX, count=st.integers(1, 300))
    def add_more_pages(self, which, count) -> None:
        """ADD_PAGES where the last call stopped (a loader working through its heap)."""
        encl = pick([e for e in self.encls if not e.initialized], which)
        if encl is not None and encl.pages.runs:
            first = encl.pages.runs[-1].end
            if first < encl.size_pages:
                self.add_pages(which, first / (encl.size_pages - 1), count, False, False)

    @rule(which=INDEX, pid=PIDS, where=st.lists(FRACTION, min_size=1, max_size=8))
    def init_and_run(self, which, pid, where) -> None:
        """EINIT, then the enclave touches some pages (ELDU, EAUG)."""
        encl = pick([e for e in self.encls if not e.initialized], which)
        if encl is not None:
            self.sgx.init(encl)
        self.fault(which, pid, where)

    @rule(which=INDEX, pid=PIDS, where=st.lists(FRACTION, min_size=1, max_size=8))
    def fault(self, which, pid, where) -> None:
        encl = pick(self.encls, which)
        if encl is not None:
            for f in where:
                assert self.sgx.fault(encl, pid, int(f * (encl.size_pages - 1))) in Fault

    @rule(which=INDEX, where=FRACTION, count=st.integers(1, 40))
    def touch_present_pages(self, which, where, count) -> None:
        """The enclave runs: it faults in pages it has, evicted ones first (ELDU)."""
        encl = pick([e for e in self.encls if e.initialized and e.pages.runs], which)
        if encl is not None:
            evicted = [r for r in encl.pages.runs if r.state is RunState.EVICTED]
            run = pick(evicted or encl.pages.runs, int(where * 1000))
            for i in range(run.start, min(run.end, run.start + count)):
                assert self.sgx.fault(encl, encl.owner, i) in Fault

    @rule(which=INDEX, where=FRACTION, count=st.integers(1, 40), accept=st.booleans())
    def trim_accept_remove(self, which, where, count, accept) -> None:
        """The SGX2 removal flow on a range of present pages."""
        encl = pick([e for e in self.encls if e.initialized and e.pages.runs], which)
        if encl is None:
            return
        run = pick(encl.pages.runs, int(where * 1000))
        first, count = run.start, min(count, encl.size_pages - run.start)
        for op in ("trim", "accept", "remove") if accept else ("trim", "remove"):
            self.edmm(which, op, first / max(1, encl.size_pages - 1), count, encl)

    @rule(which=INDEX, op=st.sampled_from(["tcs", "trim", "restrict", "remove", "accept"]),
          where=FRACTION, count=st.integers(1, 40))
    def edmm(self, which, op, where, count, encl=None) -> None:
        encl = encl or pick([e for e in self.encls if e.initialized] or self.encls, which)
        if encl is None:
            return
        first = int(where * (encl.size_pages - 1))
        count = min(count, encl.size_pages - first)
        pid = encl.owner
        try:
            if op == "tcs":
                self.sgx.edmm.modify_types(encl, pid, first, count, SgxPageType.TCS)
            elif op == "trim":
                self.sgx.edmm.modify_types(encl, pid, first, count, SgxPageType.TRIM)
            elif op == "restrict":
                self.sgx.edmm.restrict_permissions(encl, pid, first, count)
            elif op == "remove":
                self.sgx.edmm.remove_pages(encl, pid, first, count)
            else:
                self.sgx.edmm.accept(encl, first, count)
        except KernelError as e:
            assert e.errno in (errno.EINVAL, errno.EFAULT, errno.EAGAIN, errno.EPERM,
                               errno.EBUSY)

    @rule(which=INDEX)
    def release(self, which) -> None:
        encl = pick(self.encls, which)
        if encl is not None:
            self._close_tasks(encl=encl)
            self.sgx.release(encl)
            self.encls.remove(encl)

    # -- vEPC --------------------------------------------------------------------------

    @rule(pid=PIDS)
    def create_vepc(self, pid) -> None:
        self.vepcs.append(self.sgx.create_vepc(pid))

    @rule(which=INDEX, pages=st.lists(st.integers(0, 100), min_size=1, max_size=10))
    def vepc_fault(self, which, pages) -> None:
        vepc = pick(self.vepcs, which)
        if vepc is not None:
            for i in pages:
                assert self.sgx.vepc_fault(vepc, vepc.owner, i) in Fault

    @rule(which=INDEX)
    def release_vepc(self, which) -> None:
        vepc = pick(self.vepcs, which)
        if vepc is not None:
            self.sgx.release_vepc(vepc)
            self.vepcs.remove(vepc)

    # -- reclaim -----------------------------------------------------------------------

    def _csses(self):
        stack, out = [self.h.root.misc], []
        while stack:
            css = stack.pop()
            out.append(css)
            stack.extend(css.children)
        return out

    @rule(which=INDEX, pid=st.one_of(st.none(), PIDS))
    def isolate(self, which, pid) -> None:
        self.batches.append(self.sgx.reclaim.isolate(pick(self._csses(), which), pid))

    @rule(which=INDEX)
    def batch_step(self, which) -> None:
        batch = pick(self.batches, which)
        if batch is None:
            return
        if batch.stage is Stage.ISOLATED:
            self.sgx.reclaim.writeback(batch)
        else:
            self.sgx.reclaim.free_batch(batch)
            self.batches.remove(batch)

    @rule(which=st.sampled_from(["global", "ksgxd", "async", "direct"]), pid=PIDS)
    def reclaim(self, which, pid) -> None:
        if which == "global":
            self.sgx.reclaim.reclaim_global(pid)
        elif which == "ksgxd":
            self.sgx.reclaim.take_ksgxd_wakeup()
            self.sgx.reclaim.ksgxd()
        elif which == "async":
            for css in list(self.sgx.reclaim.async_work):
                self.sgx.reclaim.work_item(css)
        else:
            self.sgx.reclaim.reclaim_direct(pid)

    @rule(count=st.integers(0, 100))
    def sanitize(self, count) -> None:
        self.sgx.sanitize(count)


class InterleavedMachine(EpcMachine):
    """The same machine plus operations in flight, one step at a time."""

    @rule(which=INDEX, kind=st.sampled_from(["add", "create", "trim", "tcs", "restrict",
                                             "remove", "ksgxd", "work", "direct",
                                             "global"]),
          pid=PIDS, where=FRACTION, count=st.integers(1, 200))
    def start_task(self, which, kind, pid, where, count) -> None:
        sgx = self.sgx
        enomem = (errno.ENOMEM,)
        edmm = (errno.EINVAL, errno.EFAULT, errno.EAGAIN, errno.EPERM, errno.EBUSY)
        busy = {t[2] for t in self.tasks if t[2] is not None}
        encls = [e for e in self.encls if e not in busy]  # one ioctl per enclave at a time
        if kind == "create":
            self.tasks.append([sgx.create.steps(pid, 1 << 18), pid, None, enomem])
        elif kind == "add":
            encl = pick([e for e in encls if not e.initialized and e.nr_pages < e.size_pages],
                        which)
            if encl is not None:
                first = self._gap(encl, int(where * (encl.size_pages - 1)))
                steps = sgx.add_pages.steps(encl, encl.owner, first,
                                            min(count, encl.size_pages - first), False)
                # EINVAL: EINIT came before the task's first step (its argument check)
                self.tasks.append([steps, encl.owner, encl,
                                   (errno.ENOMEM, errno.EBUSY, errno.EINVAL)])
        elif kind in ("trim", "tcs", "restrict", "remove"):
            encl = pick([e for e in encls if e.initialized], which)
            if encl is not None:
                first = int(where * (encl.size_pages - 1))
                n = min(count, encl.size_pages - first)
                if kind == "restrict":
                    steps = sgx.edmm.restrict_permissions.steps(encl, encl.owner, first, n)
                elif kind == "remove":
                    steps = sgx.edmm.remove_pages.steps(encl, encl.owner, first, n)
                else:
                    ptype = SgxPageType.TRIM if kind == "trim" else SgxPageType.TCS
                    steps = sgx.edmm.modify_types.steps(encl, encl.owner, first, n, ptype)
                self.tasks.append([steps, encl.owner, encl, edmm])
        elif kind == "ksgxd":
            self.tasks.append([sgx.reclaim.ksgxd.steps(), None, None, ()])
        elif kind == "work":
            css = pick(list(sgx.reclaim.async_work), which)
            if css is not None:
                self.tasks.append([sgx.reclaim.work_item.steps(css), None, None, ()])
        elif kind == "direct":
            self.tasks.append([sgx.reclaim.reclaim_direct.steps(pid), pid, None, ()])
        else:
            self.tasks.append([sgx.reclaim.reclaim_global.steps(pid), pid, None, ()])

    @rule(which=INDEX, times=st.integers(1, 4))
    def step_task(self, which, times) -> None:
        """Advance one operation in flight; a WAIT leaves it for others to unblock."""
        task = pick(self.tasks, which)
        if task is None:
            return
        steps, _, _, errnos = task
        for _ in range(times):
            try:
                result = steps.send(None)
            except StopIteration as stop:
                self.tasks.remove(task)
                if isinstance(stop.value, Encl):
                    self.encls.append(stop.value)
                return
            except KernelError as e:
                assert e.errno in errnos, e
                self.tasks.remove(task)
                return
            if result is WAIT:
                return


def test_state_machine():
    global steps_taken
    steps_taken = 0
    runs = 0
    while steps_taken < STEPS:
        run_state_machine_as_test(InterleavedMachine, settings=settings(
            max_examples=max(1, (STEPS - steps_taken) // STEPS_PER_RUN),
            stateful_step_count=STEPS_PER_RUN, deadline=None, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
        runs += 1
    assert steps_taken >= STEPS
