"""Enclave operations: ECREATE, EADD with VA growth, EINIT, faults (ELDU, EAUG), the
EDMM ioctls and release (kernel-facts §3, enclave growth and error outcomes)."""

import errno

import pytest

from epcfs.model import Blocked, Fault, KernelError, SgxPageType
from epcfs.model.constants import PAGE_SIZE, SGX_EEXTENDS_PER_PAGE
from epcfs.model.invariants import check_invariants
from epcfs.model.runs import RunState

from .helpers import MiB, cgroup, encl_size, make_sgx, usage_pages
from .snapshot import snapshot

PID = 100


def evict_all(sgx, css):
    while sgx.lru_pages(css):
        sgx.reclaim.reclaim_pages(css)


@pytest.fixture
def env():
    h, sgx = make_sgx((0, 4 * MiB))
    cg = cgroup(h, "/t", PID)
    return h, sgx, cg


def test_create_takes_a_va_page_and_the_secs(env):
    h, sgx, cg = env
    encl = sgx.create(PID, 1 << 20)
    assert usage_pages(cg) == 2 and encl.va_pages == 1 and encl.page_cnt == 1
    assert sgx.encls["ECREATE"] == 1 and sgx.encls["EPA"] == 1
    assert encl.owner == PID and encl.size_pages == 256 and not encl.initialized
    for size in (0, 3 * PAGE_SIZE, 2048):
        with pytest.raises(KernelError) as e:
            sgx.create(PID, size)
        assert e.value.errno == errno.EINVAL
    check_invariants(sgx)


@pytest.mark.parametrize("bulk", [True, False])
def test_a_new_va_page_comes_with_the_512th_1024th_page(bulk):
    h, sgx = make_sgx((0, 8 * MiB), bulk=bulk)
    encl = sgx.create(PID, 8 << 20)
    expected = {511: 1, 512: 2, 1023: 2, 1024: 3, 1536: 4}
    added = 0
    for total, va in expected.items():
        sgx.add_pages(encl, PID, added, total - added, False)
        added = total
        assert encl.va_pages == va == total // 512 + 1
        check_invariants(sgx)
    assert sgx.encls["EADD"] == 1536 and sgx.encls["EPA"] == 4


def test_measured_pages_cost_sixteen_eextends(env):
    h, sgx, cg = env
    encl = sgx.create(PID, 1 << 20)
    sgx.add_pages(encl, PID, 0, 3, True, SgxPageType.TCS)
    sgx.add_pages(encl, PID, 3, 5, False)
    assert sgx.encls["EEXTEND"] == 3 * SGX_EEXTENDS_PER_PAGE and sgx.encls["EADD"] == 8
    assert usage_pages(cg) == 2 + 8 and sgx.lru_pages(cg.misc) == 8


def test_add_pages_errors_carry_the_count(env):
    h, sgx, cg = env
    encl = sgx.create(PID, 64 * PAGE_SIZE)
    sgx.add_pages(encl, PID, 10, 1, False)
    with pytest.raises(KernelError) as e:
        sgx.add_pages(encl, PID, 5, 10, False)
    assert (e.value.errno, e.value.count) == (errno.EBUSY, 5)
    assert encl.nr_pages == 6
    for args in ((60, 5), (-1, 2), (0, 0)):
        with pytest.raises(KernelError) as e:
            sgx.add_pages(encl, PID, *args, False)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(KernelError) as e:
        sgx.add_pages(encl, PID, 20, 1, False, SgxPageType.TRIM)
    assert e.value.errno == errno.EINVAL
    sgx.init(encl)
    with pytest.raises(KernelError) as e:
        sgx.init(encl)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(KernelError) as e:
        sgx.add_pages(encl, PID, 20, 1, False)
    assert e.value.errno == errno.EINVAL
    check_invariants(sgx)


