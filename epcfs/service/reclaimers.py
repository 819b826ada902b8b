"""The reclaimers as trio tasks: ksgxd and the per-cgroup async work items.

The model decides what to reclaim; these tasks decide when, and run each batch as its
three steps (isolate → write back → free) with their cost in time between them, so
enclave operations, releases and file reads interleave with reclaim as on a real
machine, where ksgxd and the sgx_cg_wq workers run on other CPUs.
"""

from __future__ import annotations

import trio

from ..model.constants import SGX_NR_TO_SCAN
from ..model.misc import MiscCss
from ..model.reclaim import Round
from ..model.sgx import Sgx
from .steps import Stepper

SANITIZE_BATCH = 1024
"""Pages ksgxd's boot pass EREMOVEs per step: bounds how long one step holds the loop."""


class Reclaimers:
    def __init__(self, sgx: Sgx, steps: Stepper) -> None:
        self.sgx = sgx
        self.steps = steps
        self.ksgxd_wake = trio.Event()
        self.work_wake = trio.Event()
        self.running: set[MiscCss] = set()
        steps.listeners.append(self.kick)

    def kick(self) -> None:
        """After any model step: wake ksgxd if an allocation asked for it (the
        wake_up(&ksgxd_waitq) below SGX_NR_LOW_PAGES), and start queued work items."""
        if self.sgx.take_ksgxd_wakeup():
            self.ksgxd_wake.set()
        if any(css not in self.running for css in self.sgx.async_work):
            self.work_wake.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.ksgxd)
            while True:
                await self.work_wake.wait()
                self.work_wake = trio.Event()
                for css in list(self.sgx.async_work):
                    if css not in self.running:
                        self.running.add(css)
                        nursery.start_soon(self.work_item, css)

    async def ksgxd(self) -> None:
        """Boot: EREMOVE every page so it becomes free. Then sleep until woken, and run
        global rounds while fewer than SGX_NR_HIGH_PAGES are free."""
        while not self.sgx.sanitized:
            await self.steps.run(self.sgx.sanitize, SANITIZE_BATCH)
        while True:
            await self.ksgxd_wake.wait()
            self.ksgxd_wake = trio.Event()
            while self.sgx.should_wake_ksgxd():
                with self.steps.tracer.span("ksgxd reclaim", "ksgxd"):
                    await self.round(self.sgx.h.root.misc, SGX_NR_TO_SCAN)

    async def work_item(self, css: MiscCss) -> None:
        """sgx_cgroup_reclaim_work_func: rounds while the cgroup is near its limit."""
        try:
            while self.sgx.work_pending(css):
                with self.steps.tracer.span("async reclaim", f"async work {css.cgroup.path}"):
                    await self.round(css, SGX_NR_TO_SCAN)
        finally:
            self.running.discard(css)

    async def round(self, root: MiscCss, nr_to_scan: int, charge_pid: int | None = None,
                    ) -> Round:
        """sgx_cgroup_reclaim_pages: batches over root's subtree in the fairness
        iterator's order until nr_to_scan pages were scanned. `charge_pid` is the task
        reclaiming synchronously (its memcg pays for the backing store); None for ksgxd
        and the work items."""
        done = Round()
        while done.scanned < nr_to_scan and not self.sgx.lru_empty(root):
            cg = self.sgx.next_cg(root)
            with self.steps.tracer.on_behalf(cg):
                batch = await self.steps.run(self.sgx.isolate, cg, charge_pid)
                await self.steps.run(self.sgx.writeback, batch)
                await self.steps.run(self.sgx.free_batch, batch)
            done.add(batch)
        return done
