"""The misc controller: per-resource capacity, hierarchical usage, limits, peaks, events.

Follows kernel/cgroup/misc.c as of v6.11 (the base of the final SGX EPC cgroup series):
a charge walks from the charging css up to the root, and fails at the first level where
the new usage exceeds that level's max or the resource's capacity.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from .constants import U64_MAX
from .errors import KernelError

if TYPE_CHECKING:
    from .cgroup import Cgroup

MISC_RESOURCES = ("sev", "sev_es", "tdx", "sgx_epc")
"""misc_res_type enum order, which is also the order every misc file prints its lines in.
The series' base predates tdx; with both present sgx_epc follows tdx (enum append order)."""


class MiscRes:
    """One resource's counters in one css (struct misc_res)."""

    __slots__ = ("usage", "max", "watermark", "events", "events_local")

    def __init__(self) -> None:
        self.usage = 0
        self.max = U64_MAX
        self.watermark = 0
        self.events = 0
        self.events_local = 0


class MiscCss:
    """A cgroup's misc state. It exists while misc is enabled for the cgroup and outlives
    rmdir (or disabling misc) for as long as something is still charged to it: a page
    keeps the css it was charged to until it is freed, as in the kernel.

    `epc` is the SGX per-cgroup state (LRU, reclaim iterator); model.epc owns it.
    """

    __slots__ = ("cgroup", "parent", "children", "res", "dead", "epc")

    def __init__(self, cgroup: Cgroup, parent: MiscCss | None) -> None:
        self.cgroup = cgroup
        self.parent = parent
        self.children: list[MiscCss] = []
        self.res = {name: MiscRes() for name in MISC_RESOURCES}
        self.dead = False
        self.epc: object | None = None
        if parent is not None:
            parent.children.append(self)

    def ancestors(self):
        """This css and every ancestor up to the root, nearest first."""
        css: MiscCss | None = self
        while css is not None:
            yield css
            css = css.parent

    def walk(self):
        """This css and its descendants (dying ones included), in pre-order."""
        stack = [self]
        while stack:
            css = stack.pop()
            yield css
            stack.extend(reversed(css.children))

    def idle(self) -> bool:
        return all(r.usage == 0 for r in self.res.values())


class Misc:
    """Controller-wide state: the capacity of each resource (misc_res_capacity)."""

    def __init__(self, capacity: dict[str, int] | None = None) -> None:
        self.capacity = dict.fromkeys(MISC_RESOURCES, 0)
        for name, value in (capacity or {}).items():
            if name not in self.capacity:
                raise ValueError(f"unknown misc resource {name!r}")
            self.capacity[name] = value

    def try_charge(self, name: str, css: MiscCss, amount: int) -> None:
        """misc_cg_try_charge: EINVAL for a resource without capacity, EBUSY over a limit.

        On failure the levels already charged are rolled back, but the peaks they raised
        on the way stay raised (the kernel's quirk), and events are counted at the failing
        level and above, events.local at the failing level only.
        """
        if self.capacity[name] == 0:
            raise KernelError(errno.EINVAL, f"misc resource {name} has no capacity")
        if amount == 0:
            return
        refusing = self.refusing_level(name, css, amount)
        for level in css.ancestors():
            if level is refusing:
                self.count_failure(name, level)
                raise KernelError(errno.EBUSY, f"{name} over limit at {level.cgroup.path}")
            res = level.res[name]
            res.watermark = max(res.watermark, res.usage + amount)
        for level in css.ancestors():
            level.res[name].usage += amount

    def headroom(self, name: str, css: MiscCss) -> int:
        """How much more css could be charged before a level's max or the capacity
        refuses (negative if one already is over)."""
        capacity = self.capacity[name]
        return min(min(level.res[name].max, capacity) - level.res[name].usage
                   for level in css.ancestors())

    def refusing_level(self, name: str, css: MiscCss, amount: int) -> MiscCss | None:
        """The level at which charging `amount` to css would fail (usage over its max or
        over the capacity), nearest first; None if it fits everywhere."""
        capacity = self.capacity[name]
        for level in css.ancestors():
            res = level.res[name]
            if res.usage + amount > res.max or res.usage + amount > capacity:
                return level
        return None

    def count_failure(self, name: str, level: MiscCss, times: int = 1) -> None:
        """The events of `times` charges that failed at `level`: events.local there,
        events there and in every ancestor (the bulk EPC path counts many at once)."""
        level.res[name].events_local += times
        for above in level.ancestors():
            above.res[name].events += times

    def uncharge(self, name: str, css: MiscCss, amount: int) -> None:
        """misc_cg_uncharge: no checks, every level down by `amount`."""
        for level in css.ancestors():
            level.res[name].usage -= amount
            assert level.res[name].usage >= 0, f"misc {name} usage negative at {level.cgroup.path}"
