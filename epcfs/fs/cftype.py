"""The shape of an interface-file table row, like the kernel's struct cftype.

A controller declares its files once as a tuple of CfType rows; the Operations class
looks rows up by name and calls show/write, and knows nothing about any single file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from ..model.cgroup import Cgroup, Hierarchy


class Where(Enum):
    """Which cgroups carry the file (CFTYPE_ONLY_ON_ROOT / CFTYPE_NOT_ON_ROOT / both)."""

    ROOT = "root"
    NONROOT = "nonroot"
    ALL = "all"

    def admits(self, cg: Cgroup) -> bool:
        return self is Where.ALL or (self is Where.ROOT) == cg.is_root


@dataclass(frozen=True)
class Caller:
    """Who is writing: from the FUSE request context, recorded at open."""

    pid: int
    uid: int
    gid: int


@dataclass
class Context:
    """What show/write functions may touch besides the cgroup itself."""

    hierarchy: Hierarchy


@dataclass(frozen=True)
class CfType:
    """One interface file. `controller` None means a core cgroup.* file present in every
    cgroup; otherwise the file exists only where that controller is enabled (the root has
    every controller). The mode follows the kernel: readable 0444, writable 0200, both 0644.
    """

    name: str
    where: Where
    show: Callable[[Context, Cgroup], str] | None = None
    write: Callable[[Context, Cgroup, str, Caller], None] | None = None
    controller: str | None = None

    @property
    def mode(self) -> int:
        return (0o444 if self.show else 0) | (0o200 if self.write else 0)
