"""The reclaimers as trio tasks: ksgxd and the per-cgroup async work items.

The model's engine has their loops (Sgx.reclaim.ksgxd and Sgx.reclaim.work_item);
these tasks decide when to run them and drive them through the Stepper, each batch's
steps (isolate → write back → free) with their cost in time between them, so enclave
operations, releases and file reads interleave with reclaim as on a real machine,
where ksgxd and the sgx_cg_wq workers run on other CPUs.
"""

from __future__ import annotations

import trio

from ..model.misc import MiscCss
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
        if self.sgx.reclaim.take_ksgxd_wakeup():
            self.ksgxd_wake.set()
        if any(css not in self.running for css in self.sgx.reclaim.async_work):
            self.work_wake.set()

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.ksgxd)
            while True:
                await self.work_wake.wait()
                self.work_wake = trio.Event()
                for css in list(self.sgx.reclaim.async_work):
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
            await self.steps.drive("ksgxd", self.sgx.reclaim.ksgxd.steps(),
                                   css=self.sgx.h.root.misc)

    async def work_item(self, css: MiscCss) -> None:
        """sgx_cgroup_reclaim_work_func: rounds while the cgroup is near its limit."""
        try:
            await self.steps.drive("work_item", self.sgx.reclaim.work_item.steps(css), css=css)
        finally:
            self.running.discard(css)
