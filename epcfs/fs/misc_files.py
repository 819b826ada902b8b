"""The misc controller's interface files (kernel/cgroup/misc.c's misc_cg_files)."""

from __future__ import annotations

from ..model.cgroup import Cgroup
from ..model.misc import MISC_RESOURCES
from .cftype import CfType, Context, Where


def _capacity_show(ctx: Context, cg: Cgroup) -> str:
    cap = ctx.hierarchy.misc.capacity
    return "".join(f"{name} {cap[name]}\n" for name in MISC_RESOURCES if cap[name])


MISC_FILES = (
    CfType("misc.capacity", Where.ROOT, show=_capacity_show, controller="misc"),
)