def test_enomem_when_only_unreclaimable_pages_are_charged(env):
    h, sgx, cg = env
    cg.misc.res["sgx_epc"].max = 3 * PAGE_SIZE
    encl = sgx.create(PID, 64 * PAGE_SIZE)
    sgx.add_pages(encl, PID, 0, 1, False)  # VA + SECS + 1: at the limit
    sgx.release(encl)
    encl = sgx.create(PID, 1 << 22)
    with pytest.raises(KernelError) as e:
        sgx.add_pages(encl, PID, 0, 600, False)  # evicts until a 2nd VA page is due
    assert e.value.errno == errno.ENOMEM and e.value.count == 511
    assert cg.misc.res["sgx_epc"].events >= 1
    check_invariants(sgx)


def _loaded(sgx, cg, pages, limit_pages):
    cg.misc.res["sgx_epc"].max = limit_pages * PAGE_SIZE
    encl = sgx.create(PID, encl_size(pages))
    sgx.add_pages(encl, PID, 0, pages, False)
    sgx.init(encl)
    return encl


def test_fault_loads_an_evicted_page_without_reclaim(env):
    h, sgx, cg = env
    encl = _loaded(sgx, cg, 200, 64)
    assert encl.pages.get(0).state is RunState.EVICTED
    cg.misc.res["sgx_epc"].max = cg.misc.res["sgx_epc"].usage
    assert sgx.fault(encl, PID, 0) is Fault.RETRY  # EBUSY: at the limit, no reclaim here
    assert cg.misc in sgx.reclaim.async_work and sgx.reclaim.should_reclaim(cg.misc)
    while sgx.reclaim.async_work:
        sgx.reclaim.work_item(cg.misc)
    assert usage_pages(cg) < 64
    memory = cg.memory.usage
    assert sgx.fault(encl, PID, 0) is Fault.OK
    run = encl.pages.get(0)
    assert run.state is RunState.LRU and run.young and sgx.encls["ELDU"] == 1
    assert cg.memory.usage == memory - 1  # the contents page left the backing
    assert sgx.fault(encl, PID, 0) is Fault.OK and sgx.encls["ELDU"] == 1
    assert sgx.fault(encl, PID, encl.size_pages) is Fault.SIGBUS
    check_invariants(sgx)


def test_secs_follows_its_last_child_and_comes_back_first(env):
    h, sgx, cg = env
    encl = sgx.create(PID, 64 * PAGE_SIZE)
    sgx.add_pages(encl, PID, 0, 40, False)
    evict_all(sgx, cg.misc)
    assert encl.secs_css is not None  # not initialized: the SECS stays
    sgx.init(encl)
    assert sgx.fault(encl, PID, 3) is Fault.OK
    evict_all(sgx, cg.misc)
    assert encl.secs_css is None and encl.secs_memcg is cg.memory
    assert usage_pages(cg) == 1  # only the VA page
    ewb = sgx.encls["EWB"]
    assert ewb == 40 + 1 + 1
    assert sgx.fault(encl, PID, 7) is Fault.OK
    assert encl.secs_css is cg.misc and sgx.encls["ELDU"] == 1 + 2
    check_invariants(sgx)


def test_backing_store_is_contents_plus_a_pcmd_page_per_32_indices(env):
    h, sgx, cg = env
    encl = sgx.create(PID, 128 * PAGE_SIZE)
    sgx.add_pages(encl, PID, 0, 70, False)
    evict_all(sgx, cg.misc)
    assert encl.nr_evicted == 70 and encl.nr_pcmd == 3 and encl.va_used == 70
    assert cg.memory.usage == 70 + 3
    sgx.init(encl)
    for i in range(64, 70):  # empty PCMD page 2
        sgx.fault(encl, PID, i)
    assert encl.nr_pcmd == 2 and cg.memory.usage == 64 + 2
    sgx.release(encl)
    assert cg.memory.usage == 0 and usage_pages(cg) == 0
    check_invariants(sgx)


def test_eaug_grows_an_initialized_enclave(env):
    h, sgx, cg = env
    encl = sgx.create(PID, 1024 * PAGE_SIZE)
    assert sgx.eaug(encl, PID, 5) is Fault.SIGBUS  # not initialized
    sgx.add_pages(encl, PID, 0, 510, False)
    sgx.init(encl)
    assert sgx.fault(encl, PID, 600) is Fault.OK  # an absent page: EAUG
    assert sgx.eaug(encl, PID, 601) is Fault.OK
    assert sgx.encls["EAUG"] == 2 and encl.va_pages == 2  # the 512th page took a VA page
    assert sgx.eaug(encl, PID, 601) is Fault.OK and sgx.encls["EAUG"] == 2
    cg.misc.res["sgx_epc"].max = cg.misc.res["sgx_epc"].usage
    assert sgx.eaug(encl, PID, 700) is Fault.RETRY
    check_invariants(sgx)


