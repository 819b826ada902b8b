"""Loading an evicted stretch back while reclaim makes room at the LRU head, in closed form.

An EDMM ioctl over an evicted heap, or an enclave walking a heap bigger than the EPC,
settles into a cycle: reclaim writes back the pages at the LRU head, the EPC pages it
frees take the next evicted pages, and those join the LRU tail. Two schedules:

- DIRECT, the EDMM ioctls' loop (per page sgx_reclaim_direct, then the load): before a
  page SGX_NR_LOW_PAGES - 1 pages are free, so its direct reclaim runs one global round
  of one batch; 16 pages are loaded and the free count is back where it was.
- KSGXD, an enclave's faults while the reclaimers run whenever a fault has to wait: the
  EPC is full, a fault's no-reclaim allocation fails (EBUSY: the access retries), the
  work item that failure queued finds its cgroup far from its limit, ksgxd runs rounds
  until SGX_NR_HIGH_PAGES are free, and that many faults load that many pages.

Per page each is O(1), but a 64 GiB EPC has 16 Mi pages, so K whole cycles are taken as
one step: the first P·K LRU pages written back, P·K pages loaded, the node each load
gets (Epc.plan), and every counter, memory.peak included. The step is taken only while
the state guarantees that every cycle is alike (Conveyor.cycles checks):

- one misc css holds every reclaimable page, and it is the loader's: every global round
  is one batch off its LRU, and the loaded pages queue behind the pages still to go;
- the pages to write back are the loader's enclave's, none of them young, all on the
  LRU before the step; enough children stay resident that its SECS never follows them;
- the pages to load are one evicted run, backed by the memcg the write-back charges
  (the reclaiming task's for DIRECT, the enclave owner's for KSGXD) with room for the
  highest point of every charge; a PCMD page serving both sides is written back to
  no later than its last load (Conveyor._first_unlike);
- the loader's cgroup is not near its limit (its own reclaim stays idle) and the SECS
  is resident.

memory.peak is the one counter that depends on the order inside the step. The backing
store rises by a cycle's write-back and falls by its loads; its highest point is found
from the positions where PCMD pages come and go, which are arithmetic progressions of
step PCMDS_PER_PAGE, so a handful of cycles near their ends decide the maximum.

tests/model/test_conveyor.py compares both folds with page by page on random states.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .constants import (
    PAGE_SIZE,
    PCMDS_PER_PAGE,
    SGX_EPC,
    SGX_NR_HIGH_PAGES,
    SGX_NR_LOW_PAGES,
    SGX_NR_TO_SCAN,
)
from .epc_cgroup import epc_cg, next_descendant_pre
from .runs import RunState

if TYPE_CHECKING:
    from .enclave import Enclave
    from .sgx import Sgx


@dataclass(frozen=True)
class Schedule:
    """Who makes room, and when, while a stretch of evicted pages is loaded."""

    per: int
    """Pages written back, then loaded, per cycle."""
    free: int
    """Free EPC pages at a cycle's start."""
    young: bool
    """The loaded pages' accessed bit (a fault sets it, an EDMM load does not)."""
    caller_pays: bool
    """Backing charged to the caller's memcg (direct reclaim), else the owner's."""


