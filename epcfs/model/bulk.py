"""ADD_PAGES in bulk: many pages in one step, with exactly the result page-by-page gives.

Loading an oversubscribed enclave is a long stretch in which nothing interesting
happens: each page is charged and allocated; whenever the cgroup's tightest level (a
misc.max, or the capacity) is full, the charge fails once, a synchronous round takes
SGX_NR_TO_SCAN pages off the head of the charging cgroup's LRU and writes them back,
and the next SGX_NR_TO_SCAN allocations succeed. Per page that is O(1) but the page
count is what a 64 GiB EPC has 16 Mi of. So when the state guarantees that stretch, it
is computed in closed form: k failed charges and rounds, R = 16·k pages evicted from the
LRU head, A = pages + VA pages allocated, the nodes each allocation gets from the free
lists' greedy walk, and every counter (misc usage, peaks, events; memcg; VA slots; PCMD
pages; ENCLS leaves; ksgxd's wake-up).

The stretch is taken only while each of these holds, and stops short of the first
round that would break one (the page-by-page path then handles that page):

- no level of the charging css is over its limit already, and the free lists cannot run
  dry before the charge fails (free ≥ headroom), so every round is the try_charge one;
- every reclaimable page in the charging css's subtree is on its own LRU (the fairness
  iterator then always ends on it), and the rounds take only pages that were on that
  LRU before the step, always leaving at least one there;
- none of those pages was accessed since the last scan (the age check would keep it);
- their backing store fits under the caller's memcg limits with room to spare (two
  pages per page: contents, and at most a PCMD page), so no charge can fail;
- no initialized enclave loses its last resident child (that would write its SECS
  back inside the round).

tests/model compare this path with page-by-page on random programs.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from .constants import (
    PAGE_SIZE,
    SGX_EEXTENDS_PER_PAGE,
    SGX_EPC,
    SGX_NR_LOW_PAGES,
    SGX_NR_TO_SCAN,
    SGX_VA_SLOT_COUNT,
    SgxPageType,
)
from .epc_cgroup import epc_cg, next_descendant_pre
from .runs import Run, RunState

if TYPE_CHECKING:
    from .enclave import Enclave
    from .misc import MiscCss
    from .sgx import Sgx


def va_pages_for(page_cnt: int, pages: int) -> int:
    """VA pages sgx_encl_grow allocates while page_cnt goes from page_cnt to +pages:
    one each time it is a multiple of SGX_VA_SLOT_COUNT before the increment."""
    return ((page_cnt + pages + SGX_VA_SLOT_COUNT - 1) // SGX_VA_SLOT_COUNT
            - (page_cnt + SGX_VA_SLOT_COUNT - 1) // SGX_VA_SLOT_COUNT)


def rounds_for(allocs: int, headroom: int) -> int:
    """Failed charges (each followed by one round of SGX_NR_TO_SCAN) before `allocs`
    allocations fit under `headroom` free charges."""
    return max(0, -(-(allocs - headroom) // SGX_NR_TO_SCAN))


class BulkLoader:
    """The bulk half of one Sgx's add_pages (Sgx.loader)."""

    def __init__(self, sgx: Sgx) -> None:
        self.sgx = sgx

    def add(self, encl: Enclave, pid: int, css: MiscCss, first: int, n: int,
                  measured: bool, ptype: SgxPageType, pref: list[int], *,
                  rounds: bool) -> int:
        """Add up to n absent pages from `first` in one step; returns how many (0: the
        page-by-page path must take the next page). Only with `rounds` (no other task
        runs between the caller's steps) may the step include try_charge rounds."""
        cap = self.sgx.h.misc.capacity[SGX_EPC] // PAGE_SIZE
        chain = list(css.ancestors())
        usage = [level.res[SGX_EPC].usage // PAGE_SIZE for level in chain]
        heads = [min(level.res[SGX_EPC].max // PAGE_SIZE, cap) - u
                 for level, u in zip(chain, usage, strict=True)]
        headroom = min(heads)
        if headroom < 0:
            return 0
        free = self.sgx.epc.free_total
        c0 = encl.page_cnt

        def allocs(pages: int) -> int:
            return pages + va_pages_for(c0, pages)

        k_max = 0
        if rounds and free >= headroom and allocs(n) > headroom:
            k_max = self._rounds_possible(css, pid, rounds_for(allocs(n), headroom))
        budget = headroom + SGX_NR_TO_SCAN * k_max if k_max else min(headroom, free)
        lo, hi = 0, n  # the most pages whose allocations fit the budget
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if allocs(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        pages = lo
        if not pages:
            return 0
        total = allocs(pages)
        k = rounds_for(total, headroom)
        evict = SGX_NR_TO_SCAN * k
        lru_before = epc_cg(self.sgx.h.root.misc).subtree_lru
        reclaim = self.sgx.reclaim
        if k:
            last = total - headroom - SGX_NR_TO_SCAN * (k - 1)
            segs, free_after = self.sgx.epc.plan(pref, headroom, reclaim.head_nodes(css, evict),
                                                 SGX_NR_TO_SCAN, k, last)
        else:
            segs, free_after = self.sgx.epc.plan(pref, total, [], SGX_NR_TO_SCAN, 0, 0)
        for backing in reclaim.write_back_head(css, evict, pid):
            charged = self.sgx.h.mem.memory_try_charge(
                backing.memcg, backing.pages, owner=backing.encl.owner, current=pid)
            assert charged, "bulk eviction overran the memcg room it checked"
        self.sgx.epc.set_free(free_after)
        self._commit_misc(css, chain, usage, heads.index(headroom), headroom, total, evict, k)
        page_runs, va_nodes = self._assign(segs, c0, pages)
        for lo_i, hi_i, nid in page_runs:
            self.sgx.insert_resident(encl, Run(first + lo_i, first + hi_i, RunState.LRU, encl,
                                            node=nid, css=css, ptype=ptype))
        for nid, cnt in va_nodes.items():
            encl.va_added(nid, css, cnt)
            self.sgx.encls["EPA"] += cnt
        encl.grown(pages)
        self.sgx.encls["EADD"] += pages
        if measured:
            self.sgx.encls["EEXTEND"] += SGX_EEXTENDS_PER_PAGE * pages
        if k:
            epc_cg(css).next_cg = next_descendant_pre(css, css)
            last = total - headroom - SGX_NR_TO_SCAN * (k - 1)
            lowest = free - headroom + SGX_NR_TO_SCAN - last
            if headroom or k > 1:
                lowest = min(lowest, free - headroom)
            if lowest < SGX_NR_LOW_PAGES:
                self.sgx.reclaim.wake_ksgxd()
        elif free - total < SGX_NR_LOW_PAGES and lru_before + pages - 1 > 0:
            self.sgx.reclaim.wake_ksgxd()
        return pages

    def _rounds_possible(self, css: MiscCss, pid: int, wanted: int) -> int:
        """How many of the `wanted` try_charge rounds can be taken in closed form."""
        state = epc_cg(css)
        if state.subtree_lru != state.lru.pages:
            return 0
        k = min(wanted, (state.lru.pages - 1) // SGX_NR_TO_SCAN)
        memcg = self.sgx.h.memcg_of(pid)
        if not memcg.is_root:
            room = min(level.max - level.usage for level in memcg.ancestors())
            k = min(k, max(0, room) // (2 * SGX_NR_TO_SCAN))
        pos = 0
        taken: Counter[Enclave] = Counter()
        for run in state.lru:
            if pos >= SGX_NR_TO_SCAN * k:
                break
            if run.young:
                k = min(k, pos // SGX_NR_TO_SCAN)
                break
            take = min(len(run), SGX_NR_TO_SCAN * k - pos)
            encl = run.encl
            if encl.initialized and taken[encl] + take >= encl.secs_child_cnt:
                last_child = pos + encl.secs_child_cnt - taken[encl] - 1
                k = min(k, last_child // SGX_NR_TO_SCAN)
            taken[encl] += take
            pos += take
        return k

    def _commit_misc(self, css: MiscCss, chain: list[MiscCss], usage: list[int],
                     fail_at: int, headroom: int, total: int, evict: int, k: int) -> None:
        """Misc counters after `total` charges, `evict` uncharges and k failed charges
        that stopped at chain[fail_at]: usage, peaks (the transient ones of the failed
        walks included) and events."""
        net = (total - evict) * PAGE_SIZE
        if net > 0:
            self.sgx.h.misc.try_charge(SGX_EPC, css, net)
        elif net < 0:
            self.sgx.h.misc_uncharge(SGX_EPC, css, -net)
        peak = headroom if k else total
        for i, (level, u) in enumerate(zip(chain, usage, strict=True)):
            res = level.res[SGX_EPC]
            top = u + peak + (1 if k and i < fail_at else 0)
            res.watermark = max(res.watermark, top * PAGE_SIZE)
        if k:
            self.sgx.h.misc.count_failure(SGX_EPC, chain[fail_at], k)

    @staticmethod
    def _assign(segs: list[tuple[int, int]], c0: int,
                pages: int) -> tuple[list[tuple[int, int, int]], Counter[int]]:
        """Split the allocation stream (page i, then its VA page when page_cnt c0+i is a
        multiple of 512) into page runs [(lo, hi, nid)] and VA pages per node."""

        def pages_before(j: int) -> int:
            """How many pages have their own allocation among the first j."""
            lo, hi = 0, pages
            while lo < hi:
                mid = (lo + hi) // 2
                if mid + va_pages_for(c0, mid) < j:
                    lo = mid + 1
                else:
                    hi = mid
            return lo

        runs: list[tuple[int, int, int]] = []
        va: Counter[int] = Counter()
        j = 0
        for nid, count in segs:
            p0, p1 = pages_before(j), pages_before(j + count)
            if p1 > p0:
                if runs and runs[-1][2] == nid and runs[-1][1] == p0:
                    runs[-1] = (runs[-1][0], p1, nid)
                else:
                    runs.append((p0, p1, nid))
            if count > p1 - p0:
                va[nid] += count - (p1 - p0)
            j += count
        assert pages_before(j) == pages, "allocation stream does not match the pages"
        return runs, va
