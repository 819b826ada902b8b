"""The core cgroup.* interface files (kernel/cgroup/cgroup.c's cgroup_base_files).

Parsing follows each kernel handler step by step, so errnos come out in its order.
"""

from __future__ import annotations

import errno

from ..host.pidns import to_caller_ns
from ..model.cgroup import CONTROLLERS, Cgroup, sorted_controllers
from ..model.constants import INT_MAX
from ..model.errors import KernelError
from ..model.misc import MiscCss
from .cftype import Caller, CfType, Context, Where
from .parse import kstrtoint, strstrip


def _lines(values) -> str:
    return "".join(f"{v}\n" for v in values)


def _controller_list(names) -> str:
    """Space-separated in subsystem order, newline-terminated; empty reads as 0 bytes."""
    names = sorted_controllers(names)
    return " ".join(names) + "\n" if names else ""


def _limit(value: int) -> str:
    return "max\n" if value == INT_MAX else f"{value}\n"


def _parse_limit(text: str) -> int:
    """cgroup_max_descendants_write / cgroup_max_depth_write: `max` or a non-negative int."""
    text = strstrip(text)
    value = INT_MAX if text == "max" else kstrtoint(text)
    if value < 0:
        raise KernelError(errno.ERANGE, "negative limit")
    return value


def _parse_pid(text: str) -> int:
    """cgroup_procs_write_start: any parse failure, overflow included, is EINVAL."""
    try:
        pid = kstrtoint(strstrip(text))
    except KernelError:
        raise KernelError(errno.EINVAL, "not a pid") from None
    if pid < 0:
        raise KernelError(errno.EINVAL, "negative pid")
    return pid


# -- cgroup.type ------------------------------------------------------------------------


def _type_show(ctx: Context, cg: Cgroup) -> str:
    return "domain\n"


def _type_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    """Only `threaded` is a valid value (EINVAL otherwise). Threaded cgroups are not
    modelled: epcfs answers EOPNOTSUPP, which the kernel also gives when a cgroup cannot
    be switched (populated, or domain controllers enabled)."""
    if strstrip(text) != "threaded":
        raise KernelError(errno.EINVAL, "cgroup.type accepts only 'threaded'")
    raise KernelError(errno.EOPNOTSUPP, "threaded cgroups are not supported by epcfs")


# -- cgroup.procs / cgroup.threads ------------------------------------------------------


def _procs_show(ctx: Context, cg: Cgroup, caller: Caller) -> str:
    """Members as the reader's pid namespace numbers them; those it cannot see are left
    out (cgroup_procs_show: task_pid_vnr, skipped when 0)."""
    return _lines(sorted(to_caller_ns(ctx.tracker.proc, ctx.tracker.members(cg), caller.pid)))


def _procs_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    ctx.tracker.attach(_parse_pid(text), cg, caller, threadgroup=True,
                       may_write=ctx.may_write_procs)


def _threads_show(ctx: Context, cg: Cgroup, caller: Caller) -> str:
    return _lines(to_caller_ns(ctx.tracker.proc, ctx.tracker.threads(cg), caller.pid))


def _threads_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    ctx.tracker.attach(_parse_pid(text), cg, caller, threadgroup=False,
                       may_write=ctx.may_write_procs)


# -- controllers ------------------------------------------------------------------------


def _controllers_show(ctx: Context, cg: Cgroup) -> str:
    return _controller_list(cg.controllers)


def _subtree_control_show(ctx: Context, cg: Cgroup) -> str:
    return _controller_list(cg.subtree_control)


def _subtree_control_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    ctx.tracker.settle()  # the EBUSY rule counts live processes only
    ctx.hierarchy.write_subtree_control(cg, strstrip(text))


# -- state ------------------------------------------------------------------------------


def _events_show(ctx: Context, cg: Cgroup) -> str:
    populated, frozen = ctx.tracker.events(cg)
    return f"populated {int(populated)}\nfrozen {int(frozen)}\n"


def _max_descendants_show(ctx: Context, cg: Cgroup) -> str:
    return _limit(cg.max_descendants)


def _max_descendants_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    ctx.hierarchy.set_max_descendants(cg, _parse_limit(text))


def _max_depth_show(ctx: Context, cg: Cgroup) -> str:
    return _limit(cg.max_depth)


def _max_depth_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    ctx.hierarchy.set_max_depth(cg, _parse_limit(text))


def _stat_show(ctx: Context, cg: Cgroup) -> str:
    """cgroup_stat_show: per controller, live csses in the subtree (self included, 0 if
    the controller is off here) and dying ones (killed but still charged)."""
    live = {name: 0 for name in CONTROLLERS}
    for sub in cg.walk():
        live["memory"] += sub.memory is not None
        live["misc"] += sub.misc is not None
    dying = {name: 0 for name in CONTROLLERS}
    for css in ctx.hierarchy.lingering:
        if any(a is cg for a in css.cgroup.ancestors()):
            dying["misc" if isinstance(css, MiscCss) else "memory"] += 1
    out = [f"nr_descendants {cg.nr_descendants}\n"]
    out += [f"nr_subsys_{name} {live[name]}\n" for name in CONTROLLERS]
    out.append(f"nr_dying_descendants {cg.nr_dying_descendants}\n")
    out += [f"nr_dying_subsys_{name} {dying[name]}\n" for name in CONTROLLERS]
    return "".join(out)


def _freeze_show(ctx: Context, cg: Cgroup) -> str:
    return f"{int(cg.freeze)}\n"


def _freeze_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    value = kstrtoint(strstrip(text))
    if value not in (0, 1):
        raise KernelError(errno.ERANGE, "cgroup.freeze takes 0 or 1")
    ctx.tracker.set_freeze(cg, bool(value))


def _kill_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    if kstrtoint(strstrip(text)) != 1:
        raise KernelError(errno.ERANGE, "cgroup.kill takes 1")
    ctx.tracker.kill(cg)


CORE_FILES = (
    CfType("cgroup.type", Where.NONROOT, show=_type_show, write=_type_write),
    CfType("cgroup.procs", Where.ALL, show_fd=_procs_show, write=_procs_write),
    CfType("cgroup.threads", Where.ALL, show_fd=_threads_show, write=_threads_write),
    CfType("cgroup.controllers", Where.ALL, show=_controllers_show),
    CfType("cgroup.subtree_control", Where.ALL, show=_subtree_control_show,
           write=_subtree_control_write),
    CfType("cgroup.events", Where.NONROOT, show=_events_show),
    CfType("cgroup.max.descendants", Where.ALL, show=_max_descendants_show,
           write=_max_descendants_write),
    CfType("cgroup.max.depth", Where.ALL, show=_max_depth_show, write=_max_depth_write),
    CfType("cgroup.stat", Where.ALL, show=_stat_show),
    CfType("cgroup.freeze", Where.NONROOT, show=_freeze_show, write=_freeze_write),
    CfType("cgroup.kill", Where.NONROOT, write=_kill_write),
)