DIRECT = Schedule(SGX_NR_TO_SCAN, SGX_NR_LOW_PAGES - 1, young=False, caller_pays=True)
KSGXD = Schedule(-(-SGX_NR_HIGH_PAGES // SGX_NR_TO_SCAN) * SGX_NR_TO_SCAN, 0, young=True,
                 caller_pays=False)

Progression = tuple[int, int]
"""Positions first, first + PCMDS_PER_PAGE, ... (count of them): where PCMD pages are
charged (in write-back order) or freed (in load order)."""


def _below(events: list[Progression], x: int) -> int:
    """How many event positions are below x."""
    total = 0
    for first, count in events:
        if x > first:
            total += min(count, -(-(x - first) // PCMDS_PER_PAGE))
    return total


def highest(per: int, cycles: int, charged: list[Progression],
            freed: list[Progression]) -> int:
    """The backing store's highest point above where it started, over `cycles` cycles
    of `per` pages written back (each a page, plus a PCMD page at `charged`'s
    positions) and then `per` pages loaded (each a page, minus one at `freed`'s).

    After cycle t's write-back it stands at per + charged(per·(t+1)) - freed(per·t).
    Between the ends of the progressions both counts grow alike every two cycles, so
    the maximum is at most two cycles from an end, or at the first or last cycle."""
    candidates = {0, 1, 2, cycles - 3, cycles - 2, cycles - 1}
    for events, shift in ((charged, 1), (freed, 0)):
        for first, count in events:
            for end in (first, first + PCMDS_PER_PAGE * (count - 1)):
                t0 = end // per - shift
                candidates.update(range(t0 - 1, t0 + 3))
    return max(per + _below(charged, per * (t + 1)) - _below(freed, per * t)
               for t in candidates if 0 <= t < cycles)


class Conveyor:
    """The folds of one Sgx (Sgx.conveyor)."""

    def __init__(self, sgx: Sgx) -> None:
        self.sgx = sgx

    def cycles(self, encl: Enclave, pid: int, first: int, most: int, sched: Schedule) -> int:
        """How many whole cycles from page `first` (at most `most` pages) the state
        guarantees to be alike (see the module docstring); 0 if none."""
        sgx, h = self.sgx, self.sgx.h
        css = h.misc_of(pid)
        state = epc_cg(css)
        run = encl.pages.get(first)
        if (sgx.epc.free_total != sched.free or encl.secs_css is None or run is None
                or run.state is not RunState.EVICTED
                or sgx.reclaim.should_reclaim(css)
                or epc_cg(h.root.misc).subtree_lru != state.lru.pages
                or (encl.initialized and encl.secs_child_cnt <= sched.per)
                or run.memcg is not h.memcg_of(pid if sched.caller_pays else encl.owner)
                or any(queued is not css for queued in sgx.reclaim.async_work)):
            return 0
        n = min(most, run.end - first, state.lru.pages)
        memcg = run.memcg
        if not memcg.is_root:
            room = min(level.max - level.usage for level in memcg.ancestors())
            n = min(n, room - sched.per)  # the highest point is below per + n
        while n >= sched.per:
            count = n - n % sched.per
            stop = self._first_unlike(encl, state.lru, first, count, sched.per)
            if stop is None:
                g0, g1 = first // PCMDS_PER_PAGE, (first + count - 1) // PCMDS_PER_PAGE
                if any(span.value is not memcg for span in encl.pcmd.overlapping(g0, g1 + 1)):
                    return 0
                return count // sched.per
            n = stop
        return 0

    @staticmethod
    def _first_unlike(encl: Enclave, lru, first: int, count: int, per: int) -> int | None:
        """The position of the first of the first `count` LRU pages that breaks a cycle
        (another enclave's, young, or a PCMD page it shares with the pages loaded is
        freed by them before it is written back); None if none does.

        A PCMD page serving both sides stays if the page written back goes in a cycle
        no later than the last load the PCMD page serves: it is then still needed, as
        it already is; the write-back needs no new one. Otherwise the loads would free it
        and the write-back charge it anew, which the fold does not model."""
        g0, g1 = first // PCMDS_PER_PAGE, (first + count - 1) // PCMDS_PER_PAGE
        pos = 0
        for victim in lru:
            if pos >= count:
                return None
            take = min(len(victim), count - pos)
            if victim.encl is not encl or victim.young:
                return pos
            vs, ve = victim.start, victim.start + take - 1
            for g in {g0, g1}:
                if vs // PCMDS_PER_PAGE <= g <= ve // PCMDS_PER_PAGE:
                    written = pos + max(0, PCMDS_PER_PAGE * g - vs)
                    last_load = min(PCMDS_PER_PAGE * g + PCMDS_PER_PAGE - 1,
                                    first + count - 1) - first
                    if written // per > last_load // per:
                        return pos
            pos += take
        return None

    def fold(self, encl: Enclave, pid: int, first: int, most: int, sched: Schedule,
             pref: list[int]) -> int:
        """Take as many whole cycles from page `first` as the state guarantees, at most
        `most` pages, in one go; returns the pages loaded (0: none, go page by page).

        Where a cycle's first action is the reclaim: DIRECT before page `first`'s direct
        reclaim, KSGXD right after page `first`'s fault failed (the reclaimers' turn).
        The fold ends where the next cycle would begin."""
        k = self.cycles(encl, pid, first, most, sched)
        if not k:
            return 0
        sgx, h, reclaim = self.sgx, self.sgx.h, self.sgx.reclaim
        css = h.misc_of(pid)
        count = sched.per * k
        # The plan and the PCMD pages the loads free, from the state before the step.
        segs, free_after = sgx.epc.plan(pref, 0, reclaim.head_nodes(css, count), sched.per,
                                        k, sched.per)
        refusing = h.misc.refusing_level(SGX_EPC, css, PAGE_SIZE) if sched is KSGXD else None

        # 1. k cycles' write-back, off the LRU head: the rounds' batches.
        charged: list[Progression] = []
        for backing in reclaim.write_back_head(css, count, pid if sched.caller_pays else None):
            for g0, g1 in backing.gaps:
                at = PCMDS_PER_PAGE * g0 - backing.start
                if at < 0:
                    charged.append((backing.pos, 1))
                    g0, at = g0 + 1, at + PCMDS_PER_PAGE
                if g1 > g0:
                    charged.append((backing.pos + at, g1 - g0))
        root = h.root.misc
        epc_cg(root).next_cg = next_descendant_pre(root, css)
        # PCMD pages the loads free: each with the last page it serves, and none that a
        # page written back shares (it went first: see _first_unlike).
        emptied = encl.pcmd_emptied(first, first + count)
        freed: list[Progression] = []
        for lo, hi in emptied:
            last_full = min(hi, (first + count) // PCMDS_PER_PAGE)
            if last_full > lo:
                freed.append((PCMDS_PER_PAGE * lo + PCMDS_PER_PAGE - 1 - first, last_full - lo))
            if hi > last_full:
                freed.append((count - 1, 1))

        # 2. The loads: ELDU onto the nodes the plan gave, in order, to the LRU tail.
        memcg = sgx.load_run(encl, first, count, css, segs, sched.young)
        encl.pcmd_drop(emptied)
        sgx.epc.set_free(free_after)

        # 3. The backing store's swing: up to its highest point, down to where it ends.
        net = _below(charged, count) - _below(freed, count)
        high = highest(sched.per, k, charged, freed)
        current = pid if sched.caller_pays else None
        charged_ok = h.mem.memory_try_charge(memcg, high, owner=encl.owner, current=current)
        assert charged_ok, "conveyor overran the memcg room it checked"
        h.mem.memory_uncharge(memcg, high - net, encl.owner)

        # 4. What repeats each cycle: the failed charge of the fault that waits (its
        # first one was real), the work item it queues finding nothing to do; the last
        # load leaves free pages low, waking ksgxd.
        if sched is KSGXD:
            if refusing is not None:
                h.misc.count_failure(SGX_EPC, refusing, k - 1)
            reclaim.async_work.pop(css, None)
        reclaim.wake_ksgxd()
        return count
