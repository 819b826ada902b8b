"""The memory controller's interface files, as far as epcfs models memcg
(mm/memcontrol.c's memory_files: the non-root ones the EPC backing store needs).

Counters are pages in the model and bytes in the files; `max` is PAGE_COUNTER_MAX.
"""

from __future__ import annotations

import weakref

from ..model.cgroup import Cgroup
from ..model.constants import PAGE_COUNTER_MAX, PAGE_SIZE
from ..model.memory import MEMCG_EVENTS
from .cftype import Caller, CfType, Context, Where
from .parse import page_counter_memparse, strstrip


def _tunable(pages: int) -> str:
    """seq_puts_memcg_tunable: `max` for PAGE_COUNTER_MAX, else bytes."""
    return "max\n" if pages == PAGE_COUNTER_MAX else f"{pages * PAGE_SIZE}\n"


def _max_show(ctx: Context, cg: Cgroup) -> str:
    return _tunable(cg.memory.max)


def _max_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    """memory_max_write: store the limit, then reclaim/OOM-kill down to it. Nothing epcfs
    charges is reclaimable, so the model queues an OOM victim and the write returns; the
    tracker keeps killing after each exit until usage fits (the kernel's loop)."""
    pages = page_counter_memparse(strstrip(text), "max")
    ctx.hierarchy.set_memory_max(cg.memory, pages)
    ctx.tracker.deliver_oom_kills()


def _swap_max_show(ctx: Context, cg: Cgroup) -> str:
    return _tunable(cg.memory.swap_max)


def _swap_max_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    """Stored and shown; epcfs has no swap, so it limits nothing."""
    cg.memory.swap_max = page_counter_memparse(strstrip(text), "max")


def _current_show(ctx: Context, cg: Cgroup) -> str:
    return f"{cg.memory.usage * PAGE_SIZE}\n"


def _peak_show(ctx: Context, cg: Cgroup, caller: Caller) -> str:
    """peak_show: the all-time watermark, or after a write through this fd, the peak
    since the latest reset by any fd (6.12+)."""
    css = cg.memory
    value = caller.state.get("peak")
    peak = css.watermark if value is None else max(value, css.local_watermark)
    return f"{peak * PAGE_SIZE}\n"


def _peak_write(ctx: Context, cg: Cgroup, text: str, caller: Caller) -> None:
    """peak_write / of_peak_reset: any write resets this fd's peak to current usage and
    raises every other resetting fd's floor to it (the kernel's bookkeeping, quirks
    included)."""
    css = cg.memory
    usage = css.usage
    css.local_watermark = usage
    for key in [k for k, peers in ctx.peak_watchers.items() if not peers]:
        del ctx.peak_watchers[key]
    watchers = ctx.peak_watchers.setdefault(css, weakref.WeakSet())
    for peer in watchers:
        if usage > peer.state["peak"]:
            peer.state["peak"] = usage
    watchers.add(caller)
    caller.state["peak"] = usage


def _events(local: bool):
    def show(ctx: Context, cg: Cgroup) -> str:
        counts = cg.memory.events_local if local else cg.memory.events
        return "".join(f"{name} {counts[name]}\n" for name in MEMCG_EVENTS)

    return show


MEMORY_FILES = (
    CfType("memory.current", Where.NONROOT, show=_current_show, controller="memory"),
    CfType("memory.peak", Where.NONROOT, show_fd=_peak_show, write=_peak_write,
           controller="memory"),
    CfType("memory.max", Where.NONROOT, show=_max_show, write=_max_write, controller="memory"),
    CfType("memory.events", Where.NONROOT, show=_events(False), controller="memory"),
    CfType("memory.events.local", Where.NONROOT, show=_events(True), controller="memory"),
    CfType("memory.swap.max", Where.NONROOT, show=_swap_max_show, write=_swap_max_write,
           controller="memory"),
)
