"""The enclave server and the reclaimer tasks under trio's MockClock: virtual time, so
the timing model is checked exactly and instantly. The model runs in-process here on
purpose: this is service logic, not filesystem behaviour."""

from __future__ import annotations

import errno
import os
import socket

import pytest
import trio
import trio.testing

from epcfs.model.cgroup import Hierarchy
from epcfs.model.constants import PAGE_SIZE
from epcfs.model.invariants import check_invariants
from epcfs.model.sgx import Sgx
from epcfs.protocol import decode, encode
from epcfs.service.enclave_server import EnclaveServer
from epcfs.service.enclave_socket import EnclaveSocket
from epcfs.service.reclaimers import Reclaimers
from epcfs.service.steps import Stepper
from epcfs.service.timing import COST_US
from tests.model.helpers import full_epc_with_one_reclaimable_page

MIB = 1 << 20


class StubTracker:
    """Just what the service asks of the process tracker, without /proc."""

    def __init__(self, hierarchy: Hierarchy) -> None:
        self.h = hierarchy
        self.killed: list[int] = []

    def cgroup_of(self, pid: int):
        return self.h.cgroup_of(pid)

    def deliver_oom_kills(self) -> None:
        self.killed += self.h.oom_kills
        self.h.oom_kills.clear()


@pytest.fixture
def autojump():
    return trio.testing.MockClock(autojump_threshold=0)


class Rig:
    def __init__(self, path: str, capacity: int, scale: float) -> None:
        self.h = Hierarchy()
        self.sections = [(0, capacity)]
        self.sgx = Sgx(self.h, self.sections)
        self.tracker = StubTracker(self.h)
        self.steps = Stepper(self.sgx, self.tracker, scale)
        self.reclaimers = Reclaimers(self.sgx, self.steps)
        self.server = EnclaveServer(self.sgx, self.tracker, self.sections, self.steps)
        self.path = path

    async def start(self, nursery: trio.Nursery, *, sanitize: bool = True) -> None:
        if sanitize:
            self.sgx.sanitize_all()
        await nursery.start(self.server.serve, EnclaveSocket(self.path).open())
        nursery.start_soon(self.reclaimers.run)

    async def connect(self) -> trio.socket.SocketType:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        await sock.connect(self.path)
        return sock


async def call(sock, op: str, **fields) -> dict:
    await sock.send(encode({"op": op, **fields}))
    return decode(await sock.recv(65536))


def usage(h: Hierarchy) -> int:
    return h.root.misc.res["sgx_epc"].usage


async def test_time_spent_is_the_cost_of_the_leaves(tmp_path, autojump):
    rig = Rig(str(tmp_path / "s"), 4 * MIB, scale=1.0)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        sock = await rig.connect()
        start = trio.current_time()
        assert (await call(sock, "create", size=2 * MIB))["ok"]
        assert (await call(sock, "add", offset=0, count=300, measured=False, tcs=False)) == {
            "ok": True, "count": 300}
        elapsed = trio.current_time() - start
        # ECREATE with its first VA page (EPA), then 300 EADDs (the next VA page is due
        # at the 512th).
        expected = (COST_US["ECREATE"] + COST_US["EPA"] + 300 * COST_US["EADD"]) / 1e6
        assert elapsed == pytest.approx(expected)
        sock.close()
        nursery.cancel_scope.cancel()


async def test_hangup_releases_everything(tmp_path, autojump):
    rig = Rig(str(tmp_path / "s"), 4 * MIB, scale=1.0)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        sock = await rig.connect()
        await call(sock, "create", size=4 * MIB)
        await call(sock, "add", offset=0, count=600, measured=True, tcs=False)
        assert usage(rig.h) == (600 + 2 + 1) * PAGE_SIZE  # pages, 2 VA pages, SECS
        sock.close()
        await trio.sleep(0.01)
        assert usage(rig.h) == 0
        check_invariants(rig.sgx)
        nursery.cancel_scope.cancel()


async def test_oversubscribed_load_completes_with_reclaim(tmp_path, autojump):
    """Heap = capacity: the sync path and ksgxd reclaim until every page is in."""
    capacity = 2 * MIB
    pages = capacity // PAGE_SIZE
    rig = Rig(str(tmp_path / "s"), capacity, scale=1.0)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        sock = await rig.connect()
        await call(sock, "create", size=2 * capacity)
        reply = await call(sock, "add", offset=0, count=pages, measured=False, tcs=False)
        assert reply == {"ok": True, "count": pages}
        assert (await call(sock, "init"))["ok"]
        assert (await call(sock, "touch", offset=0, count=4))["ok"]  # faults back in
        assert rig.sgx.encls["EWB"] > 0 and rig.sgx.encls["ELDU"] > 0
        check_invariants(rig.sgx)
        sock.close()
        await trio.sleep(0.01)
        assert usage(rig.h) == 0
        nursery.cancel_scope.cancel()


