"""cgroup v1 interface files: the core ones every legacy hierarchy has
(kernel/cgroup/cgroup-v1.c's cgroup1_base_files) and the memory controller's legacy
files, as far as epcfs models memcg (mm/memcontrol-v1.c: the page-counter files).

The misc controller registers the same table for both versions, so v1 uses MISC_FILES.

Decisions:
- `tasks` lists thread ids; writing a thread id moves its whole thread group (v1 would
  move that one thread; epcfs tracks processes, and every charge follows the process).
- `notify_on_release` and `cgroup.clone_children` are stored, shown and inherited at
  mkdir; no release agent is ever run. `release_agent` (root only) is stored; writing it
  needs uid 0 (the kernel: CAP_SYS_ADMIN in the initial user namespace), else EPERM.
- memory: no swap, so memsw usage equals memory usage; the root's usage is the sum of
  its children's (the model never charges the root memcg, as the kernel's v1 root sums
  its statistics instead). max_usage_in_bytes and failcnt are on non-root cgroups only.
"""

from __future__ import annotations

import errno

from ..model.cgroup import Cgroup
from ..model.constants import PAGE_SIZE
from ..model.errors import KernelError
from .cftype import Caller, CfType, Context, Where
from .core_files import _procs_show, _procs_write, _threads_show
from .parse import kstrtoull, page_counter_memparse, strstrip

PATH_MAX = 4096


# -- core -------------------------------------------------------------------------------


def _tasks_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    """cgroup1_tasks_write, except that the thread's whole thread group moves."""
    _procs_write(ctx, cg, text, caller)


def _flag(name: str):
    def show(ctx: Context, cg: Cgroup) -> str:
        return f"{int(getattr(cg, name))}\n"

    def write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
        """A write_u64 handler: kstrtoull base 0 of the stripped text; non-zero sets."""
        if cg.dying:
            raise KernelError(errno.ENODEV, cg.path)
        setattr(cg, name, kstrtoull(strstrip(text)) != 0)

    return show, write


_clone_show, _clone_write = _flag("clone_children")
_notify_show, _notify_write = _flag("notify_on_release")


def _sane_show(ctx: Context, cg: Cgroup) -> str:
    return "0\n"


def _release_agent_show(ctx: Context, cg: Cgroup) -> str:
    return f"{ctx.release_agent}\n"


def _release_agent_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    """cgroup_release_agent_write: privileged only, stripped, at most PATH_MAX - 1 bytes
    kept (strscpy truncates). Never run."""
    if caller.uid != 0:
        raise KernelError(errno.EPERM, "release_agent needs CAP_SYS_ADMIN")
    ctx.release_agent = strstrip(text)[: PATH_MAX - 1]


CORE_V1_FILES = (
    CfType("cgroup.procs", Where.ALL, show_fd=_procs_show, write=_procs_write),
    CfType("cgroup.clone_children", Where.ALL, show=_clone_show, write=_clone_write),
    CfType("cgroup.sane_behavior", Where.ROOT, show=_sane_show),
    CfType("tasks", Where.ALL, show_fd=_threads_show, write=_tasks_write),
    CfType("notify_on_release", Where.ALL, show=_notify_show, write=_notify_write),
    CfType("release_agent", Where.ROOT, show=_release_agent_show,
           write=_release_agent_write),
)


# -- memory -----------------------------------------------------------------------------


def _usage(cg: Cgroup) -> int:
    css = cg.memory
    if css.is_root:
        return sum(child.memory.usage for child in cg.children.values()
                   if child.memory is not None)
    return css.usage


def _usage_show(ctx: Context, cg: Cgroup) -> str:
    return f"{_usage(cg) * PAGE_SIZE}\n"


def _limit(field: str):
    def show(ctx: Context, cg: Cgroup) -> str:
        """Unlimited reads as PAGE_COUNTER_MAX pages in bytes (9223372036854771712)."""
        return f"{getattr(cg.memory, field) * PAGE_SIZE}\n"

    def write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
        """mem_cgroup_write RES_LIMIT: `-1` or memparse bytes, rounded down to pages."""
        pages = page_counter_memparse(strstrip(text), "-1")
        ctx.hierarchy.set_memory_limit_v1(cg.memory, pages, memsw=field == "memsw_max")

    return show, write


_limit_show, _limit_write = _limit("max")
_memsw_limit_show, _memsw_limit_write = _limit("memsw_max")


def _counter(watermark: str, failcnt: str):
    """show/write pairs for a page counter's max_usage_in_bytes and failcnt
    (mem_cgroup_reset: any text resets the peak to the usage, or the count to 0)."""

    def max_usage_show(ctx: Context, cg: Cgroup) -> str:
        return f"{getattr(cg.memory, watermark) * PAGE_SIZE}\n"

    def max_usage_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
        setattr(cg.memory, watermark, cg.memory.usage)

    def failcnt_show(ctx: Context, cg: Cgroup) -> str:
        return f"{getattr(cg.memory, failcnt)}\n"

    def failcnt_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
        setattr(cg.memory, failcnt, 0)

    return max_usage_show, max_usage_write, failcnt_show, failcnt_write


_max_usage_show, _max_usage_write, _failcnt_show, _failcnt_write = _counter(
    "watermark", "failcnt")
(_memsw_max_usage_show, _memsw_max_usage_write, _memsw_failcnt_show,
 _memsw_failcnt_write) = _counter("memsw_watermark", "memsw_failcnt")


MEMORY_V1_FILES = (
    CfType("memory.usage_in_bytes", Where.ALL, show=_usage_show, controller="memory"),
    CfType("memory.max_usage_in_bytes", Where.NONROOT, show=_max_usage_show,
           write=_max_usage_write, controller="memory"),
    CfType("memory.limit_in_bytes", Where.ALL, show=_limit_show, write=_limit_write,
           controller="memory"),
    CfType("memory.failcnt", Where.NONROOT, show=_failcnt_show, write=_failcnt_write,
           controller="memory"),
    CfType("memory.memsw.usage_in_bytes", Where.ALL, show=_usage_show, controller="memory"),
    CfType("memory.memsw.limit_in_bytes", Where.ALL, show=_memsw_limit_show,
           write=_memsw_limit_write, controller="memory"),
    CfType("memory.memsw.max_usage_in_bytes", Where.NONROOT, show=_memsw_max_usage_show,
           write=_memsw_max_usage_write, controller="memory"),
    CfType("memory.memsw.failcnt", Where.NONROOT, show=_memsw_failcnt_show,
           write=_memsw_failcnt_write, controller="memory"),
)
