"""The SGX2 EDMM ioctls (SGX_IOC_ENCLAVE_RESTRICT_PERMISSIONS, MODIFY_TYPES,
REMOVE_PAGES) and EACCEPT from inside the enclave, over the enclaves of one Sgx.

Each ioctl is an engine operation (engine.py): per page sgx_reclaim_direct, then the
page loaded if evicted and changed, a step each, so the service paces them and other
tasks run between pages. Where the state makes the pages of a run behave alike (see
Edmm._edmm_each) a step covers the run.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import TYPE_CHECKING

from .constants import ADD_CHUNK, PAGE_SIZE, SGX_EPC, SGX_NR_LOW_PAGES, SgxPageType
from .conveyor import DIRECT
from .engine import ALONE, Steps, operation
from .epc_cgroup import reclaim_threshold
from .errors import KernelError
from .runs import Run, RunState

if TYPE_CHECKING:
    from .enclave import Enclave
    from .misc import MiscCss
    from .sgx import Sgx


class Edmm:
    """The EDMM operations on `sgx`'s enclaves (Sgx.edmm)."""

    def __init__(self, sgx: Sgx) -> None:
        self.sgx = sgx

    def check_edmm(self, encl: Enclave, first: int, count: int) -> None:
        """sgx_ioc_sgx2_ready + sgx_validate_offset_length. The simulated CPU has SGX2
        (no ENODEV); the ioctls' own argument checks (reserved bits, result/count fields
        non-zero, permission combinations) are the enclave server's, before calling."""
        self.sgx._check_live(encl)
        if not encl.initialized:
            raise KernelError(errno.EINVAL, "enclave not initialized")
        if count < 1 or first < 0 or first + count > encl.size_pages:
            raise KernelError(errno.EINVAL, "range outside the enclave")

    def _edmm_each(self, encl: Enclave, pid: int, first: int, count: int,
                   node: int | None, pages: Callable[[int, int, Run], None],
                   resident_after: bool = True) -> Steps[int]:
        """The loop of every EDMM ioctl: check the range, then per page direct reclaim,
        sgx_encl_load_page (ELDU on the no-reclaim path; EBUSY becomes EAGAIN, any other
        failure EFAULT) and the change, a step each. A failure carries the pages done as
        `count`, which the ioctls report back; success returns `count`.

        Runs, not pages: once direct reclaim has nothing to do (the caller's cgroup is
        not near its limit, free pages are not low) and page i is on an LRU, the rest of
        its run up to the range's end is alike and changed in one step by
        `pages(i, n, run)`, which checks the run as it would its first page. Equivalent
        to page by page, because none of these changes allocates: usage only falls and
        free pages only grow, so direct reclaim would stay idle for every page of it.
        Likewise for evicted pages, when `resident_after` (the change keeps the page):
        after page i was loaded and changed, the rest of its evicted run is loaded and
        changed in one step (Sgx.eldu_run) for as long as direct reclaim would stay idle
        and every no-reclaim allocation succeed: usage stays below the css's reclaim
        threshold, free pages at SGX_NR_LOW_PAGES or more before each page. Page i's
        success tells the rest's, which share its attributes. With a driver that is
        not ALONE such a step loads at most ADD_CHUNK pages; with one that is, the
        cycles beyond it (a round of direct reclaim, 16 loads) are folded too
        (conveyor.py, DIRECT).
        Sgx(bulk=False) goes page by page (tests compare the two)."""
        self.check_edmm(encl, first, count)
        pref = self.sgx.epc.preference(node)
        reclaim = self.sgx.reclaim
        c = 0
        alone = False
        while c < count:
            i = first + c
            css = self.sgx.h.misc_of(pid)  # `current`'s cgroup now: it may have moved
            try:
                yield from reclaim.reclaim_direct.steps(pid)
                run = encl.pages.get(i)
                if run is None:
                    raise KernelError(errno.EFAULT, f"no page {i}")
                evicted_end = i  # the end of the evicted run page i was loaded from
                if run.state is RunState.EVICTED:
                    evicted_end = min(run.end, first + count)
                    try:
                        self.sgx._eldu(encl, pid, i, pref, young=False)
                    except KernelError as e:
                        err = errno.EAGAIN if e.errno == errno.EBUSY else errno.EFAULT
                        raise KernelError(err, f"cannot load page {i}: {e.why}") from e
                    run = encl.pages.get(i)
                n = 1
                if self.sgx.bulk and run.state is RunState.LRU and \
                        not reclaim.should_reclaim(css) and \
                        not reclaim.should_reclaim_global(SGX_NR_LOW_PAGES):
                    n = min(run.end, first + count) - i
                pages(i, n, run)
                if self.sgx.bulk and not resident_after and i + n < evicted_end:
                    n += self._remove_evicted(encl, css, i + n, min(
                        evicted_end - i - n, count if alone else ADD_CHUNK))
                if self.sgx.bulk and resident_after and i + n < evicted_end:
                    n += self._eldu_rest(encl, pid, css, i + n, min(
                        evicted_end - i - n, count if alone else ADD_CHUNK), pref, pages)
                    if alone and i + n < evicted_end:
                        m = self.sgx.conveyor.fold(encl, pid, i + n, evicted_end - i - n,
                                                   DIRECT, pref)
                        self._change_loaded(encl, i + n, m, pages)
                        n += m
            except KernelError as e:
                e.count = c
                raise
            c += n
            alone = (yield) is ALONE
        return count

    def _eldu_rest(self, encl: Enclave, pid: int, css: MiscCss, j: int, most: int,
                   pref: list[int], pages: Callable[[int, int, Run], None]) -> int:
        """Load and change up to `most` evicted pages from j, all alike, in one go, if
        page by page neither direct reclaim nor an allocation failure could happen on
        the way (see _edmm_each). Returns how many (0: none qualified)."""
        if encl.secs_css is None:
            return 0
        # Page p sees free_total - p free pages and usage + p at every level: both must
        # stay clear of direct reclaim's triggers, and every charge must fit.
        m = min(most, self.sgx.epc.free_total - SGX_NR_LOW_PAGES + 1,
                reclaim_threshold(css) - css.res[SGX_EPC].usage // PAGE_SIZE,
                self.sgx.h.misc.headroom(SGX_EPC, css) // PAGE_SIZE)
        if m <= 0:
            return 0
        self.sgx.eldu_run(encl, pid, j, m, pref)
        self._change_loaded(encl, j, m, pages)
        return m

    def _remove_evicted(self, encl: Enclave, css: MiscCss, j: int, most: int) -> int:
        """REMOVE_PAGES over the evicted pages [j, j+most), the rest of the run whose
        first page was just loaded and removed, in one go; returns how many (0: none).

        Each page is loaded (ELDU) and at once EREMOVEd and freed, so free pages and
        usage end every page where they began: if direct reclaim was idle before the
        first (free pages at SGX_NR_LOW_PAGES or more, usage below the threshold) it
        stays idle for all, and each allocation succeeds as the first did, on the same
        node, its transient charge raising no peak the first did not."""
        sgx = self.sgx
        if sgx.epc.free_total < SGX_NR_LOW_PAGES or sgx.reclaim.should_reclaim(css) \
                or encl.secs_css is None:
            return 0
        pages = encl.pages
        pages.cut(j)
        pages.cut(j + most)
        run = pages.get(j)
        for leaf in ("ELDU", "EMODPR", "EREMOVE"):
            sgx.encls[leaf] += most
        encl.slot_freed(most)
        sgx.h.mem.memory_uncharge(run.memcg, most, encl.owner)
        for memcg, n in encl.pcmd_drop(encl.pcmd_emptied(j, j + most)):
            sgx.h.mem.memory_uncharge(memcg, n, encl.owner)
        pages.remove(run)
        encl.child_loaded(most)
        encl.child_removed(most)
        return most

    def _change_loaded(self, encl: Enclave, j: int, m: int,
                       pages: Callable[[int, int, Run], None]) -> None:
        """The ioctl's change over pages [j, j+m) just loaded, run by run."""
        pos = j
        while pos < j + m:
            piece = encl.pages.get(pos)
            n = min(piece.end, j + m) - pos
            pages(pos, n, piece)
            pos += n

    def _set_pages(self, encl: Enclave, i: int, n: int, **attrs) -> None:
        """Pages [i, i+n), within one run, take new attributes."""
        pages = encl.pages
        pages.cut(i)
        pages.cut(i + n)
        run = pages.get(i)
        for name, value in attrs.items():
            setattr(run, name, value)
        pages.merge(run)

    @operation
    def restrict_permissions(self, encl: Enclave, pid: int, first: int, count: int,
                             node: int | None = None) -> Steps[int]:
        """SGX_IOC_ENCLAVE_RESTRICT_PERMISSIONS: EMODPR + ETRACK per page. EINVAL on a
        non-REG page (TCS permissions cannot be restricted). Returns pages done; errors
        carry `count`. Permission bits themselves are the enclave server's business.
        Like every EDMM ioctl it runs sgx_reclaim_direct before each page."""

        def page(i: int, n: int, run: Run) -> None:
            if run.ptype != SgxPageType.REG:
                raise KernelError(errno.EINVAL, f"page {i} is {run.ptype.name}")
            self.sgx.encls["EMODPR"] += n
            self.sgx.encls["ETRACK"] += n

        return (yield from self._edmm_each(encl, pid, first, count, node, page))

    @operation
    def modify_types(self, encl: Enclave, pid: int, first: int, count: int,
                     page_type: SgxPageType, node: int | None = None) -> Steps[int]:
        """SGX_IOC_ENCLAVE_MODIFY_TYPES to TCS or TRIM: EMODT + ETRACK per page.

        REG → TCS or TRIM, TCS → TRIM; anything else EINVAL. REG → TCS unmarks the page
        while its PTEs are zapped and marks it again (it moves to the LRU tail); a page
        the reclaimer holds cannot be unmarked: EAGAIN. The model keeps no page
        permissions, so the kernel's EPERM for REG → TCS on a page added without RW is
        the enclave server's to give."""
        if page_type not in (SgxPageType.TCS, SgxPageType.TRIM):
            self.sgx._check_live(encl)
            raise KernelError(errno.EINVAL, f"cannot change pages to {page_type!r}")

        def page(i: int, n: int, run: Run) -> None:
            if not (run.ptype == SgxPageType.REG or
                    (run.ptype == SgxPageType.TCS and page_type == SgxPageType.TRIM)):
                raise KernelError(errno.EINVAL, f"page {i} is {run.ptype.name}")
            if run.ptype == SgxPageType.REG and page_type == SgxPageType.TCS:
                if run.state is not RunState.LRU:
                    raise KernelError(errno.EAGAIN, f"page {i} is being reclaimed")
                self._requeue(encl, i, n)
            self.sgx.encls["EMODT"] += n
            self.sgx.encls["ETRACK"] += n
            self._set_pages(encl, i, n, ptype=page_type, accepted=False)

        return (yield from self._edmm_each(encl, pid, first, count, node, page))

    def _requeue(self, encl: Enclave, i: int, n: int) -> None:
        """Unmark then mark pages [i, i+n) (within one run) reclaimable again: they move
        to their LRU's tail, in order."""
        pages = encl.pages
        pages.cut(i)
        pages.cut(i + n)
        run = pages.get(i)
        self.sgx.reclaim.lru_unlink(run)
        self.sgx.reclaim.lru_append(run)

    def accept(self, encl: Enclave, first: int, count: int) -> int:
        """EACCEPT from inside the enclave (ENCLU, no syscall): acknowledges TRIMmed pages
        so REMOVE_PAGES may remove them. The service faults a page in before accepting
        it, as the enclave's access would. Returns the pages present in the range."""
        self.sgx._check_live(encl)
        pages = encl.pages
        present = 0
        for run in pages.isolate(first, first + count):
            present += len(run)
            if run.ptype == SgxPageType.TRIM:
                run.accepted = True
        for run in pages.overlapping(first, first + count):
            pages.merge(pages.get(run.start))
        self.sgx.encls["EACCEPT"] += present
        return present

    @operation
    def remove_pages(self, encl: Enclave, pid: int, first: int, count: int,
                     node: int | None = None) -> Steps[int]:
        """SGX_IOC_ENCLAVE_REMOVE_PAGES: only TRIM pages the enclave has EACCEPTed
        (else EPERM: the kernel's EMODPR probe tells); a page the reclaimer holds gives
        EBUSY. Each page is EREMOVEd and freed; VA pages stay (page_cnt shrinks)."""

        def page(i: int, n: int, run: Run) -> None:
            if run.ptype != SgxPageType.TRIM:
                raise KernelError(errno.EPERM, f"page {i} is not trimmed")
            if not run.accepted:
                self.sgx.encls["EMODPR"] += 1
                raise KernelError(errno.EPERM, f"page {i} not accepted")
            self.sgx.encls["EMODPR"] += n
            if run.state is not RunState.LRU:
                raise KernelError(errno.EBUSY, f"page {i} is being reclaimed")
            pages = encl.pages
            pages.cut(i)
            pages.cut(i + n)
            run = pages.get(i)
            self.sgx.reclaim.lru_unlink(run)
            pages.remove(run)
            self.sgx.reclaim.free_epc(run.node, run.css, n, eremove=True)
            encl.child_removed(n)

        return (yield from self._edmm_each(encl, pid, first, count, node, page,
                                           resident_after=False))
