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

from bisect import bisect_right
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


class RunMap:
    """Disjoint [start, end) runs sorted by start, found by bisection.

    Lookups are O(log runs); inserting or removing a run moves list tails, which costs
    a memmove over the run count, not over pages.
    """

    __slots__ = ("starts", "runs")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.runs: list = []

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self):
        return iter(self.runs)

    def find(self, i: int) -> int:
        """Index of the run holding page i, or -1."""
        k = bisect_right(self.starts, i) - 1
        return k if k >= 0 and i < self.runs[k].end else -1

    def first_after(self, i: int) -> int:
        """Index of the first run ending after i (the one holding i, or the next)."""
        k = bisect_right(self.starts, i) - 1
        if k < 0 or self.runs[k].end <= i:
            k += 1
        return k

    def get(self, i: int):
        k = self.find(i)
        return self.runs[k] if k >= 0 else None

    def insert(self, run) -> int:
        k = bisect_right(self.starts, run.start)
        self.starts.insert(k, run.start)
        self.runs.insert(k, run)
        return k

    def pop(self, k: int):
        del self.starts[k]
        return self.runs.pop(k)

    def restart(self, k: int, start: int) -> None:
        """Move run k's start (it shrank from the left, keeping its position)."""
        self.runs[k].start = start
        self.starts[k] = start

    def cut(self, x: int) -> None:
        """Make x a run boundary if a run straddles it."""
        k = bisect_right(self.starts, x) - 1
        if k >= 0:
            run = self.runs[k]
            if run.start < x < run.end:
                right = run.split(x)
                self.starts.insert(k + 1, x)
                self.runs.insert(k + 1, right)

    def isolate(self, a: int, b: int) -> list:
        """The runs covering [a, b) after cutting at both ends (present pages only)."""
        self.cut(a)
        self.cut(b)
        return self.overlapping(a, b)

    def overlapping(self, a: int, b: int) -> list:
        """Runs intersecting [a, b), without cutting anything."""
        k = self.first_after(a)
        out = []
        while k < len(self.runs) and self.runs[k].start < b:
            out.append(self.runs[k])
            k += 1
        return out

    def next_start(self, i: int) -> int | None:
        """Start of the run holding index i, or of the first one after it (None if none)."""
        k = self.first_after(i)
        return self.runs[k].start if k < len(self.runs) else None

    def merge_at(self, k: int) -> int:
        """Join run k with its neighbours where they can be one run; returns the index of
        the run that now holds run k's pages."""
        runs = self.runs
        if k + 1 < len(runs) and runs[k].joinable(runs[k + 1]):
            runs[k].join(runs[k + 1])
            self.pop(k + 1)
        if k > 0 and runs[k - 1].joinable(runs[k]):
            runs[k - 1].join(runs[k])
            self.pop(k)
            k -= 1
        return k


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
