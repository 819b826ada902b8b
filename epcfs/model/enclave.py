"""Enclaves and vEPC instances: what they hold, and the states their pages go through.

Page states (an EPC page is in exactly one of them, check_invariants counts them):

- free: on its NUMA node's free list (Epc), uncharged.
- dirty: at boot, before ksgxd's EREMOVE made it free (Epc.sanitize).
- reclaimable: an enclave page that EADD, EAUG or ELDU put in EPC, charged to the misc
  css of the task that allocated it and linked on that css's LRU (RunState.LRU). The
  reclaimer takes pages from the LRU head, so the oldest go first.
- unreclaimable: charged but never on an LRU. VA pages (they hold the version slots of
  evicted pages, so evicting them would need yet more VA pages); the SECS (it anchors
  every child, so it leaves EPC only as a side effect, right after its last resident
  child of an initialized enclave is written back); vEPC guest pages (the guest owns
  them, the host cannot EWB them); and a child page an EDMM ioctl has unmarked. In the
  kernel the last one lasts only while the ioctl drops encl->lock to zap PTEs (REG →
  TCS, REMOVE_PAGES); each model step is atomic, so a page passes through that state
  within one call: it leaves the LRU and comes back at the tail (REG → TCS) or is freed.
- reclaim in progress: isolated by a reclaim batch (RunState.ISOLATED). Still the
  enclave's page: a fault is served from it (setting its accessed bit, so the batch's age
  check will put it back), but EDMM cannot unmark it (EBUSY → EAGAIN) and release has to
  leave it to the batch (RunState.ORPHAN), which frees it. After the batch's write-back
  step the enclave page is evicted and the EPC page, now holding nothing, stays with the
  batch (still charged) until the batch's free step.
- evicted: not in EPC at all. The encrypted contents sit in the backing file at the
  page's index, its PCMD in a backing page shared by 32 neighbouring indices, its version
  in a VA slot. A fault (ELDU) brings it back.

An enclave's children live in a RunMap of page indices; its SECS, VA pages and backing
bookkeeping (PCMD pages and who they are charged to) are kept here as counters.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from .constants import PCMDS_PER_PAGE, SGX_VA_SLOT_COUNT
from .runs import RunMap, RunState, Span

if TYPE_CHECKING:
    from .memory import MemCss
    from .misc import MiscCss


class Enclave:
    """One /dev/sgx_enclave instance (struct sgx_encl).

    `owner` is the pid that created it: the backing store it pays for is attributed to
    that process (the OOM killer's badness), and reclaim without a task (ksgxd, the
    per-cgroup workers) charges the backing to the owner's memcg, as the kernel charges
    the memcg of the enclave's first live mm. `page_cnt` is the kernel's counter that
    decides when a new VA page is needed (SECS + children ever added, minus removed).
    """

    def __init__(self, eid: int, owner: int, size_pages: int) -> None:
        self.id = eid
        self.owner = owner
        self.size_pages = size_pages
        self.initialized = False
        self.released = False
        self.pages = RunMap()
        self.nr_pages = 0  # children present (resident or evicted)
        self.nr_evicted = 0  # children in the backing store
        self.page_cnt = 0
        self.secs_child_cnt = 0  # children holding an EPC page (incl. isolated ones)
        self.secs_node = -1
        self.secs_css: MiscCss | None = None  # set while the SECS is in EPC
        self.secs_memcg: MemCss | None = None  # set while the SECS is in the backing
        self.va: Counter[tuple[int, MiscCss]] = Counter()  # VA pages by (node, css)
        self.va_pages = 0
        self.va_used = 0  # VA slots holding the version of an evicted page
        self.pcmd = RunMap()  # Spans of PCMD backing pages → the memcg charged for them
        self.nr_pcmd = 0

    def __repr__(self) -> str:
        return f"Enclave({self.id}, owner={self.owner}, {self.size_pages} pages)"

    # -- every change of the counters above, named for what happened ----------------

    def va_added(self, nid: int, css: MiscCss, count: int = 1) -> None:
        """EPA made `count` VA pages on node nid, charged to css."""
        self.va[(nid, css)] += count
        self.va_pages += count

    def grown(self, count: int = 1) -> None:
        """sgx_encl_grow ran for `count` new pages."""
        self.page_cnt += count

    def children_added(self, count: int) -> None:
        """`count` new child pages are resident (EADD, EAUG)."""
        self.nr_pages += count
        self.secs_child_cnt += count

    def children_written_back(self, count: int) -> None:
        """EWB of `count` children: each takes a VA slot and leaves EPC."""
        self.va_used += count
        self.secs_child_cnt -= count
        self.nr_evicted += count

    def child_loaded(self, count: int = 1) -> None:
        """ELDU of `count` evicted children (their VA slots are freed by slot_freed)."""
        self.nr_evicted -= count
        self.secs_child_cnt += count

    def slot_freed(self, count: int = 1) -> None:
        """`count` indices left the backing store: their VA slots are free again."""
        self.va_used -= count

    def secs_written_back(self, memcg: MemCss) -> MiscCss:
        """EWB of the SECS, its backing charged to memcg; returns the css it was charged
        to in EPC."""
        self.va_used += 1
        self.secs_memcg = memcg
        css, self.secs_css = self.secs_css, None
        return css

    def secs_loaded(self, nid: int, css: MiscCss) -> None:
        """The SECS is in EPC on node nid, charged to css (ECREATE, or ELDU)."""
        self.secs_node, self.secs_css = nid, css
        self.secs_memcg = None

    def child_removed(self, count: int = 1) -> None:
        """REMOVE_PAGES freed `count` children."""
        self.secs_child_cnt -= count
        self.nr_pages -= count
        self.page_cnt -= count

    def emptied(self) -> None:
        """Released: nothing left anywhere."""
        self.released = True
        self.pages = RunMap()
        self.pcmd = RunMap()
        self.va.clear()
        self.secs_css = self.secs_memcg = None
        self.nr_pages = self.nr_evicted = self.secs_child_cnt = self.nr_pcmd = 0
        self.va_pages = self.va_used = 0

    @property
    def secs_index(self) -> int:
        """The SECS's slot in the backing file: right after the enclave's pages."""
        return self.size_pages

    @property
    def va_slots(self) -> int:
        return self.va_pages * SGX_VA_SLOT_COUNT

    # -- PCMD pages: one per 32 consecutive backing indices holding evicted pages ------

    def pcmd_missing(self, a: int, b: int) -> list[tuple[int, int]]:
        """PCMD page ranges [g0, g1) that evicting indices [a, b) would have to allocate."""
        g0, g1 = a // PCMDS_PER_PAGE, (b - 1) // PCMDS_PER_PAGE + 1
        gaps = []
        pos = g0
        for span in self.pcmd.overlapping(g0, g1):
            if span.start > pos:
                gaps.append((pos, span.start))
            pos = max(pos, span.end)
        if pos < g1:
            gaps.append((pos, g1))
        return gaps

    def pcmd_add(self, gaps: list[tuple[int, int]], memcg: MemCss) -> None:
        for g0, g1 in gaps:
            span = Span(g0, g1, memcg)
            self.pcmd.insert(span)
            self.pcmd.merge(span)
            self.nr_pcmd += g1 - g0

    def _group_busy(self, g: int, a: int, b: int) -> bool:
        """Does PCMD page g serve an evicted page outside [a, b)?"""
        lo, hi = g * PCMDS_PER_PAGE, (g + 1) * PCMDS_PER_PAGE
        s = self.secs_index
        if self.secs_memcg is not None and lo <= s < hi and not a <= s < b:
            return True
        for run in self.pages.overlapping(lo, hi):
            if run.state is RunState.EVICTED and (max(run.start, lo) < a or min(run.end, hi) > b):
                return True
        return False

    def pcmd_emptied(self, a: int, b: int) -> list[tuple[int, int]]:
        """PCMD page ranges that serve nothing once indices [a, b) leave the backing."""
        g0, g1 = a // PCMDS_PER_PAGE, (b - 1) // PCMDS_PER_PAGE
        if g0 == g1:
            return [] if self._group_busy(g0, a, b) else [(g0, g0 + 1)]
        lo = g0 + 1 if self._group_busy(g0, a, b) else g0
        hi = g1 if self._group_busy(g1, a, b) else g1 + 1
        return [(lo, hi)] if lo < hi else []

    def pcmd_drop(self, ranges: list[tuple[int, int]]) -> list[tuple[MemCss, int]]:
        """Forget PCMD pages; returns what to uncharge from which memcg."""
        out = []
        for g0, g1 in ranges:
            for span in self.pcmd.isolate(g0, g1):
                out.append((span.value, len(span)))
                self.pcmd.remove(span)
                self.nr_pcmd -= len(span)
        return out


class Vepc:
    """One /dev/sgx_vepc instance: guest EPC pages, charged to the VMM and never reclaimed.

    `pages` maps guest page indices to runs (RunState.VEPC) of node and css."""

    def __init__(self, vid: int, owner: int) -> None:
        self.id = vid
        self.owner = owner
        self.pages = RunMap()
        self.nr_pages = 0
        self.released = False

    def __repr__(self) -> str:
        return f"Vepc({self.id}, owner={self.owner}, {self.nr_pages} pages)"

    def page_added(self, run) -> None:
        """A guest page got its EPC page (a one-page run)."""
        self.pages.insert(run)
        self.pages.merge(run)
        self.nr_pages += 1

    def emptied(self) -> None:
        """Released: every guest page gone."""
        self.pages = RunMap()
        self.nr_pages = 0
        self.released = True
