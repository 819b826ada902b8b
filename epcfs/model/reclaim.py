"""EPC reclamation: the batch in three steps, the rounds built from batches, and the four
callers of rounds (synchronous in try_charge, per-cgroup async work, direct reclaim
before EDMM, ksgxd's global reclaim).

A batch is one sgx_reclaim_pages() call split where the kernel's races live:

1. isolate(css): take up to SGX_NR_TO_SCAN pages off the head of css's own LRU. They
   are "reclaim in progress": still resident, still charged.
2. writeback(batch): the age check (a page accessed since the last scan goes back to
   the LRU tail, its accessed bit cleared), the backing-store allocation (contents page
   plus, if none serves the page's index yet, a PCMD page, charged to the memcg of the
   task doing the reclaim or, for ksgxd and the workers, of the enclave's owner; a
   failed charge sends the page back to the tail), EBLOCK, ETRACK, EWB (one VA slot
   each). The enclave pages are now evicted; the EPC pages stay with the batch. If an
   initialized enclave's last resident child went, its SECS is written back and freed
   right there, as sgx_reclaimer_write does.
3. free_batch(batch): the EPC pages go back to their nodes' free lists, uncharged.

Counting (decisions where the kernel's count depends on hardware state): EBLOCK and EWB
once per page written back; ETRACK once per enclave per batch, because the first EWB
after the batch's EBLOCKs finds the epoch untracked (SGX_NOT_TRACKED), and the ETRACK it
then issues covers every page of that enclave blocked before it. The failed first EWB
attempt is not counted. A page freed after EWB needs no EREMOVE (sgx_free_epc_page);
the SECS freed after its EWB goes through sgx_encl_free_epc_page, which does one.

A round (cgroup_reclaim_pages) asks the root's fairness iterator for the next css in
pre-order and runs a batch on it until at least `nr_to_scan` pages were scanned or the
subtree has nothing left to scan (sgx_cgroup_reclaim_pages).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from .constants import (
    PAGE_SIZE,
    PCMDS_PER_PAGE,
    SGX_EPC,
    SGX_NR_HIGH_PAGES,
    SGX_NR_LOW_PAGES,
    SGX_NR_TO_SCAN,
)
from .engine import ALONE, Steps, operation
from .epc_cgroup import (
    epc_cg,
    lru_changed,
    lru_empty,
    next_descendant_pre,
    next_get,
    should_reclaim,
)
from .runs import Run, RunState

if TYPE_CHECKING:
    from .cgroup import Hierarchy
    from .enclave import Enclave
    from .epc import Epc
    from .memory import MemCss
    from .misc import MiscCss


class Stage(Enum):
    ISOLATED = "isolated"
    WRITTEN = "written back"
    FREED = "freed"


class Batch:
    """One reclaim batch between its steps.

    `runs` are the isolated runs (ISOLATED, or ORPHAN once their enclave was released);
    after writeback, `held` counts the emptied EPC pages by (node, css) until freed.
    `scanned` is what sgx_reclaim_pages returns (pages taken off the LRU); `failed`
    counts backing-store charges that failed (memcg at its limit).
    """

    __slots__ = ("css", "charge_pid", "runs", "stage", "scanned", "written", "failed",
                 "held")

    def __init__(self, css: MiscCss, charge_pid: int | None) -> None:
        self.css = css
        self.charge_pid = charge_pid
        self.runs: list[Run] = []
        self.stage = Stage.ISOLATED
        self.scanned = 0
        self.written = 0
        self.failed = 0
        self.held: Counter[tuple[int, MiscCss]] = Counter()

    def __repr__(self) -> str:
        return f"Batch({self.css.cgroup.path}, {self.stage.value}, scanned={self.scanned})"


@dataclass
class Round:
    """What a round of batches achieved, for the loops that decide what to do next."""

    scanned: int = 0
    freed: int = 0
    failed: int = 0

    def add(self, batch: Batch) -> None:
        self.scanned += batch.scanned
        self.freed += batch.written
        self.failed += batch.failed

    def merge(self, other: Round) -> None:
        self.scanned += other.scanned
        self.freed += other.freed
        self.failed += other.failed


@dataclass
class Backing:
    """The backing store one stretch of write_back_head owes: `take` pages of `encl`
    from index `start`, the `pos`-th page written back onwards, charged to `memcg`, and
    the PCMD pages [g0, g1) they needed first."""

    encl: Enclave
    memcg: MemCss
    pos: int
    start: int
    take: int
    gaps: list[tuple[int, int]]

    @property
    def pages(self) -> int:
        return self.take + sum(g1 - g0 for g0, g1 in self.gaps)


class Reclaim:
    """EPC reclamation for one Sgx (Sgx.reclaim): the LRUs' bookkeeping, the batches in
    flight, the queued work items and ksgxd's wake-up. `encls` is the Sgx's counter of
    ENCLS leaves, which reclaim adds to."""

    def __init__(self, h: Hierarchy, epc: Epc, encls: Counter[str], bulk: bool = True) -> None:
        self.h = h
        self.epc = epc
        self.encls = encls
        self.bulk = bulk
        """Whether loops run alone may fold rounds that only pass young pages over."""
        self.batches: list[Batch] = []
        """Batches between their steps (isolated or written back, not yet freed)."""
        self.async_work: dict[MiscCss, None] = {}
        """Misc csses whose reclaim work item is queued on sgx_cg_wq, in queueing order."""
        self._ksgxd_wake = False

    # -- LRU bookkeeping shared with the enclave operations -------------------------

    def lru_append(self, run: Run) -> None:
        """Mark reclaimable (sgx_mark_page_reclaimable): run goes to its css's LRU tail
        and joins its neighbours in the enclave's map where it can."""
        run.state = RunState.LRU
        run.batch = None
        epc_cg(run.css).lru.append(run)
        lru_changed(run.css, len(run))
        run.encl.pages.merge(run)

    def lru_unlink(self, run: Run) -> None:
        epc_cg(run.css).lru.unlink(run)
        lru_changed(run.css, -len(run))

    def free_epc(self, nid: int, css: MiscCss, count: int, eremove: bool) -> None:
        """sgx_free_epc_page (after EREMOVE when the page still holds something)."""
        if eremove:
            self.encls["EREMOVE"] += count
        self.epc.give(nid, count)
        self.h.misc_uncharge(SGX_EPC, css, count * PAGE_SIZE)

    def _backing_memcg(self, encl: Enclave, charge_pid: int | None) -> MemCss:
        """sgx_encl_alloc_backing's memcg: the reclaiming task's, or for ksgxd and the
        workers the enclave's mm's, taken here as its owner's current memcg."""
        pid = encl.owner if charge_pid is None else charge_pid
        return self.h.memcg_of(pid)

    # -- the three steps -------------------------------------------------------------

    def isolate(self, css: MiscCss, charge_pid: int | None = None) -> Batch:
        """Step 1: take up to SGX_NR_TO_SCAN pages off the head of css's own LRU.

        `charge_pid` is the task reclaiming (its memcg pays for the backing store), or
        None for ksgxd and the async workers."""
        batch = Batch(css, charge_pid)
        lru = epc_cg(css).lru
        while batch.scanned < SGX_NR_TO_SCAN and lru.head is not None:
            run = lru.head
            take = min(SGX_NR_TO_SCAN - batch.scanned, len(run))
            if take < len(run):
                run.encl.pages.cut(run.start + take)
            self.lru_unlink(run)
            run.state = RunState.ISOLATED
            run.batch = batch
            batch.runs.append(run)
            batch.scanned += take
        self.batches.append(batch)
        return batch

    def writeback(self, batch: Batch) -> int:
        """Step 2: age check, backing store, EBLOCK, ETRACK, EWB. Returns pages written."""
        if batch.stage is not Stage.ISOLATED:
            raise ValueError(f"{batch} is not waiting for write-back")
        batch.stage = Stage.WRITTEN
        new_pcmd: dict[tuple[Enclave, int], MemCss] = {}
        outcome: list[tuple[Run, bool]] = []  # (run, written?) in batch order
        for run in list(batch.runs):
            if run.state is RunState.ORPHAN:
                continue
            if run.young:
                run.young = False
                outcome.append((run, False))
                continue
            outcome.extend(self._charge_backing(batch, run, new_pcmd))
        for (encl, g), memcg in new_pcmd.items():
            encl.pcmd_add([(g, g + 1)], memcg)
        to_write = [run for run, ok in outcome if ok]
        for run, ok in outcome:
            if not ok:
                batch.runs.remove(run)
                self.lru_append(run)
        self.encls["EBLOCK"] += sum(len(run) for run in to_write)
        self.encls["ETRACK"] += len({run.encl for run in to_write})
        for run in to_write:
            self._ewb_run(batch, run)
        return batch.written

    def _charge_backing(self, batch: Batch, run: Run,
                        new_pcmd: dict[tuple[Enclave, int], MemCss]) -> list[tuple[Run, bool]]:
        """Charge the backing store page by page; split the run where the outcome changes.

        A page's contents page and (if its index's PCMD page is not there yet, nor
        allocated earlier in this batch) its PCMD page are charged as one unit. The
        kernel allocates them one after the other, so when only the PCMD page fails, the
        contents page it got stays in the shmem page cache, charged; the model drops that
        corner (decision: it needs a memcg exactly one page short of the pair)."""
        encl = run.encl
        memcg = self._backing_memcg(encl, batch.charge_pid)
        fresh_groups = [g for g0, g1 in encl.pcmd_missing(run.start, run.end)
                        for g in range(g0, g1) if (encl, g) not in new_pcmd]
        need = len(run) + len(fresh_groups)
        if memcg.is_root or memcg.over_limit(need) is None:  # all fit: one charge does
            self.h.mem.memory_try_charge(memcg, need, owner=encl.owner, current=batch.charge_pid)
            for g in fresh_groups:
                new_pcmd[(encl, g)] = memcg
            run.memcg = memcg
            return [(run, True)]
        results = []
        for i in range(run.start, run.end):
            g = i // PCMDS_PER_PAGE
            fresh = (encl, g) not in new_pcmd and encl.pcmd.get(g) is None
            if self.h.mem.memory_try_charge(memcg, 1 + fresh, owner=encl.owner,
                                        current=batch.charge_pid):
                if fresh:
                    new_pcmd[(encl, g)] = memcg
                results.append(True)
            else:
                batch.failed += 1
                results.append(False)
        pieces = []
        base, end = run.start, run.end
        start = base
        for i in range(base + 1, end + 1):
            if i == end or results[i - base] != results[start - base]:
                if i < end:
                    encl.pages.cut(i)
                piece = encl.pages.get(start)
                if results[start - base]:
                    piece.memcg = memcg
                pieces.append((piece, results[start - base]))
                start = i
        return pieces

    def _ewb_run(self, batch: Batch, run: Run) -> None:
        """EWB every page of an isolated run whose backing is charged (memcg in run.memcg)."""
        encl = run.encl
        n = len(run)
        self.encls["EWB"] += n
        batch.written += n
        batch.held[(run.node, run.css)] += n
        batch.runs.remove(run)
        encl.children_written_back(n)
        run.state = RunState.EVICTED
        run.batch = None
        run.node = -1
        run.css = None
        encl.pages.merge(run)
        if encl.initialized and not encl.secs_child_cnt and encl.secs_css is not None:
            self._ewb_secs(encl, batch.charge_pid)

    def _ewb_secs(self, encl: Enclave, charge_pid: int | None) -> None:
        """The last resident child is gone: write the SECS back and free it, unless its
        backing page cannot be charged (then it simply stays, as in the kernel)."""
        memcg = self._backing_memcg(encl, charge_pid)
        s = encl.secs_index
        gaps = encl.pcmd_missing(s, s + 1)
        if not self.h.mem.memory_try_charge(memcg, 1 + len(gaps), owner=encl.owner,
                                        current=charge_pid):
            return
        encl.pcmd_add(gaps, memcg)
        self.encls["EWB"] += 1
        css = encl.secs_written_back(memcg)
        self.free_epc(encl.secs_node, css, 1, eremove=True)

    def free_batch(self, batch: Batch) -> int:
        """Step 3: free the written-back EPC pages, and the isolated pages whose enclave
        was released meanwhile. Returns the pages freed."""
        if batch.stage is not Stage.WRITTEN:
            raise ValueError(f"{batch} is not waiting to be freed")
        batch.stage = Stage.FREED
        freed = 0
        for (nid, css), n in batch.held.items():
            self.free_epc(nid, css, n, eremove=False)
            freed += n
        for run in batch.runs:
            self.free_epc(run.node, run.css, len(run), eremove=True)
            freed += len(run)
        batch.runs.clear()
        batch.held.clear()
        self.batches.remove(batch)
        return freed

    # -- closed forms of many full batches, for the folds (bulk.py, conveyor.py) -------

    def head_nodes(self, css: MiscCss, count: int) -> list[tuple[int, int]]:
        """The nodes of the first `count` pages of css's LRU: [(nid, pages)] in order."""
        out: list[tuple[int, int]] = []
        for run in epc_cg(css).lru:
            if not count:
                break
            t = min(len(run), count)
            if out and out[-1][0] == run.node:
                out[-1] = (run.node, out[-1][1] + t)
            else:
                out.append((run.node, t))
            count -= t
        return out

    def write_back_head(self, css: MiscCss, count: int,
                        charge_pid: int | None) -> list[Backing]:
        """The first `count` pages of css's LRU written back as count/SGX_NR_TO_SCAN full
        batches would write them, none of them young and every backing charge certain to
        fit: one VA slot each, EBLOCK and EWB each, ETRACK once per enclave per batch.
        The caller frees their EPC pages, uncharges their misc css and charges the
        backing store this returns (by when, for memory.peak), and owns the ordering."""
        lru = epc_cg(css).lru
        out: list[Backing] = []
        pos = 0
        batch_no, batch_encls = -1, set()
        while pos < count:
            run = lru.head
            take = min(len(run), count - pos)
            encl = run.encl
            if take < len(run):
                encl.pages.cut(run.start + take)
            self.lru_unlink(run)
            memcg = self._backing_memcg(encl, charge_pid)
            out.append(Backing(encl, memcg, pos, run.start, take,
                               encl.pcmd_missing(run.start, run.end)))
            encl.pcmd_add(out[-1].gaps, memcg)
            first_batch = pos // SGX_NR_TO_SCAN
            last_batch = (pos + take - 1) // SGX_NR_TO_SCAN
            if first_batch != batch_no:
                batch_no, batch_encls = first_batch, set()
            if encl not in batch_encls:
                batch_encls.add(encl)
                self.encls["ETRACK"] += 1
            if last_batch != first_batch:
                self.encls["ETRACK"] += last_batch - first_batch
                batch_no, batch_encls = last_batch, {encl}
            run.state = RunState.EVICTED
            run.memcg = memcg
            run.node = -1
            run.css = None
            encl.children_written_back(take)
            encl.pages.merge(run)
            pos += take
        self.encls["EBLOCK"] += count
        self.encls["EWB"] += count
        return out

    def pass_young(self, root: MiscCss) -> int:
        """The rounds under `root` that would only pass over young pages, taken at once
        (for a loop whose driver runs it alone). Each would be one batch of the only
        css in root's subtree holding reclaimable pages, all young: they go to the tail
        cleared, nothing is freed and the loop goes on. Returns the pages scanned."""
        holders = [css for css in root.walk() if css.epc is not None and css.epc.lru.pages]
        if len(holders) != 1:
            return 0
        (holder,) = holders
        young = 0
        for run in epc_cg(holder).lru:
            if not run.young:
                break
            young += len(run)
        count = young - young % SGX_NR_TO_SCAN
        if count:
            self.age_head(holder, count)
            epc_cg(root).next_cg = next_descendant_pre(root, holder)
        return count

    def catch_up(self) -> bool:
        """The reclaimers' turn beside an operation that waits (engine.run's
        `reclaimers`): every queued work item runs to its end, then ksgxd. True if they
        freed anything: otherwise the operation would find nothing changed and wait
        forever (e.g. every backing charge fails at a memcg limit)."""
        freed = 0
        for css in list(self.async_work):
            freed += self.work_item(css).freed
        self._ksgxd_wake = False
        freed += self.ksgxd().freed
        return freed > 0

    def age_head(self, css: MiscCss, count: int) -> None:
        """The first `count` pages of css's LRU, all young, passed over by count/16 full
        batches: each goes to the tail, in order, its accessed bit cleared."""
        lru = epc_cg(css).lru
        while count:
            run = lru.head
            take = min(len(run), count)
            if take < len(run):
                run.encl.pages.cut(run.start + take)
            self.lru_unlink(run)
            run.young = False
            self.lru_append(run)
            count -= take

    @operation
    def reclaim_pages(self, css: MiscCss, charge_pid: int | None = None) -> Steps[Batch]:
        """sgx_reclaim_pages: one batch, its three steps with a preemption point between
        each. While the batch is isolated or written back its pages are off the LRU:
        another task's failed charge may find nothing to reclaim (the selftests' race).
        A batch once isolated always completes, even if its caller goes away."""
        batch = self.isolate(css, charge_pid)
        try:
            yield
            self.writeback(batch)
            yield
        finally:
            if batch.stage is Stage.ISOLATED:
                self.writeback(batch)
            self.free_batch(batch)
        return batch

    # -- rounds and their callers ----------------------------------------------------

    def next_cg(self, root: MiscCss) -> MiscCss:
        """The css whose LRU the next batch of a round under `root` should scan."""
        return next_get(root)

    def lru_empty(self, css: MiscCss) -> bool:
        """Nothing reclaimable in css's subtree (a round would stop)."""
        return lru_empty(css)

    @operation
    def cgroup_reclaim_pages(self, root: MiscCss, charge_pid: int | None,
                             nr_to_scan: int) -> Steps[Round]:
        """sgx_cgroup_reclaim_pages: batches on root's subtree in the iterator's order
        until nr_to_scan pages were scanned or nothing is left to scan. The one round
        that try_charge, allocation, direct reclaim, ksgxd and the work items all run."""
        done = Round()
        while not lru_empty(root) and done.scanned < nr_to_scan:
            done.add((yield from self.reclaim_pages.steps(next_get(root), charge_pid)))
        return done

    @operation
    def reclaim_global(self, charge_pid: int | None = None) -> Steps[Round]:
        """sgx_cgroup_reclaim_pages_global: one round over the whole tree."""
        return (yield from self.cgroup_reclaim_pages.steps(self.h.root.misc, charge_pid,
                                                           SGX_NR_TO_SCAN))

    def can_reclaim_global(self) -> bool:
        """sgx_can_reclaim_global: some LRU anywhere holds a page."""
        return not lru_empty(self.h.root.misc)

    def should_reclaim_global(self, watermark: int) -> bool:
        """sgx_should_reclaim_global: fewer free pages than `watermark`, and something
        to reclaim."""
        return self.epc.free_total < watermark and self.can_reclaim_global()

    def should_wake_ksgxd(self) -> bool:
        """ksgxd's wait condition: below SGX_NR_HIGH_PAGES free with something to
        reclaim. Once woken, ksgxd runs rounds while this holds."""
        return self.should_reclaim_global(SGX_NR_HIGH_PAGES)

    def take_ksgxd_wakeup(self) -> bool:
        """Was ksgxd woken since the last call? An allocation wakes it when it leaves
        fewer than SGX_NR_LOW_PAGES free and something reclaimable."""
        woken, self._ksgxd_wake = self._ksgxd_wake, False
        return woken

    @operation
    def ksgxd(self) -> Steps[Round]:
        """ksgxd once woken: global rounds while should_wake_ksgxd() holds.

        Decision: a round that freed nothing because backing charges failed ends the
        run (the kernel's ksgxd would spin until the memcg OOM victim exits); the next
        allocation that leaves free pages low wakes it again."""
        alone = (yield) is ALONE
        done = Round()
        while self.should_wake_ksgxd():
            if alone and self.bulk:
                done.scanned += self.pass_young(self.h.root.misc)
            last = yield from self.reclaim_global.steps(None)
            done.merge(last)
            if not last.freed and last.failed:
                break
        return done

    def maybe_wake_ksgxd(self) -> None:
        """wake_up(&ksgxd_waitq) after an allocation, if free pages are low."""
        if self.should_reclaim_global(SGX_NR_LOW_PAGES):
            self._ksgxd_wake = True

    def wake_ksgxd(self) -> None:
        """wake_up(&ksgxd_waitq)."""
        self._ksgxd_wake = True

    def should_reclaim(self, css: MiscCss) -> bool:
        """sgx_cgroup_should_reclaim (the async worker's loop condition)."""
        return should_reclaim(css)

    def queue_work(self, css: MiscCss) -> None:
        """queue_work(sgx_cg_wq, &css->reclaim_work): a no-op if already queued."""
        self.async_work[css] = None

    def work_pending(self, css: MiscCss) -> bool:
        """The loop test of css's work item (sgx_cgroup_reclaim_work_func): True while it
        has a round to do; once should_reclaim(css) is false the item finishes and leaves
        async_work."""
        if css not in self.async_work:
            return False
        if not should_reclaim(css):
            del self.async_work[css]
            return False
        return True

    @operation
    def work_item(self, css: MiscCss) -> Steps[Round]:
        """sgx_cgroup_reclaim_work_func for a queued css: rounds while it is near its
        limit. A css whose item is not queued does nothing. As ksgxd, a round that freed
        nothing because backing charges failed ends the item (it is queued again by the
        next no-reclaim failure)."""
        alone = (yield) is ALONE
        done = Round()
        while self.work_pending(css):
            if alone and self.bulk:
                done.scanned += self.pass_young(css)
            last = yield from self.cgroup_reclaim_pages.steps(css, None, SGX_NR_TO_SCAN)
            done.merge(last)
            if not last.freed and last.failed:
                self.async_work.pop(css, None)  # (the css may have gone meanwhile)
                break
        return done

    @operation
    def reclaim_direct(self, pid: int) -> Steps[Round]:
        """sgx_reclaim_direct, run before each page of an EDMM ioctl: the caller's own
        cgroup first if near its limit, then globally if free pages are low."""
        done = Round()
        css = self.h.misc_of(pid)
        if should_reclaim(css):
            done.merge((yield from self.cgroup_reclaim_pages.steps(css, pid, SGX_NR_TO_SCAN)))
        if self.should_reclaim_global(SGX_NR_LOW_PAGES):
            done.merge((yield from self.reclaim_global.steps(pid)))
        return done
