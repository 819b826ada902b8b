"""The misc controller's interface files (kernel/cgroup/misc.c's misc_cg_files).

Print rules: capacity and max list resources with capacity; current, peak and the
events files also list a capacity-less resource once its value is non-zero.
"""

from __future__ import annotations

import errno

from ..model.cgroup import Cgroup
from ..model.constants import U64_MAX
from ..model.errors import KernelError
from ..model.misc import MISC_RESOURCES
from .cftype import Caller, CfType, Context, Where
from .parse import kstrtoull, strstrip


def _capacity_show(ctx: Context, cg: Cgroup) -> str:
    cap = ctx.hierarchy.misc.capacity
    return "".join(f"{name} {cap[name]}\n" for name in MISC_RESOURCES if cap[name])


def _per_res(field: str, suffix: str = ""):
    """A show function printing one counter of every resource that has capacity or a
    non-zero value."""

    def show(ctx: Context, cg: Cgroup) -> str:
        cap = ctx.hierarchy.misc.capacity
        out = []
        for name in MISC_RESOURCES:
            value = getattr(cg.misc.res[name], field)
            if cap[name] or value:
                out.append(f"{name}{suffix} {value}\n")
        return "".join(out)

    return show


def _max_show(ctx: Context, cg: Cgroup) -> str:
    cap = ctx.hierarchy.misc.capacity
    out = []
    for name in MISC_RESOURCES:
        if cap[name]:
            value = cg.misc.res[name].max
            out.append(f"{name} {'max' if value == U64_MAX else value}\n")
    return "".join(out)


def _max_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    """misc_cg_max_write: `<resource> <max|u64>`, one resource per write. The limit is
    stored as written (bytes, not rounded); lowering it below usage takes nothing away."""
    name, space, value = strstrip(text).partition(" ")
    if name not in MISC_RESOURCES or not space:
        raise KernelError(errno.EINVAL, f"bad misc.max line {text!r}")
    limit = U64_MAX if value == "max" else kstrtoull(value)
    if not ctx.hierarchy.misc.capacity[name]:
        raise KernelError(errno.EINVAL, f"misc resource {name} has no capacity")
    cg.misc.res[name].max = limit


MISC_FILES = (
    CfType("misc.capacity", Where.ROOT, show=_capacity_show, controller="misc"),
    CfType("misc.max", Where.NONROOT, show=_max_show, write=_max_write, controller="misc"),
    CfType("misc.current", Where.ALL, show=_per_res("usage"), controller="misc"),
    CfType("misc.peak", Where.ALL, show=_per_res("watermark"), controller="misc"),
    CfType("misc.events", Where.NONROOT, show=_per_res("events", ".max"), controller="misc"),
    CfType("misc.events.local", Where.NONROOT, show=_per_res("events_local", ".max"),
           controller="misc"),
)