def test_edmm_trim_accept_remove(env):
    h, sgx, cg = env
    encl = sgx.create(PID, 64 * PAGE_SIZE)
    sgx.add_pages(encl, PID, 0, 2, True, SgxPageType.TCS)
    sgx.add_pages(encl, PID, 2, 30, False)
    with pytest.raises(KernelError) as e:
        sgx.edmm.modify_types(encl, PID, 2, 4, SgxPageType.TRIM)
    assert e.value.errno == errno.EINVAL  # not initialized
    sgx.init(encl)
    with pytest.raises(KernelError) as e:
        sgx.edmm.remove_pages(encl, PID, 2, 4)
    assert (e.value.errno, e.value.count) == (errno.EPERM, 0)  # not trimmed
    assert sgx.edmm.modify_types(encl, PID, 0, 10, SgxPageType.TRIM) == 10
    with pytest.raises(KernelError) as e:
        sgx.edmm.remove_pages(encl, PID, 0, 10)
    assert (e.value.errno, e.value.count) == (errno.EPERM, 0)  # not EACCEPTed
    assert sgx.edmm.accept(encl, 0, 6) == 6
    before = usage_pages(cg)
    va = encl.va_pages
    with pytest.raises(KernelError) as e:
        sgx.edmm.remove_pages(encl, PID, 0, 10)
    assert (e.value.errno, e.value.count) == (errno.EPERM, 6)  # the first 6 went
    assert sgx.edmm.accept(encl, 6, 4) == 4
    assert sgx.edmm.remove_pages(encl, PID, 6, 4) == 4
    assert usage_pages(cg) == before - 10 and encl.va_pages == va
    assert encl.page_cnt == 1 + 22 and encl.nr_pages == 22
    with pytest.raises(KernelError) as e:
        sgx.edmm.remove_pages(encl, PID, 0, 1)
    assert e.value.errno == errno.EFAULT  # gone
    check_invariants(sgx)


def test_edmm_type_rules(env):
    h, sgx, cg = env
    encl = sgx.create(PID, 64 * PAGE_SIZE)
    sgx.add_pages(encl, PID, 0, 1, True, SgxPageType.TCS)
    sgx.add_pages(encl, PID, 1, 9, False)
    sgx.init(encl)
    for args, code in (((0, 1, SgxPageType.TCS), errno.EINVAL),
                       ((1, 1, SgxPageType.REG), errno.EINVAL),
                       ((60, 10, SgxPageType.TRIM), errno.EINVAL)):
        with pytest.raises(KernelError) as e:
            sgx.edmm.modify_types(encl, PID, *args)
        assert e.value.errno == code
    with pytest.raises(KernelError) as e:
        sgx.edmm.restrict_permissions(encl, PID, 0, 2)
    assert e.value.errno == errno.EINVAL  # TCS permissions cannot be restricted
    assert sgx.edmm.restrict_permissions(encl, PID, 1, 9) == 9
    assert sgx.encls["EMODPR"] == 9 and sgx.encls["ETRACK"] == 9
    head = sgx.lru_pages(cg.misc)
    sgx.edmm.modify_types(encl, PID, 1, 1, SgxPageType.TCS)
    lru = list(cg.misc.epc.lru)
    assert lru[-1].start == 1 and len(lru[-1]) == 1 and sgx.lru_pages(cg.misc) == head
    sgx.edmm.modify_types(encl, PID, 0, 2, SgxPageType.TRIM)  # TCS → TRIM is allowed
    check_invariants(sgx)


