"""The SGX EPC subsystem of a kernel carrying the EPC cgroup series (v17): enclave build
and faults, vEPC. Its parts with a job of their own hang off it: reclamation
(Sgx.reclaim, reclaim.py), allocation with its charge (Sgx.allocator, alloc.py), bulk
loading (Sgx.loader, bulk.py) and the EDMM ioctls (Sgx.edmm, edmm.py).

Sgx is the one object the service drives. Long operations are engine operations
(engine.py): called plainly they run to completion with the synchronous driver;
`.steps(...)` gives the step sequence the service's driver paces. Every call either
completes, raises KernelError (the kernel's errno; `count` for the multi-page ioctls),
or, with the synchronous driver, raises Blocked (the kernel would spin waiting for an
OOM victim; call again later). The ENCLS leaves performed are counted in `encls`,
which the service turns into time. Signals are the service's: where the kernel checks
signal_pending, the service closes the operation between steps.

The caller of every operation is a pid: its cgroup picks the misc css charged for the EPC
pages it allocates (Hierarchy.misc_of) and, on the synchronous paths, the memcg charged
for the backing store that reclaim writes (Hierarchy.memcg_of; in cgroup v1 its cgroup in
the separate memory hierarchy).
`node` is the NUMA node the caller runs on; allocation prefers it (None: the first node).
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Callable
from enum import Enum

from .alloc import Allocator
from .bulk import BulkLoader
from .cgroup import Hierarchy
from .constants import (
    ADD_CHUNK,
    PAGE_SIZE,
    SGX_EEXTENDS_PER_PAGE,
    SGX_EPC,
    SGX_NR_LOW_PAGES,
    SGX_VA_SLOT_COUNT,
    SgxPageType,
)
from .conveyor import KSGXD, Conveyor
from .edmm import Edmm
from .enclave import Enclave, Vepc
from .engine import ALONE, RECLAIMERS, WAIT, Steps, operation
from .engine import run as run_steps
from .epc import Epc
from .epc_cgroup import epc_cg, forget_css
from .errors import Blocked, KernelError
from .memory import MemCss
from .misc import MiscCss
from .reclaim import Reclaim
from .runs import Run, RunState


class Fault(Enum):
    """What a page fault handler returns to the faulting access."""

    OK = "ok"
    """The page is mapped (VM_FAULT_NOPAGE after inserting the PTE); the access proceeds."""
    RETRY = "retry"
    """EBUSY on the no-reclaim path: VM_FAULT_NOPAGE without a PTE (enclave) or
    VM_FAULT_RETRY (vEPC). The access faults again; the cgroup's async work was queued."""
    SIGBUS = "sigbus"
    """Any other failure (ENOMEM: nothing reclaimable): the task gets SIGBUS."""


