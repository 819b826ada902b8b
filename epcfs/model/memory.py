"""The memory controller, as far as the EPC backing store needs it.

Charges are in pages, like memcg's page_counter. Only what epcfs simulates is charged:
the enclave backing store (contents pages and PCMD pages, written by reclaim) and the
memory a workload process declares. There is no swap and shmem cannot be reclaimed, so
a charge over memory.max that fits nowhere ends in the memcg OOM killer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .constants import PAGE_COUNTER_MAX

if TYPE_CHECKING:
    from .cgroup import Cgroup

MEMCG_EVENTS = ("low", "high", "max", "oom", "oom_kill", "oom_group_kill")
"""memory.events lines, in the order the kernel prints them."""


class MemCss:
    """A cgroup's memcg: page counter, limits and event counters.

    Like MiscCss it outlives rmdir while pages are still charged to it. The root memcg
    is never charged (the kernel skips it), so its usage stays 0.
    """

    __slots__ = ("cgroup", "parent", "usage", "max", "swap_max", "watermark", "events",
                 "events_local", "dead", "is_root", "local_watermark", "memsw_max", "failcnt",
                 "memsw_watermark", "memsw_failcnt")

    def __init__(self, cgroup: Cgroup, parent: MemCss | None) -> None:
        self.cgroup = cgroup
        self.parent = parent
        self.is_root = parent is None
        self.usage = 0
        self.max = PAGE_COUNTER_MAX
        self.swap_max = PAGE_COUNTER_MAX
        self.memsw_max = PAGE_COUNTER_MAX
        """cgroup v1 memory.memsw.limit_in_bytes (memory+swap; no swap here, so it only
        ever constrains what limit_in_bytes may be set to)."""
        self.failcnt = 0
        """cgroup v1 memory.failcnt: charges this level's limit refused."""
        self.memsw_watermark = 0
        self.memsw_failcnt = 0
        """cgroup v1 memory.memsw.max_usage_in_bytes / memsw.failcnt: the memory+swap
        counter's own peak and refusals (its usage is the memory usage: no swap)."""
        self.watermark = 0
        self.local_watermark = 0
        """Peak since the last memory.peak write (page_counter.local_watermark, 6.12+)."""
        self.events = dict.fromkeys(MEMCG_EVENTS, 0)
        self.events_local = dict.fromkeys(MEMCG_EVENTS, 0)
        self.dead = False

    def ancestors(self):
        """This memcg and its ancestors below the root, nearest first."""
        css: MemCss | None = self
        while css is not None and not css.is_root:
            yield css
            css = css.parent

    def idle(self) -> bool:
        return self.usage == 0

    def event(self, name: str) -> None:
        """memcg_memory_event: local count here, hierarchical count up to (not incl.) root."""
        self.events_local[name] += 1
        for level in self.ancestors():
            level.events[name] += 1

    def over_limit(self, pages: int) -> tuple[MemCss, str] | None:
        """The level and counter that `pages` more would take over its limit, in
        try_charge_memcg's order: memory+swap first (set only in cgroup v1), then memory,
        each from the nearest level up. None if the charge fits."""
        for counter, limit in (("memsw", "memsw_max"), ("memory", "max")):
            for level in self.ancestors():
                if level.usage + pages > getattr(level, limit):
                    return level, counter
        return None

    def commit(self, pages: int) -> None:
        """Charge unconditionally (page_counter_charge), raising peaks."""
        for level in self.ancestors():
            level.usage += pages
            level.watermark = max(level.watermark, level.usage)
            level.local_watermark = max(level.local_watermark, level.usage)
            level.memsw_watermark = max(level.memsw_watermark, level.usage)

    def uncharge(self, pages: int) -> None:
        for level in self.ancestors():
            level.usage -= pages
            assert level.usage >= 0, f"memory usage negative at {level.cgroup.path}"
