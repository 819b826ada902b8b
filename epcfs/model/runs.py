"""Pages as runs: contiguous page indices in one state share one object.

A 64 GiB EPC holds 16 Mi pages; an object per page would cost gigabytes and make every
bulk step O(pages). Instead an enclave's pages live in a RunMap (sorted, disjoint
[start, end) intervals of page indices), and the runs that are reclaimable are also
linked, in LRU order, into their cgroup's Lru. A run is split only where a state change
demands it, and merged back when its neighbours end up alike.

Invariant kept by every user: within one run, LRU order is ascending page index, so
splitting a run leaves its two halves adjacent in the LRU, left half first.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from enum import Enum
from typing import TYPE_CHECKING

from .constants import SgxPageType

if TYPE_CHECKING:
    from .enclave import Enclave
    from .memory import MemCss
    from .misc import MiscCss
    from .reclaim import Batch


class RunState(Enum):
    """Where an enclave page is (see enclave.py for what each state means to the kernel)."""

    LRU = "reclaimable"
    ISOLATED = "reclaim in progress"
    ORPHAN = "isolated, enclave released"
    EVICTED = "evicted"
    VEPC = "vepc"


class Run:
    """Pages [start, end) of one enclave (or vEPC) that are alike in every attribute.

    Resident runs (LRU, ISOLATED, ORPHAN, VEPC) hold EPC pages: `node` is their NUMA
    node and `css` the misc css they are charged to (the page's sgx_cgroup). EVICTED
    runs hold no EPC page: `memcg` is the memcg their backing contents pages are charged
    to. `young` is the accessed bit the reclaimer's age check tests and clears.
    """

    __slots__ = ("start", "end", "state", "encl", "node", "css", "memcg", "ptype",
                 "accepted", "young", "prev", "next", "batch")

    def __init__(self, start: int, end: int, state: RunState, encl: Enclave | None, *,
                 node: int = -1, css: MiscCss | None = None, memcg: MemCss | None = None,
                 ptype: SgxPageType = SgxPageType.REG, accepted: bool = False,
                 young: bool = False) -> None:
        self.start = start
        self.end = end
        self.state = state
        self.encl = encl
        self.node = node
        self.css = css
        self.memcg = memcg
        self.ptype = ptype
        self.accepted = accepted
        self.young = young
        self.prev: Run | None = None
        self.next: Run | None = None
        self.batch: Batch | None = None

    def __len__(self) -> int:
        return self.end - self.start

    def __repr__(self) -> str:
        return f"Run({self.start}:{self.end} {self.state.name} n{self.node})"

    def joinable(self, right: Run) -> bool:
        """Could `right`, starting where self ends, be absorbed into self?

        Resident runs must also be neighbours in their LRU (self first); runs held by a
        reclaim batch are never joined (the batch lists them one by one)."""
        if (self.end != right.start or self.state is not right.state
                or self.encl is not right.encl or self.node != right.node
                or self.css is not right.css or self.memcg is not right.memcg
                or self.ptype != right.ptype or self.accepted != right.accepted
                or self.young != right.young):
            return False
        if self.state is RunState.LRU:
            return self.next is right
        return self.state in (RunState.EVICTED, RunState.VEPC)

    def join(self, right: Run) -> None:
        self.end = right.end
        if self.state is RunState.LRU:
            self.css.epc.lru.unlink_joined(right)

    def split(self, x: int) -> Run:
        """Cut at index x: self keeps [start, x), the returned run gets [x, end) and
        takes self's place right after it in whatever ordered list holds self."""
        right = Run(x, self.end, self.state, self.encl, node=self.node, css=self.css,
                    memcg=self.memcg, ptype=self.ptype, accepted=self.accepted,
                    young=self.young)
        self.end = x
        if self.state is RunState.LRU:
            self.css.epc.lru.insert_after(self, right)
        elif self.batch is not None:
            right.batch = self.batch
            self.batch.runs.insert(self.batch.runs.index(self) + 1, right)
        return right


class Span:
    """A run of a plain value, for RunMaps that are not page maps (PCMD pages → memcg)."""

    __slots__ = ("start", "end", "value")

    def __init__(self, start: int, end: int, value: object) -> None:
        self.start = start
        self.end = end
        self.value = value

    def __len__(self) -> int:
        return self.end - self.start

    def joinable(self, right: Span) -> bool:
        return self.end == right.start and self.value is right.value

    def join(self, right: Span) -> None:
        self.end = right.end

    def split(self, x: int) -> Span:
        right = Span(x, self.end, self.value)
        self.end = x
        return right


BLOCK = 512
"""Runs per block of a RunMap before it splits in two: inserting or removing a run moves
at most a block's tail (a few KiB), and the index over blocks stays a few thousand
entries long even for a 64 GiB EPC fragmented page by page."""


class RunMap:
    """Disjoint [start, end) runs sorted by start, found by bisection.

    Lookups are O(log runs). The runs are kept in blocks of at most 2 × BLOCK, each with
    its starts, and an index of the blocks' first starts, so inserting or removing a run
    costs O(BLOCK + runs / BLOCK), not O(runs).
    """

    __slots__ = ("blocks", "bstarts", "heads", "count")

    # A flat list made every insert a memmove over all runs: a strided touch loop over
    # a fragmented heap spent most of its time there. Blocks bound that cost without a
    # balanced tree's per-node objects.

    def __init__(self) -> None:
        self.blocks: list[list] = []  # the runs, in order, block by block
        self.bstarts: list[list[int]] = []  # each block's runs' starts
        self.heads: list[int] = []  # each block's first start
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for block in self.blocks:
            yield from block

    @property
    def runs(self) -> list:
        """All runs in order (a new list: O(runs), for checks and tests)."""
        return [run for block in self.blocks for run in block]

    @property
    def starts(self) -> list[int]:
        """All runs' starts as indexed (a new list: O(runs), for checks)."""
        return [s for starts in self.bstarts for s in starts]

    def _locate(self, i: int) -> tuple[int, int]:
        """(block, position) of the last run starting at or before i; position -1 (in
        block 0) if there is none."""
        b = bisect_right(self.heads, i) - 1
        if b < 0:
            return 0, -1
        return b, bisect_right(self.bstarts[b], i) - 1

    def get(self, i: int):
        """The run holding page i, or None."""
        # _locate inlined: get and cut run for nearly every page operation.
        b = bisect_right(self.heads, i) - 1
        if b < 0:
            return None
        run = self.blocks[b][bisect_right(self.bstarts[b], i) - 1]
        return run if i < run.end else None

    def _first_after(self, i: int) -> tuple[int, int]:
        """(block, position) of the run holding i, or of the first one after it; the
        block is len(blocks) if there is none."""
        k, p = self._locate(i)
        if p < 0:
            return 0, 0
        block = self.blocks[k]
        if block[p].end <= i:
            p += 1
            if p == len(block):
                return k + 1, 0
        return k, p

    def _put(self, b: int, p: int, run) -> None:
        """Insert `run` at position p of block b (its place in the order)."""
        block, starts = self.blocks[b], self.bstarts[b]
        block.insert(p, run)
        starts.insert(p, run.start)
        if p == 0:
            self.heads[b] = run.start
        self.count += 1
        if len(block) > 2 * BLOCK:
            self.blocks.insert(b + 1, block[BLOCK:])
            self.bstarts.insert(b + 1, starts[BLOCK:])
            self.heads.insert(b + 1, starts[BLOCK])
            del block[BLOCK:], starts[BLOCK:]

    def insert(self, run) -> None:
        if not self.blocks:
            self.blocks.append([])
            self.bstarts.append([])
            self.heads.append(run.start)
        b, p = self._locate(run.start)
        self._put(b, p + 1, run)

    def remove(self, run) -> None:
        """Take `run` (one of this map's) out of the map."""
        b, p = self._locate(run.start)
        block, starts = self.blocks[b], self.bstarts[b]
        del block[p], starts[p]
        self.count -= 1
        if not block:
            del self.blocks[b], self.bstarts[b], self.heads[b]
        elif p == 0:
            self.heads[b] = starts[0]

    def cut(self, x: int) -> None:
        """Make x a run boundary if a run straddles it."""
        b = bisect_right(self.heads, x) - 1
        if b >= 0:
            p = bisect_right(self.bstarts[b], x) - 1
            run = self.blocks[b][p]
            if run.start < x < run.end:
                self._put(b, p + 1, run.split(x))

    def isolate(self, a: int, b: int) -> list:
        """The runs covering [a, b) after cutting at both ends (present pages only)."""
        self.cut(a)
        self.cut(b)
        return self.overlapping(a, b)

    def overlapping(self, a: int, b: int) -> list:
        """Runs intersecting [a, b), without cutting anything."""
        k, p = self._first_after(a)
        blocks, bstarts = self.blocks, self.bstarts
        out: list = []
        while k < len(blocks):
            block = blocks[k]
            q = bisect_left(bstarts[k], b, p)
            out += block[p:q]
            if q < len(block):
                break
            k, p = k + 1, 0
        return out

    def next_start(self, i: int) -> int | None:
        """Start of the run holding index i, or of the first one after it (None if none)."""
        k, p = self._first_after(i)
        return self.bstarts[k][p] if k < len(self.blocks) else None

    def merge(self, run):
        """Join `run` (one of this map's, or the run that absorbed it) with its
        neighbours where they can be one run; returns the run that now holds its pages."""
        b, p = self._locate(run.start)
        blocks = self.blocks
        block = blocks[b]
        run = block[p]
        nxt = blocks[b + 1][0] if b + 1 < len(blocks) else None
        right = block[p + 1] if p + 1 < len(block) else nxt
        if right is not None and run.joinable(right):
            run.join(right)
            self.remove(right)
        prev = blocks[b - 1][-1] if b > 0 else None
        left = block[p - 1] if p > 0 else prev
        if left is not None and left.joinable(run):
            left.join(run)
            self.remove(run)
            return left
        return run


class Lru:
    """One cgroup's reclaimable list (sgx_epc_lru_list): runs linked head (oldest) to
    tail (newest), with the page count kept incrementally."""

    __slots__ = ("head", "tail", "pages")

    def __init__(self) -> None:
        self.head: Run | None = None
        self.tail: Run | None = None
        self.pages = 0

    def __iter__(self):
        run = self.head
        while run is not None:
            yield run
            run = run.next

    def append(self, run: Run) -> None:
        run.prev = self.tail
        run.next = None
        if self.tail is None:
            self.head = run
        else:
            self.tail.next = run
        self.tail = run
        self.pages += len(run)

    def insert_after(self, run: Run, new: Run) -> None:
        """Link `new` right after `run` (a split: the page count does not change)."""
        new.prev = run
        new.next = run.next
        if run.next is None:
            self.tail = new
        else:
            run.next.prev = new
        run.next = new

    def unlink(self, run: Run) -> None:
        if run.prev is None:
            self.head = run.next
        else:
            run.prev.next = run.next
        if run.next is None:
            self.tail = run.prev
        else:
            run.next.prev = run.prev
        run.prev = run.next = None
        self.pages -= len(run)

    def unlink_joined(self, run: Run) -> None:
        """Unlink a run whose pages were absorbed by its LRU predecessor (no count change)."""
        self.pages += len(run)
        self.unlink(run)
