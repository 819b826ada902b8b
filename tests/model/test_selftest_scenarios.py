"""The cgroup selftest's scenarios (kernel-facts §5) with numbers derived from §3:
an enclave whose heap is the whole EPC capacity C, under misc limits of C/512 (SMALL),
C/128 (LARGE) and C (LARGER), and under memory.max = C - 2*LARGE."""

import errno

import pytest

from epcfs.model import Blocked, KernelError, SgxPageType
from epcfs.model.constants import PAGE_SIZE, SGX_VA_SLOT_COUNT
from epcfs.model.invariants import check_invariants

from .helpers import MiB, cgroup, encl_size, make_sgx, usage_pages

C = 16 * MiB
HEAP = C // PAGE_SIZE
TEST_ENCL_PAGES = 10
"""test_encl.elf's non-heap pages (2 TCS + code and data): kernel-facts says 8–12."""
SMALL, LARGE, LARGER = C // 512, C // 128, C


def unreclaimable_floor() -> int:
    """VA pages + SECS of one fully built test enclave: floor(N/512) + 1 + 1."""
    return (HEAP + TEST_ENCL_PAGES) // SGX_VA_SLOT_COUNT + 2


class Proc:
    """One test_sgx process building its enclave; `step` pages per ADD_PAGES call."""

    def __init__(self, sgx, pid):
        self.sgx, self.pid = sgx, pid
        self.encl = sgx.create(pid, encl_size(TEST_ENCL_PAGES + HEAP))
        sgx.add_pages(self.encl, pid, 0, 2, True, SgxPageType.TCS)
        sgx.add_pages(self.encl, pid, 2, TEST_ENCL_PAGES - 2, True)
        self.next = TEST_ENCL_PAGES
        self.result = None

    def step(self, pages):
        end = TEST_ENCL_PAGES + HEAP
        try:
            n = self.sgx.add_pages(self.encl, self.pid, self.next, min(pages, end - self.next),
                                   False)
        except Blocked as b:
            n = b.count
        except KernelError as e:
            self.next += e.count
            self.fail(e.errno)
            return
        self.next += n
        if self.next == end:
            self.sgx.init(self.encl)
            self.result = "ok"
            self.sgx.release(self.encl)  # the test passes and the process exits

    def fail(self, why):
        self.result = why
        self.sgx.release(self.encl)
        self.sgx.h.exit(self.pid)


def run_lockstep(h, sgx, path, nprocs, pages_per_step, **limits):
    cg = cgroup(h, path, *range(1, nprocs + 1), **limits)
    procs = []
    for pid in range(1, nprocs + 1):
        try:
            procs.append(Proc(sgx, pid))
        except KernelError as e:
            procs.append(None)
            assert e.errno == errno.ENOMEM
    procs = [p for p in procs if p is not None]
    while any(p.result is None for p in procs):
        for p in procs:
            if p.result is None:
                p.step(pages_per_step)
            for victim in h.oom_kills:  # the service delivers SIGKILL
                for q in procs:
                    if q.pid == victim and q.result is None:
                        q.fail("oom-killed")
            h.oom_kills.clear()
        check_invariants(sgx)
    return cg, [p.result for p in procs]


def test_small_limit_fails_because_va_pages_alone_exceed_it():
    h, sgx = make_sgx((0, C))
    assert unreclaimable_floor() > SMALL // PAGE_SIZE
    cgroup(h, "/small_parent", misc_max=SMALL)
    cg, results = run_lockstep(h, sgx, "/small_parent/small", 1, HEAP)
    assert results == [errno.ENOMEM]
    assert usage_pages(cg) == 0 and cg.memory.usage == 0


@pytest.mark.parametrize(("nprocs", "expect"), [(4, "some succeed"), (5, "some fail")])
def test_large_limit_one_page_at_a_time(nprocs, expect):
    h, sgx = make_sgx((0, C))
    assert 4 * unreclaimable_floor() > LARGE // PAGE_SIZE >= 3 * unreclaimable_floor()
    cg, results = run_lockstep(h, sgx, "/large", nprocs, 1, misc_max=LARGE)
    if expect == "some succeed":
        assert "ok" in results
    else:
        assert any(r != "ok" for r in results)
    assert usage_pages(cg) == 0 and cg.memory.usage == 0
    assert h.root.misc.res["sgx_epc"].usage == 0


def test_larger_limit_every_enclave_loads_with_reclaim():
    h, sgx = make_sgx((0, C // 2), (1, C // 2))
    cg, results = run_lockstep(h, sgx, "/larger", 8, 256, misc_max=LARGER)
    assert results == ["ok"] * 8
    assert sgx.encls["EWB"] > 6 * HEAP  # eight heaps of C through a C-sized EPC
    assert usage_pages(cg) == 0 and cg.memory.usage == 0 and cg.memory.watermark > HEAP


def test_memory_limit_fails_every_enclave():
    h, sgx = make_sgx((0, C))
    memory_max = (C - 2 * LARGE) // PAGE_SIZE
    cg, results = run_lockstep(h, sgx, "/large", 4, 64, misc_max=LARGE,
                               memory_max=memory_max)
    assert "ok" not in results and "oom-killed" in results
    assert cg.memory.events["oom_kill"] >= 1 and cg.memory.usage == 0
    assert usage_pages(cg) == 0
