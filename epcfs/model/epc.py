"""EPC sections on NUMA nodes: one free list per node, and the boot-time dirty list.

Physical EPC pages are interchangeable, so a node's free list is a count. What is not
interchangeable is the node: a page goes back to the node it came from, and allocation
walks the nodes in the kernel's order (__sgx_alloc_epc_page): the requester's node
first, then the other EPC nodes in ascending order, wrapping once. There is no global
free list.

At boot every page is dirty (it may hold a previous kernel's enclave after kexec) and
becomes free only when ksgxd EREMOVEs it (__sgx_sanitize_pages), section by section.
"""

from __future__ import annotations

from .constants import PAGE_SIZE, SGX_MAX_EPC_SECTIONS


class EpcNode:
    """One NUMA node's EPC (struct sgx_numa_node): size and free-list length."""

    __slots__ = ("nid", "size_pages", "free", "dirty")

    def __init__(self, nid: int) -> None:
        self.nid = nid
        self.size_pages = 0
        self.free = 0
        self.dirty = 0

    @property
    def used(self) -> int:
        """Pages handed out and not yet freed (charged to some cgroup)."""
        return self.size_pages - self.free - self.dirty


class Epc:
    """All EPC: the nodes, their free counts, the pages still waiting for sanitization."""

    def __init__(self, sections: list[tuple[int, int]]) -> None:
        if not 1 <= len(sections) <= SGX_MAX_EPC_SECTIONS:
            raise ValueError(f"CPUID 0x12 enumerates 1 to {SGX_MAX_EPC_SECTIONS} EPC sections")
        self.nodes: dict[int, EpcNode] = {}
        self.dirty_list: list[list[int]] = []  # [nid, pages] per section, in CPUID order
        for nid, size in sections:
            if nid < 0 or size <= 0 or size % PAGE_SIZE:
                raise ValueError(f"bad EPC section (node {nid}, {size} bytes)")
            node = self.nodes.setdefault(nid, EpcNode(nid))
            node.size_pages += size // PAGE_SIZE
            node.dirty += size // PAGE_SIZE
            self.dirty_list.append([nid, size // PAGE_SIZE])
        self.order = sorted(self.nodes)
        self.total_pages = sum(n.size_pages for n in self.nodes.values())
        self.free_total = 0
        self.dirty_total = self.total_pages

    def preference(self, node: int | None) -> list[int]:
        """Node ids in allocation order for a task running on `node` (None: the first
        EPC node). A node without EPC starts the walk at the next EPC node after it."""
        order = self.order
        if node is None:
            return order
        start = next((i for i, nid in enumerate(order) if nid >= node), 0)
        return order[start:] + order[:start]

    def take_one(self, pref: list[int]) -> int | None:
        """Pop a free page: the first node in `pref` that has one. None when all are empty."""
        if not self.free_total:
            return None
        for nid in pref:
            node = self.nodes[nid]
            if node.free:
                node.free -= 1
                self.free_total -= 1
                return nid
        raise AssertionError("free_total disagrees with the node free lists")

    def take(self, pref: list[int], count: int) -> list[tuple[int, int]]:
        """Pop `count` free pages one after another: [(nid, pages)] in allocation order."""
        out = []
        for nid in pref:
            if not count:
                break
            node = self.nodes[nid]
            n = min(node.free, count)
            if n:
                node.free -= n
                count -= n
                out.append((nid, n))
        assert not count, "take() beyond the free pages"
        self.free_total -= sum(n for _, n in out)
        return out

    def plan(self, pref: list[int], first: int, refills: list[tuple[int, int]], per: int,
             k: int, last: int) -> tuple[list[tuple[int, int]], dict[int, int]]:
        """The nodes a stretch of allocations gets while reclaim refills the free lists,
        without changing anything: `first` allocations, then k times (`per` pages freed
        onto their nodes, taken in order from `refills` [(nid, pages)], then `per`
        allocations; `last` the final time), each allocation from the first node in
        `pref` with a free page. Returns [(nid, count)] in allocation order and the free
        counts after.

        Refills whose pages all come from one node are taken together: the nodes ahead of
        it in `pref` are drained first either way, and it never runs out meanwhile."""
        free = {nid: node.free for nid, node in self.nodes.items()}
        segs: list[tuple[int, int]] = []

        def take(count: int) -> None:
            for nid in pref:
                if not count:
                    break
                t = min(free[nid], count)
                if t:
                    free[nid] -= t
                    count -= t
                    if segs and segs[-1][0] == nid:
                        segs[-1] = (nid, segs[-1][1] + t)
                    else:
                        segs.append((nid, t))
            assert not count, "allocation plan ran out of free pages"

        take(first)
        done = seg = off = 0
        while done < k:
            nid, length = refills[seg]
            whole = min(k - done, (length - off) // per)
            if whole:
                free[nid] += per * whole
                off += per * whole
                done += whole
                take(per * (whole - 1) + (last if done == k else per))
            else:
                need = per
                while need:
                    nid, length = refills[seg]
                    t = min(need, length - off)
                    free[nid] += t
                    need -= t
                    off += t
                    if off == length:
                        seg, off = seg + 1, 0
                done += 1
                take(last if done == k else per)
            if seg < len(refills) and off == refills[seg][1]:
                seg, off = seg + 1, 0
        return segs, free

    def set_free(self, free: dict[int, int]) -> None:
        """Every node's free count as a plan left it."""
        for nid, count in free.items():
            self.nodes[nid].free = count
        self.free_total = sum(free.values())

    def give(self, nid: int, count: int) -> None:
        """Put pages back on their node's free list (sgx_free_epc_page)."""
        self.nodes[nid].free += count
        self.free_total += count

    def sanitize(self, count: int) -> int:
        """ksgxd's boot pass: EREMOVE up to `count` dirty pages, in section order, and
        make them free. Returns how many were sanitized."""
        done = 0
        while self.dirty_list and done < count:
            entry = self.dirty_list[0]
            n = min(entry[1], count - done)
            entry[1] -= n
            node = self.nodes[entry[0]]
            node.dirty -= n
            node.free += n
            done += n
            if not entry[1]:
                self.dirty_list.pop(0)
        self.free_total += done
        self.dirty_total -= done
        return done
