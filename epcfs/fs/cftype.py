"""The shape of an interface-file table row, like the kernel's struct cftype.

A controller declares its files once as a tuple of CfType rows; the Operations class
looks rows up by name and calls show/write, and knows nothing about any single file.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from ..host.caller import Caller
from ..model.cgroup import Cgroup, Hierarchy

if TYPE_CHECKING:
    from ..host.tracker import ProcessTracker


class Where(Enum):
    """Which cgroups carry the file (CFTYPE_ONLY_ON_ROOT / CFTYPE_NOT_ON_ROOT / both)."""

    ROOT = "root"
    NONROOT = "nonroot"
    ALL = "all"

    def admits(self, cg: Cgroup) -> bool:
        return self is Where.ALL or (self is Where.ROOT) == cg.is_root


def _allow_all(cg: Cgroup, caller: Caller) -> bool:
    return True


@dataclass
class Context:
    """What show/write functions may touch besides the cgroup itself: one per hierarchy
    (cgroup v1 has two, misc and memory, each with its own process tracker).

    `may_write_procs(cg, caller)`: may the caller write cg's cgroup.procs (the file's
    mode and owner, as inode_permission would answer)? The filesystem installs it; the
    delegation rule for moves needs it.
    """

    hierarchy: Hierarchy
    tracker: ProcessTracker
    may_write_procs: Callable[[Cgroup, Caller], bool] = _allow_all
    peak_watchers: dict[object, weakref.WeakSet] = field(default_factory=dict)
    release_agent: str = ""
    """cgroup v1: the hierarchy's release_agent (stored, never run)."""


@dataclass(frozen=True)
class CfType:
    """One interface file. `controller` None means a core cgroup.* file present in every
    cgroup; otherwise the file exists only where that controller is enabled (the root has
    every controller). The mode follows the kernel: readable 0444, writable 0200, both 0644.

    `show(ctx, cg)` renders the contents; a file whose contents depend on the open file
    (memory.peak after a reset) sets `show_fd(ctx, cg, caller)` instead.
    """

    name: str
    where: Where
    show: Callable[[Context, Cgroup], str] | None = None
    write: Callable[[Context, Cgroup, str, Caller], None] | None = None
    controller: str | None = None
    show_fd: Callable[[Context, Cgroup, Caller], str] | None = None

    @property
    def readable(self) -> bool:
        return self.show is not None or self.show_fd is not None

    @property
    def mode(self) -> int:
        return (0o444 if self.readable else 0) | (0o200 if self.write else 0)

    def render(self, ctx: Context, cg: Cgroup, caller: Caller) -> str:
        if self.show_fd is not None:
            return self.show_fd(ctx, cg, caller)
        return self.show(ctx, cg)