class Sgx:
    """EPC sections on NUMA nodes, the enclaves and vEPCs using them, and their reclaim.

    Constructed with the cgroup hierarchy and the EPC sections as (numa_node, bytes);
    it sets misc capacity for sgx_epc to their sum. Pages start dirty: ksgxd's boot pass
    (sanitize) makes them free. `bulk=False` turns off the fast paths of add_pages and
    of the EDMM ioctls over runs (the results are identical; tests compare the two).
    """

    def __init__(self, hierarchy: Hierarchy, sections: list[tuple[int, int]], *,
                 bulk: bool = True) -> None:
        self.h = hierarchy
        self.epc = Epc(sections)
        hierarchy.misc.capacity[SGX_EPC] = self.epc.total_pages * PAGE_SIZE
        hierarchy.misc_release_hooks.append(self._css_freed)
        self.bulk = bulk
        self.encls: Counter[str] = Counter()
        """Cumulative count of ENCLS (and EACCEPT, EPA) leaves performed, by name."""
        self.enclaves: dict[int, Enclave] = {}
        self.vepcs: dict[int, Vepc] = {}
        self.reclaim = Reclaim(hierarchy, self.epc, self.encls, bulk)
        """Reclamation: LRUs, batches, ksgxd and the work items (reclaim.py)."""
        self.allocator = Allocator(hierarchy, self.epc, self.reclaim)
        """Allocation and charge of every EPC page (alloc.py)."""
        self.loader = BulkLoader(self)
        """ADD_PAGES in closed form (bulk.py), when `bulk`."""
        self.edmm = Edmm(self)
        """The SGX2 EDMM ioctls and EACCEPT (edmm.py)."""
        self.conveyor = Conveyor(self)
        """Loads of evicted stretches with the reclaim that makes room, in closed form
        (conveyor.py), when `bulk`."""
        self._next_id = 1

    # -- boot ------------------------------------------------------------------------

    def sanitize(self, count: int) -> int:
        """ksgxd's boot pass: EREMOVE up to `count` dirty pages, making them free."""
        done = self.epc.sanitize(count)
        self.encls["EREMOVE"] += done
        return done

    def sanitize_all(self) -> int:
        """The whole boot pass at once (tests, benchmarks, a daemon that boots before it
        serves): every page free."""
        return self.sanitize(self.epc.dirty_total)

    @property
    def sanitized(self) -> bool:
        return not self.epc.dirty_total

    @property
    def free_pages(self) -> int:
        return self.epc.free_total

    def node_total_bytes(self, nid: int) -> int:
        """/sys/devices/system/node/node<N>/x86/sgx_total_bytes."""
        node = self.epc.nodes.get(nid)
        return node.size_pages * PAGE_SIZE if node else 0

    def _css_freed(self, css: MiscCss) -> None:
        """A misc css is about to be unlinked (sgx_cgroup_free)."""
        self.reclaim.async_work.pop(css, None)
        forget_css(css)

    # -- enclave build -----------------------------------------------------------------

    def _add_va(self, encl: Enclave, nid: int, css: MiscCss) -> None:
        self.encls["EPA"] += 1
        encl.va_added(nid, css)

    def _grow(self, encl: Enclave, css: MiscCss, pid: int, reclaim: bool,
              pref: list[int]) -> Steps[None]:
        """sgx_encl_grow: a new VA page when page_cnt is a multiple of 512, then page_cnt+1."""
        if encl.page_cnt % SGX_VA_SLOT_COUNT == 0:
            self._add_va(encl, (yield from self.allocator.alloc(css, pid, reclaim, pref)), css)
        encl.grown()

    def insert_resident(self, encl: Enclave, run: Run) -> None:
        """A new child page is in EPC: into the page map, onto the LRU tail."""
        encl.pages.insert(run)
        encl.children_added(len(run))
        self.reclaim.lru_append(run)

    @operation
    def create(self, pid: int, size_bytes: int, node: int | None = None) -> Steps[Enclave]:
        """SGX_IOC_ENCLAVE_CREATE: the first VA page, then the SECS (ECREATE).

        EINVAL unless the size is a power of two of at least a page."""
        if size_bytes < PAGE_SIZE or size_bytes & (size_bytes - 1):
            raise KernelError(errno.EINVAL, f"enclave size {size_bytes} is not a power of two")
        css = self.h.misc_of(pid)
        pref = self.epc.preference(node)
        # The id is taken before the first step: creates that reclaim interleave.
        encl = Enclave(self._next_id, pid, size_bytes // PAGE_SIZE)
        self._next_id += 1
        yield from self._grow(encl, css, pid, True, pref)
        ((va_node, _),) = encl.va
        with self.allocator.given_back_on_failure(va_node, css):
            encl.secs_loaded((yield from self.allocator.alloc(css, pid, True, pref)), css)
        self.encls["ECREATE"] += 1
        self.enclaves[encl.id] = encl
        return encl

    @operation
    def add_pages(self, encl: Enclave, pid: int, offset_pages: int, count: int,
                  measured: bool, page_type: SgxPageType = SgxPageType.REG,
                  node: int | None = None) -> Steps[int]:
        """SGX_IOC_ENCLAVE_ADD_PAGES for `count` pages from `offset_pages`, in order.

        Per page: the EPC page (reclaim allowed), then a VA page when due, EADD, 16
        EEXTENDs if measured, and the page joins the LRU. Returns `count`. Errors carry
        `count` = pages added before the failing one (they stay added): EINVAL for an
        initialized enclave or a range outside it, EBUSY for a page already there (the
        model checks this before allocating; the kernel finds it after allocating and
        gives the pages back), ENOMEM. Blocked likewise carries `count`.

        Where nothing but steady reclaim happens the pages go in bulk (bulk.py), so a
        call costs O(runs touched), not O(pages). A step adds at most ADD_CHUNK pages, or
        one page with the reclaim rounds its charge needed (each batch a step of its
        own); only a driver running the call ALONE lets bulk take a whole stretch, its
        try_charge rounds folded in, as one step.
        """
        alone = (yield) is ALONE
        self._check_live(encl)
        if encl.initialized or count < 1 or offset_pages < 0 or \
                offset_pages + count > encl.size_pages:
            raise KernelError(errno.EINVAL, "bad ADD_PAGES request")
        if page_type not in (SgxPageType.REG, SgxPageType.TCS):
            raise KernelError(errno.EINVAL, f"cannot EADD a {page_type.name} page")
        pref = self.epc.preference(node)
        done = 0
        while done < count:
            i = offset_pages + done
            css = self.h.misc_of(pid)  # each page charges `current`'s cgroup as it is now
            nxt = encl.pages.next_start(i)
            if nxt is not None and nxt <= i:
                raise KernelError(errno.EBUSY, f"page {i} already added", count=done)
            if self.bulk:
                room = count - done if nxt is None else min(count - done, nxt - i)
                n = self.loader.add(encl, pid, css, i, room if alone else min(room, ADD_CHUNK),
                                    measured, page_type, pref, rounds=alone)
                if n:
                    done += n
                    yield
                    continue
            try:
                yield from self._add_one(encl, pid, css, i, measured, page_type, pref)
            except (KernelError, Blocked) as e:
                e.count = done
                raise
            done += 1
            yield
        return done

    def _add_one(self, encl: Enclave, pid: int, css: MiscCss, i: int, measured: bool,
                 page_type: SgxPageType, pref: list[int]) -> Steps[None]:
        """sgx_encl_add_page: EPC page first, then grow (maybe a VA page), then EADD."""
        nid = yield from self.allocator.alloc(css, pid, True, pref)
        with self.allocator.given_back_on_failure(nid, css):
            yield from self._grow(encl, css, pid, True, pref)
        self.encls["EADD"] += 1
        if measured:
            self.encls["EEXTEND"] += SGX_EEXTENDS_PER_PAGE
        self.insert_resident(encl, Run(i, i + 1, RunState.LRU, encl, node=nid, css=css,
                                        ptype=page_type))

    def init(self, encl: Enclave) -> None:
        """SGX_IOC_ENCLAVE_INIT (EINIT). EINVAL if already initialized. From now on the
        SECS follows its last resident child out of EPC, and SGX2 operations work."""
        self._check_live(encl)
        if encl.initialized:
            raise KernelError(errno.EINVAL, "enclave already initialized")
        self.encls["EINIT"] += 1
        encl.initialized = True

    def _check_live(self, encl: Enclave | Vepc) -> None:
        if encl.released:
            raise KernelError(errno.EBADF, f"{encl} was released")

    # -- faults ------------------------------------------------------------------------

    def fault(self, encl: Enclave, pid: int, page_index: int,
              node: int | None = None) -> Fault:
        """sgx_vma_fault: an access to `page_index` by `pid`.

        A resident page is just mapped; its accessed bit is set (the access that follows
        the fault), so the reclaimer will pass it over once. An evicted page is loaded
        back (ELDU, its SECS first if that was evicted too) on the no-reclaim path. An
        absent page of an initialized enclave is EAUGed (SGX2).

        Decision on the accessed bit: the kernel clears the PTE's A bit right after
        inserting it and the CPU sets it on the access that follows, so the model sets it
        on every fault and the reclaimer's age check clears it. Pages EADDed, or loaded
        by an EDMM ioctl, have no access behind them and start old. The service calls
        fault() for every page an enclave touches; a resident page costs nothing else."""
        if encl.released or not 0 <= page_index < encl.size_pages:
            return Fault.SIGBUS
        run = encl.pages.get(page_index)
        if run is None:
            return self.eaug(encl, pid, page_index, node)
        if run.state is RunState.EVICTED:
            try:
                self._eldu(encl, pid, page_index, self.epc.preference(node), young=True)
            except KernelError as e:
                return Fault.RETRY if e.errno == errno.EBUSY else Fault.SIGBUS
            return Fault.OK
        if not run.young:
            pages = encl.pages
            pages.cut(page_index)
            pages.cut(page_index + 1)
            run = pages.get(page_index)
            run.young = True
            pages.merge(run)
        return Fault.OK

    def touch_resident(self, encl: Enclave, first: int, count: int) -> int:
        """Accesses to the pages from `first` on that are resident, as many in a row as
        there are (at most `count`): each is mapped and its accessed bit set, exactly as
        fault() does for one resident page, but a run at a time. Returns how many; the
        page after them (evicted, absent or outside) needs fault()."""
        if encl.released or first < 0:
            return 0
        pages = encl.pages
        end = min(first + count, encl.size_pages)
        pos = first
        # Run by run, stopping at the first that is not resident: a list of every run
        # up to `end` would cost a fragmented range its whole length at each fault.
        while pos < end and (run := pages.get(pos)) is not None \
                and run.state is not RunState.EVICTED:
            pos = min(run.end, end)
        if pos == first:
            return 0
        for run in pages.isolate(first, pos):
            run.young = True
        for run in pages.overlapping(first, pos):
            pages.merge(pages.get(run.start))
        return pos - first

    @operation
    def touch(self, encl: Enclave, pid: int, first: int, count: int,
              node: int | None = None) -> Steps[Fault]:
        """The enclave accesses `count` pages from `first`, in order: each run of
        resident pages is a step (touch_resident), every other page goes through the
        fault handler, a step each. Returns Fault.OK, or Fault.SIGBUS at the first page
        that gets it. A fault answered RETRY waits (WAIT) and faults again; Blocked
        (the synchronous driver alone) carries the pages done as `count`.

        Faults on an evicted run whose no-reclaim allocations all succeed go in one step
        (at most ADD_CHUNK pages unless the driver runs the access alone or with the
        reclaimers only). With the reclaimers beside it (RECLAIMERS) and nothing else,
        whole cycles of faults that wait and the rounds that let them go on are one step
        (conveyor.py)."""
        token = yield
        pref = self.epc.preference(node)
        i, end = first, first + count
        while i < end:
            n = self.touch_resident(encl, i, end - i)
            if not n and self.bulk:
                n = self._fault_run(encl, pid, i, min(end - i, ADD_CHUNK) if token is None
                                    else end - i, pref)
            if not n:
                outcome = self.fault(encl, pid, i, node)
                if outcome is Fault.SIGBUS:
                    return outcome
                n = outcome is Fault.OK
                if not n and token is RECLAIMERS and self.bulk:
                    n = self.conveyor.fold(encl, pid, i, end - i, KSGXD, pref)
                if not n:
                    try:
                        token = yield WAIT
                    except Blocked as e:
                        e.count = i - first
                        raise
                    continue
            i += n
            token = yield
        return Fault.OK

    def _eldu(self, encl: Enclave, pid: int, i: int, pref: list[int], young: bool) -> None:
        """sgx_encl_load_page for an evicted child: SECS first if needed, then ELDU the
        page on the no-reclaim path; it goes back on the LRU tail. If the child's page
        cannot be had, the SECS stays loaded, as in the kernel."""
        css = self.h.misc_of(pid)
        self._load_secs(encl, css, pid, pref)
        nid = run_steps(self.allocator.alloc(css, pid, False, pref))
        self.encls["ELDU"] += 1
        pages = encl.pages
        pages.cut(i)
        pages.cut(i + 1)
        run = pages.get(i)
        self._leave_backing(encl, i, run.memcg)
        run.memcg = None
        encl.child_loaded()
        run.node, run.css, run.young = nid, css, young
        self.reclaim.lru_append(run)

    @operation
    def faults(self, handler: Callable[..., Fault], target: Enclave | Vepc, pid: int,
               first: int, count: int) -> Steps[Fault]:
        """Accesses to `count` pages of `target` from `first`, in order, each through
        `handler` (eaug, vepc_fault) as a step, waiting (WAIT) and faulting again while
        it answers RETRY. Returns Fault.OK, or Fault.SIGBUS at the first page that gets
        it; Blocked carries the pages done as `count`."""
        yield
        for i in range(first, first + count):
            while (outcome := handler(target, pid, i)) is Fault.RETRY:
                try:
                    yield WAIT
                except Blocked as e:
                    e.count = i - first
                    raise
            if outcome is Fault.SIGBUS:
                return outcome
            yield
        return Fault.OK

    def _fault_run(self, encl: Enclave, pid: int, first: int, most: int,
                   pref: list[int]) -> int:
        """Faults on the evicted pages from `first` (at most `most`, within one run) as
        far as their no-reclaim allocations all succeed, in one go: each loaded young,
        as fault() would. Returns how many (0: the page needs fault())."""
        run = encl.pages.get(first)
        if run is None or run.state is not RunState.EVICTED or encl.secs_css is None:
            return 0
        css = self.h.misc_of(pid)
        m = min(most, run.end - first, self.epc.free_total,
                self.h.misc.headroom(SGX_EPC, css) // PAGE_SIZE)
        if m > 0:
            self.eldu_run(encl, pid, first, m, pref, young=True)
        return max(m, 0)

    def eldu_run(self, encl: Enclave, pid: int, first: int, count: int,
                 pref: list[int], young: bool = False) -> None:
        """ELDU `count` evicted pages from `first`, all of one evicted run, as `count`
        no-reclaim loads in index order would (each onto the LRU tail, old unless
        `young`: loaded by faults), in one go.
        The caller guarantees what makes that exact: the SECS is resident, every charge
        fits under every limit and `count` pages are free (no allocation fails). Wakes
        ksgxd if some allocation left free pages low while something was reclaimable."""
        css = self.h.misc_of(pid)
        lru_was_empty = not self.reclaim.can_reclaim_global()
        self.h.misc.try_charge(SGX_EPC, css, count * PAGE_SIZE)
        memcg = self.load_run(encl, first, count, css, self.epc.take(pref, count), young)
        self.h.mem.memory_uncharge(memcg, count, encl.owner)
        for mc, n in encl.pcmd_drop(encl.pcmd_emptied(first, first + count)):
            self.h.mem.memory_uncharge(mc, n, encl.owner)
        # Allocation p (0-based) left free_total + count - p - 1 pages free, checked
        # before its page joined the LRU: only the last one can be the first below LOW.
        if self.epc.free_total < SGX_NR_LOW_PAGES and (count > 1 or not lru_was_empty):
            self.reclaim.wake_ksgxd()

    def load_run(self, encl: Enclave, first: int, count: int, css: MiscCss,
                 nodes: list[tuple[int, int]], young: bool) -> MemCss:
        """ELDU of the evicted pages [first, first+count), all of one run, onto the
        nodes [(nid, pages)] in order, each onto css's LRU tail: their VA slots are free,
        they are resident children again. Returns the memcg their contents pages were
        charged to; the backing store (and PCMD pages) is the caller's to uncharge."""
        pages = encl.pages
        pages.cut(first)
        pages.cut(first + count)
        memcg = pages.get(first).memcg
        self.encls["ELDU"] += count
        encl.slot_freed(count)
        encl.child_loaded(count)
        pos = first
        for nid, n in nodes:
            pages.cut(pos + n)
            run = pages.get(pos)
            run.memcg = None
            run.node, run.css, run.young = nid, css, young
            self.reclaim.lru_append(run)
            pos += n
        return memcg

    def _load_secs(self, encl: Enclave, css: MiscCss, pid: int, pref: list[int]) -> None:
        """sgx_encl_load_secs: ELDU the SECS (no reclaim) if it was written back."""
        if encl.secs_css is not None:
            return
        nid = run_steps(self.allocator.alloc(css, pid, False, pref))
        self.encls["ELDU"] += 1
        self._leave_backing(encl, encl.secs_index, encl.secs_memcg)
        encl.secs_loaded(nid, css)

    def _leave_backing(self, encl: Enclave, i: int, memcg: MemCss) -> None:
        """Index i was loaded back: free its contents page and its VA slot, and its PCMD
        page if that now serves nothing (__sgx_encl_eldu's truncations)."""
        encl.slot_freed()
        self.h.mem.memory_uncharge(memcg, 1, encl.owner)
        for mc, n in encl.pcmd_drop(encl.pcmd_emptied(i, i + 1)):
            self.h.mem.memory_uncharge(mc, n, encl.owner)

    def eaug(self, encl: Enclave, pid: int, page_index: int,
             node: int | None = None) -> Fault:
        """sgx_encl_eaug_page: add a pending REG page to an initialized enclave on
        first access. Allocation is no-reclaim (EBUSY → RETRY, else SIGBUS)."""
        if encl.released or not encl.initialized or not 0 <= page_index < encl.size_pages:
            return Fault.SIGBUS
        if encl.pages.get(page_index) is not None:
            return Fault.OK
        css = self.h.misc_of(pid)
        pref = self.epc.preference(node)
        try:
            self._load_secs(encl, css, pid, pref)
            nid = run_steps(self.allocator.alloc(css, pid, False, pref))
            try:
                run_steps(self._grow(encl, css, pid, False, pref))
            except KernelError:
                self.reclaim.free_epc(nid, css, 1, eremove=True)
                raise
        except KernelError as e:
            return Fault.RETRY if e.errno == errno.EBUSY else Fault.SIGBUS
        self.encls["EAUG"] += 1
        self.insert_resident(encl, Run(page_index, page_index + 1, RunState.LRU, encl,
                                        node=nid, css=css, young=True))
        return Fault.OK

    # -- release -------------------------------------------------------------------------

    def release(self, encl: Enclave) -> None:
        """sgx_encl_release: the last reference is gone. Every resident child is EREMOVEd
        and freed, the backing store with its charges goes, then the SECS and the VA pages.

        Pages a reclaim batch holds at this moment are left to it: it skips their write-
        back and frees them in its free step. (The kernel's reclaimer holds an enclave
        reference, so there the whole release waits for the batch; the model releases the
        rest at once, which changes only when the other pages come back. For the same
        reason the SECS is always freed here: the kernel's "only if no child is left"
        guard matters only for children it skipped, which the model never leaves.)
        """
        if encl.released:
            return
        uncharge: Counter[tuple[int, MiscCss]] = Counter()
        for run in encl.pages:
            if run.state is RunState.LRU:
                self.reclaim.lru_unlink(run)
                uncharge[(run.node, run.css)] += len(run)
            elif run.state is RunState.ISOLATED:
                run.state = RunState.ORPHAN
            else:
                self.h.mem.memory_uncharge(run.memcg, len(run), encl.owner)
        for span in encl.pcmd:
            self.h.mem.memory_uncharge(span.value, len(span), encl.owner)
        if encl.secs_css is not None:
            uncharge[(encl.secs_node, encl.secs_css)] += 1
        elif encl.secs_memcg is not None:
            self.h.mem.memory_uncharge(encl.secs_memcg, 1, encl.owner)
        uncharge.update(encl.va)
        for (nid, css), n in uncharge.items():
            self.reclaim.free_epc(nid, css, n, eremove=True)
        encl.emptied()
        del self.enclaves[encl.id]

    # -- vEPC ---------------------------------------------------------------------------

    def create_vepc(self, pid: int) -> Vepc:
        """open(/dev/sgx_vepc): an empty guest EPC; pages come with faults."""
        vepc = Vepc(self._next_id, pid)
        self._next_id += 1
        self.vepcs[vepc.id] = vepc
        return vepc

    def vepc_fault(self, vepc: Vepc, pid: int, page_index: int,
                   node: int | None = None) -> Fault:
        """sgx_vepc_fault: back a guest page with an EPC page charged to the VMM's
        cgroup, no reclaim. EBUSY → RETRY (VM_FAULT_RETRY); ENOMEM etc. → SIGBUS."""
        if vepc.released or page_index < 0:
            return Fault.SIGBUS
        if vepc.pages.get(page_index) is not None:
            return Fault.OK
        css = self.h.misc_of(pid)
        try:
            nid = run_steps(self.allocator.alloc(css, pid, False, self.epc.preference(node)))
        except KernelError as e:
            return Fault.RETRY if e.errno == errno.EBUSY else Fault.SIGBUS
        vepc.page_added(Run(page_index, page_index + 1, RunState.VEPC, None, node=nid, css=css))
        return Fault.OK

    def release_vepc(self, vepc: Vepc) -> None:
        """close(): EREMOVE and free every guest page."""
        if vepc.released:
            return
        for run in vepc.pages:
            self.reclaim.free_epc(run.node, run.css, len(run), eremove=True)
        vepc.emptied()
        del self.vepcs[vepc.id]

    # -- queries for the service and the fs ---------------------------------------------

    def lru_pages(self, css: MiscCss) -> int:
        """Reclaimable pages charged to css itself."""
        return epc_cg(css).lru.pages