def test_edmm_on_pages_held_by_the_reclaimer(env):
    h, sgx, cg = env
    encl = sgx.create(PID, 64 * PAGE_SIZE)
    sgx.add_pages(encl, PID, 0, 20, False)
    sgx.init(encl)
    batch = sgx.reclaim.isolate(cg.misc, None)  # pages 0..15
    sgx.edmm.modify_types(encl, PID, 18, 1, SgxPageType.TRIM)
    sgx.edmm.accept(encl, 18, 1)
    with pytest.raises(KernelError) as e:
        sgx.edmm.modify_types(encl, PID, 2, 1, SgxPageType.TCS)
    assert e.value.errno == errno.EAGAIN
    sgx.edmm.modify_types(encl, PID, 3, 1, SgxPageType.TRIM)  # no unmark needed
    sgx.edmm.accept(encl, 3, 1)
    with pytest.raises(KernelError) as e:
        sgx.edmm.remove_pages(encl, PID, 3, 1)
    assert e.value.errno == errno.EBUSY
    assert sgx.edmm.remove_pages(encl, PID, 18, 1) == 1
    assert sgx.fault(encl, PID, 4) is Fault.OK  # served from the isolated page...
    sgx.reclaim.writeback(batch)
    assert encl.pages.get(4).state is RunState.LRU  # ...so the age check kept it
    sgx.reclaim.free_batch(batch)
    check_invariants(sgx)


def test_edmm_runs_direct_reclaim_first(env):
    h, sgx, cg = env
    encl = _loaded(sgx, cg, 300, 200)
    assert usage_pages(cg) >= 200 - 32 and sgx.reclaim.should_reclaim(cg.misc)  # limit > 128: -32
    before, usage = sgx.encls["EWB"], usage_pages(cg)
    sgx.edmm.restrict_permissions(encl, PID, encl.nr_pages - 1, 1)  # a resident page
    assert sgx.encls["EWB"] == before + 16 and usage_pages(cg) == usage - 16
    check_invariants(sgx)


def test_edmm_load_is_no_reclaim_eagain_or_efault():
    h, sgx = make_sgx((0, 4 * MiB))
    parent = cgroup(h, "/p", misc_max=60 * PAGE_SIZE)
    a = cgroup(h, "/p/a", PID)
    cgroup(h, "/p/b", 200)
    encl = sgx.create(PID, 128 * PAGE_SIZE)
    sgx.add_pages(encl, PID, 0, 100, False)
    sgx.init(encl)
    vepc = sgx.create_vepc(200)
    i = 0
    while sgx.vepc_fault(vepc, 200, i) is Fault.OK:  # b fills what a left of p's limit
        i += 1
    assert usage_pages(parent) == 60 and not sgx.reclaim.should_reclaim(a.misc)
    with pytest.raises(KernelError) as e:  # no direct reclaim for a, the charge fails on p
        sgx.edmm.modify_types(encl, PID, 0, 1, SgxPageType.TRIM)
    assert e.value.errno == errno.EAGAIN
    evict_all(sgx, a.misc)
    while sgx.vepc_fault(vepc, 200, i) is Fault.OK:
        i += 1
    assert usage_pages(parent) == 60 and not sgx.lru_pages(a.misc)
    with pytest.raises(KernelError) as e:  # nothing reclaimable under a: ENOMEM
        sgx.edmm.modify_types(encl, PID, 0, 1, SgxPageType.TRIM)
    assert e.value.errno == errno.EFAULT
    check_invariants(sgx)


def test_release_frees_everything_and_leaves_isolated_pages_to_the_batch(env):
    h, sgx, cg = env
    encl = _loaded(sgx, cg, 300, 100)
    assert cg.memory.usage > 0
    batch = sgx.reclaim.isolate(cg.misc, None)
    assert batch.scanned == 16
    sgx.release(encl)
    assert usage_pages(cg) == 16 and cg.memory.usage == 0
    check_invariants(sgx)
    assert sgx.reclaim.writeback(batch) == 0
    assert sgx.reclaim.free_batch(batch) == 16
    assert usage_pages(cg) == 0 and sgx.free_pages == sgx.epc.total_pages
    check_invariants(sgx)
    sgx.release(encl)  # twice is harmless
    with pytest.raises(KernelError) as e:
        sgx.add_pages(encl, PID, 0, 1, False)
    assert e.value.errno == errno.EBADF
    assert sgx.fault(encl, PID, 0) is Fault.SIGBUS


