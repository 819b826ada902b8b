"""EPC page allocation with its misc charge (sgx_alloc_epc_page and
sgx_cgroup_try_charge), over one Sgx's free lists and reclaim (Sgx.allocator).

Every EPC page the model hands out passes through here: a SECS, a VA page, an EADDed,
EAUGed or loaded-back child, a vEPC page. The charge comes first, then a free page;
either may need reclaim, which on the reclaim path runs synchronous rounds (steps of
the allocation) and on the no-reclaim path (faults) answers EBUSY and leaves the work
to the cgroup's work item or ksgxd.
"""

from __future__ import annotations

import contextlib
import errno
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .constants import PAGE_SIZE, SGX_EPC
from .engine import WAIT, Steps
from .epc_cgroup import lru_empty
from .errors import Blocked, KernelError

if TYPE_CHECKING:
    from .cgroup import Hierarchy
    from .epc import Epc
    from .misc import MiscCss
    from .reclaim import Reclaim


class Allocator:
    """Allocation and charge of EPC pages for one Sgx."""

    def __init__(self, h: Hierarchy, epc: Epc, reclaim: Reclaim) -> None:
        self.h = h
        self.epc = epc
        self.reclaim = reclaim
        # Between the steps of an operation some pages and charges belong to no page
        # map yet; the invariant check counts them from here.
        self.waiting: Counter[MiscCss] = Counter()
        """Charges taken by allocations still waiting (in a global round) for a page."""
        self.held: Counter[tuple[int, MiscCss]] = Counter()
        """Pages, by (node, css), that an operation in progress allocated and will place
        after its next allocation (given_back_on_failure's window)."""

    def alloc(self, css: MiscCss, pid: int, reclaim: bool, pref: list[int]) -> Steps[int]:
        """sgx_alloc_epc_page: charge css one page and take a free page; returns its node.

        KernelError(ENOMEM) when nothing is reclaimable, EBUSY on the no-reclaim path (a
        no-reclaim allocation never yields: run it with `run`). With reclaim, a failed
        charge or an empty free list runs a synchronous round; a round that freed nothing
        because backing charges failed waits (WAIT) for the OOM victim, as the kernel
        spins in cond_resched. Whatever way it fails, the charge is given back."""
        yield from self.charge(css, pid, reclaim)
        self.waiting[css] += 1
        try:
            while True:
                nid = self.epc.take_one(pref)
                if nid is not None:
                    break
                if not self.reclaim.can_reclaim_global():
                    raise KernelError(errno.ENOMEM, "no free EPC page and nothing reclaimable")
                if not reclaim:
                    raise KernelError(errno.EBUSY, "no free EPC page")
                done = yield from self.reclaim.reclaim_global.steps(pid)
                if not done.freed and done.failed:
                    yield WAIT
        except BaseException:  # KernelError, Blocked, or the caller went away
            self.h.misc_uncharge(SGX_EPC, css, PAGE_SIZE)
            raise
        finally:
            self.waiting[css] -= 1
            if not self.waiting[css]:
                del self.waiting[css]
        self.reclaim.maybe_wake_ksgxd()
        return nid

    def charge(self, css: MiscCss, pid: int, reclaim: bool) -> Steps[None]:
        """sgx_cgroup_try_charge: retry with synchronous reclaim of css's subtree."""
        while True:
            try:
                self.h.misc.try_charge(SGX_EPC, css, PAGE_SIZE)
                return
            except KernelError:
                pass
            if lru_empty(css):
                raise KernelError(errno.ENOMEM, f"nothing reclaimable under {css.cgroup.path}")
            if not reclaim:
                self.reclaim.queue_work(css)
                raise KernelError(errno.EBUSY, f"{css.cgroup.path} at its EPC limit")
            done = yield from self.reclaim.cgroup_reclaim_pages.steps(css, pid, 1)
            if not done.freed and done.failed:
                yield WAIT

    @contextlib.contextmanager
    def given_back_on_failure(self, nid: int, css: MiscCss) -> Iterator[None]:
        """A page just allocated goes back to its node if the next allocation fails:
        EREMOVEd after an error (the kernel had used it), as it was when merely Blocked
        (the model gives it back instead of holding it while the kernel would spin).
        Meanwhile the page counts as `held`; the caller places it right after."""
        self.held[(nid, css)] += 1
        try:
            yield
        except KernelError:
            self.reclaim.free_epc(nid, css, 1, eremove=True)
            raise
        except (Blocked, GeneratorExit):
            self.reclaim.free_epc(nid, css, 1, eremove=False)
            raise
        finally:
            self.held[(nid, css)] -= 1
            if not self.held[(nid, css)]:
                del self.held[(nid, css)]