async def test_small_limit_fails_with_enomem_and_count(tmp_path, autojump):
    """Under capacity/512 a capacity-sized heap cannot load: its VA pages alone exceed
    the limit, and they are unreclaimable, so the charge ends in ENOMEM."""
    capacity = 64 * MIB
    rig = Rig(str(tmp_path / "s"), capacity, scale=0.0)
    cg = rig.h.mkdir(rig.h.root, "small")
    rig.h.write_subtree_control(rig.h.root, "+misc")
    cg.misc.res["sgx_epc"].max = capacity // 512
    rig.h.move(os.getpid(), cg)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        sock = await rig.connect()
        await call(sock, "create", size=2 * capacity)
        reply = await call(sock, "add", offset=0, count=capacity // PAGE_SIZE,
                           measured=False, tcs=False)
        assert reply["errno"] == errno.ENOMEM
        assert 0 < reply["count"] < capacity // PAGE_SIZE
        sock.close()
        await trio.sleep(0.01)
        assert cg.misc.res["sgx_epc"].usage == 0
        nursery.cancel_scope.cancel()


async def test_ksgxd_boot_pass_frees_pages_over_time(tmp_path, autojump):
    rig = Rig(str(tmp_path / "s"), 8 * MIB, scale=1.0)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery, sanitize=False)
        assert rig.sgx.free_pages < 8 * MIB // PAGE_SIZE
        await trio.sleep(1.0)
        assert rig.sgx.free_pages == 8 * MIB // PAGE_SIZE
        nursery.cancel_scope.cancel()


async def test_unknown_op_and_junk_get_einval(tmp_path, autojump):
    rig = Rig(str(tmp_path / "s"), 1 * MIB, scale=0.0)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        sock = await rig.connect()
        assert (await call(sock, "frobnicate"))["errno"] == errno.EINVAL
        assert (await call(sock, "add", offset=0))["errno"] == errno.EINVAL
        await sock.send(b"\xff not json")
        assert decode(await sock.recv(65536))["errno"] == errno.EINVAL
        assert (await call(sock, "init"))["errno"] == errno.EINVAL  # nothing created
        sock.close()
        nursery.cancel_scope.cancel()


async def test_edmm_runs_direct_reclaim_first(tmp_path, autojump):
    """Each page of an EDMM ioctl is preceded by sgx_reclaim_direct: a cgroup at its
    limit gets pages written back before the trim, though nothing needed a new page."""
    capacity = 4 * MIB
    rig = Rig(str(tmp_path / "s"), capacity, scale=1.0)
    cg = rig.h.mkdir(rig.h.root, "edmm")
    rig.h.write_subtree_control(rig.h.root, "+misc")
    limit_pages = 256
    cg.misc.res["sgx_epc"].max = limit_pages * PAGE_SIZE
    rig.h.move(os.getpid(), cg)
    async with trio.open_nursery() as nursery:
        await rig.start(nursery)
        sock = await rig.connect()
        await call(sock, "create", size=2 * capacity)
        await call(sock, "add", offset=0, count=limit_pages - 2, measured=False, tcs=False)
        await call(sock, "init")
        written = rig.sgx.encls["EWB"]
        reply = await call(sock, "modify_types", offset=0, count=4, page_type=4)  # TRIM
        assert reply == {"ok": True, "count": 4}
        assert rig.sgx.encls["EWB"] > written
        check_invariants(rig.sgx)
        sock.close()
        await trio.sleep(0.01)
        assert cg.misc.res["sgx_epc"].usage == 0
        nursery.cancel_scope.cancel()


async def test_a_vepc_fault_that_cannot_reclaim_waits_without_spinning(tmp_path, autojump):
    """Issue 10 item 5. The EPC is fully charged with one page on an LRU and nothing woke
    ksgxd (tests/model/test_vepc.py builds that state the way the kernel reaches it). A
    vEPC fault then gets EBUSY on the no-reclaim path, as in the kernel, and retries; the
    root has no limit, so the work item it queues does nothing. The request stays
    pending, but the daemon does not spin (a handful of tries a second), other requests
    are answered meanwhile, and once another task frees pages the fault goes through."""
    rig = Rig(str(tmp_path / "s"), 1 * MIB, scale=1.0)
    rig.sgx.sanitize_all()
    pid = os.getpid()
    encl, _ = full_epc_with_one_reclaimable_page(rig.h, rig.sgx, pid)
    root = rig.h.root.misc.res["sgx_epc"]
    replies: list[dict] = []
    async with trio.open_nursery() as nursery:
        await rig.start(nursery, sanitize=False)
        vmm = await rig.connect()

        async def fault() -> None:
            replies.append(await call(vmm, "vepc", count=1))

        nursery.start_soon(fault)
        await trio.sleep(1.0)
        tries = root.events
        await trio.sleep(10.0)
        assert replies == [] and 0 < root.events - tries <= 60  # ≤ 4 tries a second
        other = await rig.connect()
        assert (await call(other, "info"))["ok"]  # the daemon answers others meanwhile
        rig.sgx.release(encl)  # its owner exits: three pages free
        rig.steps.settle()
        await trio.sleep(1.0)
        assert replies == [{"ok": True}]
        check_invariants(rig.sgx)
        vmm.close()
        other.close()
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