def test_release_between_writeback_and_free(env):
    h, sgx, cg = env
    encl = _loaded(sgx, cg, 300, 100)
    batch = sgx.reclaim.isolate(cg.misc, PID)
    assert sgx.reclaim.writeback(batch) == 16
    sgx.release(encl)
    check_invariants(sgx)
    assert usage_pages(cg) == 16  # the emptied pages are still the batch's
    sgx.reclaim.free_batch(batch)
    assert usage_pages(cg) == 0 and cg.memory.usage == 0
    check_invariants(sgx)


def test_blocked_when_the_backing_store_cannot_be_charged():
    h, sgx = make_sgx((0, 4 * MiB))
    cg = cgroup(h, "/t", PID, 200, misc_max=64 * PAGE_SIZE, memory_max=10)
    h.declare_memory(200, 8)
    encl = sgx.create(PID, 1 << 20)
    with pytest.raises(Blocked) as b:
        sgx.add_pages(encl, PID, 0, 200, False)
    added = b.value.count
    assert 60 <= added < 200 and h.oom_kills == [200]  # the bigger process is the victim
    assert cg.memory.events["max"] >= 1
    check_invariants(sgx)
    with pytest.raises(Blocked) as b:  # the victim has not exited yet
        sgx.add_pages(encl, PID, added, 200 - added, False)
    assert b.value.count == 0 and h.oom_kills == [200]
    h.exit(200)
    assert sgx.add_pages(encl, PID, added, 200 - added, False) == 200 - added
    assert h.oom_kills == [200, PID]  # the caller became the victim: forced through
    check_invariants(sgx)


def test_touching_resident_runs_equals_faulting_each_page():
    """touch_resident (the enclave server's way over runs) leaves the model exactly as
    faulting every page does: accessed bits set, evicted pages loaded, absent ones
    EAUGed, the same counters."""

    def build():
        h, sgx = make_sgx((0, 2 * MiB))  # 512 pages
        cgroup(h, "/t", PID, misc_max=300 * PAGE_SIZE)
        encl = sgx.create(PID, 1 << 22)
        sgx.add_pages(encl, PID, 0, 400, False)  # the first ~100 are written back
        sgx.init(encl)
        sgx.fault(encl, PID, 250)
        return h, sgx, encl

    def fault(h, sgx, encl, i):  # retried as the enclave server does, the work item between
        while (outcome := sgx.fault(encl, PID, i)) is Fault.RETRY:
            sgx.reclaim.work_item(h.root.children["t"].misc)
        assert outcome is Fault.OK

    h1, one, e1 = build()
    h2, runs, e2 = build()
    for a, b in ((60, 140), (380, 420)):  # evicted then resident; resident then absent
        for i in range(a, b):
            fault(h1, one, e1, i)
        i = a
        while i < b:
            i += runs.touch_resident(e2, i, b - i)
            if i < b:
                fault(h2, runs, e2, i)
                i += 1
    assert one.encls["ELDU"] > 0 and one.encls["EAUG"] > 0
    assert snapshot(one) == snapshot(runs)
    check_invariants(runs)


def test_creates_that_interleave_get_distinct_enclaves():
    """ECREATE may reclaim, so two can be between their steps at once (the daemon runs
    them so): each gets its own id, and both are released cleanly."""
    h, sgx = make_sgx((0, MiB))  # 256 pages
    cgroup(h, "/t", PID, PID + 1, misc_max=20 * PAGE_SIZE)
    filler = sgx.create(PID, 1 << 20)
    sgx.add_pages(filler, PID, 0, 18, False)  # at the limit: each create must reclaim
    first, second = sgx.create.steps(PID, 1 << 20), sgx.create.steps(PID + 1, 1 << 20)
    next(first)  # isolated a batch, between its steps
    made = []
    for steps in (second, first):
        try:
            while True:
                next(steps)
        except StopIteration as stop:
            made.append(stop.value)
    assert made[0].id != made[1].id and len(sgx.enclaves) == 3
    for encl in (*made, filler):
        sgx.release(encl)
    assert not sgx.enclaves and usage_pages(h.root) == 0
    check_invariants(sgx)
