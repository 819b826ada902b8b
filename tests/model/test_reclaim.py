"""Reclamation (kernel-facts §3): the batch in three steps, the age check, backing-store
charges, the synchronous path in try_charge, async work and should_reclaim, direct
reclaim, ksgxd's watermarks, and the fairness iterator."""

import errno

import pytest

from epcfs.model import KernelError
from epcfs.model.constants import (
    PAGE_SIZE,
    SGX_CG_LOW_LIMIT,
    SGX_CG_MIN_FREE_PAGE,
    SGX_NR_HIGH_PAGES,
    SGX_NR_LOW_PAGES,
    SGX_NR_TO_SCAN,
)
from epcfs.model.invariants import check_invariants
from epcfs.model.runs import RunState

from .helpers import MiB, cgroup, encl_size, make_sgx, usage_pages

PID = 100


def loaded(sgx, pid, pages):
    encl = sgx.create(pid, encl_size(pages))
    sgx.add_pages(encl, pid, 0, pages, False)
    return encl


def test_a_batch_in_three_steps():
    h, sgx = make_sgx()
    cg = cgroup(h, "/t", PID)
    encl = loaded(sgx, PID, 40)
    batch = sgx.reclaim.isolate(cg.misc, PID)
    assert batch.scanned == SGX_NR_TO_SCAN and sgx.lru_pages(cg.misc) == 40 - SGX_NR_TO_SCAN
    assert encl.pages.get(0).state is RunState.ISOLATED and usage_pages(cg) == 42
    check_invariants(sgx)
    assert sgx.reclaim.writeback(batch) == SGX_NR_TO_SCAN
    assert encl.pages.get(0).state is RunState.EVICTED and usage_pages(cg) == 42
    assert encl.va_used == 16 and encl.nr_pcmd == 1 and cg.memory.usage == 17
    assert sgx.encls["EBLOCK"] == sgx.encls["EWB"] == 16 and sgx.encls["ETRACK"] == 1
    check_invariants(sgx)
    assert sgx.reclaim.free_batch(batch) == 16 and usage_pages(cg) == 26 and not sgx.reclaim.batches
    with pytest.raises(ValueError):
        sgx.reclaim.free_batch(batch)
    check_invariants(sgx)


def test_accessed_pages_get_a_second_chance():
    h, sgx = make_sgx()
    cg = cgroup(h, "/t", PID)
    encl = loaded(sgx, PID, 20)
    sgx.init(encl)
    sgx.fault(encl, PID, 3)
    batch = sgx.reclaim.reclaim_pages(cg.misc)
    assert batch.scanned == 16 and batch.written == 15
    lru = list(cg.misc.epc.lru)
    assert (lru[-1].start, len(lru[-1]), lru[-1].young) == (3, 1, False)  # at the tail, old
    check_invariants(sgx)


def test_backing_charge_failure_keeps_the_page_and_asks_the_oom_killer():
    h, sgx = make_sgx()
    cg = cgroup(h, "/t", PID, 200, memory_max=5)
    h.declare_memory(200, 1)
    loaded(sgx, PID, 20)
    batch = sgx.reclaim.reclaim_pages(cg.misc, None)
    assert batch.written == 3 and batch.failed == 13  # 3 contents + 1 PCMD fill the 4 left
    assert cg.memory.usage == 5 and h.oom_kills == [PID]  # the owner holds the most
    assert sgx.lru_pages(cg.misc) == 17
    check_invariants(sgx)


def test_sync_reclaim_targets_the_charging_subtree_only():
    h, sgx = make_sgx()
    parent = cgroup(h, "/p", misc_max=50 * PAGE_SIZE)
    a = cgroup(h, "/p/a", PID)
    cgroup(h, "/p/b", 200)
    loaded(sgx, 200, 40)  # b's pages are reclaimable
    vepc = sgx.create_vepc(PID)
    for i in range(8):
        sgx.vepc_fault(vepc, PID, i)
    with pytest.raises(KernelError) as e:
        sgx.create(PID, 1 << 20)  # a has nothing on an LRU: ENOMEM, b is not touched
    assert e.value.errno == errno.ENOMEM and sgx.lru_pages(parent.children["b"].misc) == 40
    assert parent.misc.res["sgx_epc"].events_local == 1 and a.misc.res["sgx_epc"].events == 0
    check_invariants(sgx)


def test_every_retry_of_the_sync_path_counts_an_event():
    h, sgx = make_sgx()
    cg = cgroup(h, "/t", PID, misc_max=40 * PAGE_SIZE)
    loaded(sgx, PID, 38)  # VA + SECS + 38 = the limit
    sgx.create(PID, PAGE_SIZE * 64)
    assert cg.misc.res["sgx_epc"].events == 1  # one round freed 16, enough for 2 pages
    cg.misc.res["sgx_epc"].max = 42 * PAGE_SIZE
    sgx.create(PID, PAGE_SIZE * 64)  # headroom for both pages: no event
    assert cg.misc.res["sgx_epc"].events == 1
    check_invariants(sgx)


def test_fairness_iterator_walks_descendants_in_pre_order():
    h, sgx = make_sgx()
    cgroup(h, "/a/a1")
    cgroup(h, "/a/a2/x")
    cgroup(h, "/b")
    root = h.root.misc
    order = [sgx.reclaim.next_cg(root).cgroup.path for _ in range(7)]
    assert order == ["/", "/a", "/a/a1", "/a/a2", "/a/a2/x", "/b", "/"]
    a = h.lookup("/a").misc
    assert [sgx.reclaim.next_cg(a).cgroup.path for _ in range(5)] == ["/a", "/a/a1", "/a/a2",
                                                               "/a/a2/x", "/a"]


def test_a_freed_cgroup_is_skipped_by_every_ancestors_iterator():
    h, sgx = make_sgx()
    cgroup(h, "/a/a1")
    cgroup(h, "/a/a2")
    root, a = h.root.misc, h.lookup("/a").misc
    sgx.reclaim.next_cg(root)
    sgx.reclaim.next_cg(root)  # root's next is now /a/a1
    sgx.reclaim.next_cg(a)  # a's next is /a/a1 too
    h.rmdir(h.lookup("/a/a1"))
    assert root.epc.next_cg.cgroup.path == "/a/a2" and a.epc.next_cg.cgroup.path == "/a/a2"
    h.rmdir(h.lookup("/a/a2"))
    assert root.epc.next_cg is root and a.epc.next_cg is a
    check_invariants(sgx)


def test_rounds_rotate_between_cgroups():
    h, sgx = make_sgx()
    for name, pid in (("a", 1), ("b", 2)):
        cgroup(h, f"/{name}", pid)
        loaded(sgx, pid, 64)
    a, b = h.lookup("/a").misc, h.lookup("/b").misc
    sgx.reclaim.reclaim_global()  # root's own LRU is empty, then /a
    assert (sgx.lru_pages(a), sgx.lru_pages(b)) == (48, 64)
    sgx.reclaim.reclaim_global()
    assert (sgx.lru_pages(a), sgx.lru_pages(b)) == (48, 48)
    sgx.reclaim.reclaim_global()
    assert (sgx.lru_pages(a), sgx.lru_pages(b)) == (32, 48)
    check_invariants(sgx)


@pytest.mark.parametrize(("limit", "threshold"), [
    (SGX_CG_LOW_LIMIT, SGX_CG_LOW_LIMIT),  # small limits: reclaim only at the limit
    (SGX_CG_LOW_LIMIT + 1, SGX_CG_LOW_LIMIT + 1 - SGX_CG_MIN_FREE_PAGE),
    (400, 400 - SGX_CG_MIN_FREE_PAGE),
])
def test_should_reclaim_thresholds(limit, threshold):
    h, sgx = make_sgx()
    parent = cgroup(h, "/p", misc_max=limit * PAGE_SIZE)
    cg = cgroup(h, "/p/c", PID)
    encl = sgx.create(PID, 1 << 22)
    assert not sgx.reclaim.should_reclaim(cg.misc)
    sgx.add_pages(encl, PID, 0, threshold - 3, False)
    assert usage_pages(cg) == threshold - 1 and not sgx.reclaim.should_reclaim(cg.misc)
    sgx.add_pages(encl, PID, threshold - 3, 1, False)
    assert sgx.reclaim.should_reclaim(cg.misc)  # the parent's limit counts, the child's usage
    assert not sgx.reclaim.should_reclaim(parent.misc) or threshold == usage_pages(parent)


def test_no_reclaim_failure_queues_async_work_that_runs_until_below_threshold():
    h, sgx = make_sgx()
    cg = cgroup(h, "/t", PID, misc_max=200 * PAGE_SIZE)
    encl = loaded(sgx, PID, 300)
    sgx.init(encl)
    cg.misc.res["sgx_epc"].max = cg.misc.res["sgx_epc"].usage
    assert sgx.fault(encl, PID, 0).name == "RETRY" and list(sgx.reclaim.async_work) == [cg.misc]
    rounds = 0
    for _ in sgx.reclaim.work_item.steps(cg.misc):  # two steps per batch, one batch per round here
        rounds += 1
    rounds //= 2
    assert cg.misc not in sgx.reclaim.async_work
    limit = cg.misc.res["sgx_epc"].max // PAGE_SIZE - SGX_CG_MIN_FREE_PAGE
    assert rounds >= 2 and limit - 16 <= usage_pages(cg) < limit
    assert sgx.fault(encl, PID, 0).name == "OK"
    check_invariants(sgx)


def test_ksgxd_wakes_below_low_and_reclaims_up_to_high():
    h, sgx = make_sgx((0, MiB))  # 256 pages
    cgroup(h, "/t", PID)
    encl = sgx.create(PID, 1 << 20)
    sgx.add_pages(encl, PID, 0, 256 - 2 - SGX_NR_LOW_PAGES, False)
    assert not sgx.reclaim.take_ksgxd_wakeup() and sgx.free_pages == SGX_NR_LOW_PAGES
    assert sgx.reclaim.should_wake_ksgxd()  # below HIGH, but nobody woke ksgxd yet
    sgx.add_pages(encl, PID, 256 - 2 - SGX_NR_LOW_PAGES, 1, False)
    assert sgx.reclaim.take_ksgxd_wakeup() and not sgx.reclaim.take_ksgxd_wakeup()
    assert sgx.reclaim.ksgxd().scanned
    assert SGX_NR_HIGH_PAGES <= sgx.free_pages < SGX_NR_HIGH_PAGES + SGX_NR_TO_SCAN
    assert not sgx.reclaim.ksgxd().scanned
    check_invariants(sgx)


def test_direct_reclaim_goes_global_when_free_pages_are_low():
    h, sgx = make_sgx((0, MiB))
    cgroup(h, "/t", PID)
    encl = sgx.create(PID, 1 << 20)
    sgx.add_pages(encl, PID, 0, 240, False)
    free = sgx.free_pages
    assert free < SGX_NR_LOW_PAGES
    done = sgx.reclaim.reclaim_direct(PID)
    assert done.freed == SGX_NR_TO_SCAN and sgx.free_pages == free + SGX_NR_TO_SCAN
    check_invariants(sgx)


def test_global_reclaim_when_the_cgroup_has_room_but_epc_is_dirty():
    h, sgx = make_sgx((0, MiB), sanitize=False)
    sgx.sanitize(100)
    cgroup(h, "/t", PID)
    encl = sgx.create(PID, 1 << 20)
    sgx.add_pages(encl, PID, 0, 150, False)  # free runs out first: global rounds
    assert sgx.free_pages <= SGX_NR_TO_SCAN and encl.nr_evicted >= 50
    assert sgx.reclaim.take_ksgxd_wakeup()
    check_invariants(sgx)


def test_an_allocation_between_its_steps_keeps_every_page_accounted():
    """A create running its global rounds step by step (the free list is empty, the
    misc charge succeeds): first its VA page's charge waits for a page, then the VA page
    waits for the SECS. Each is counted where it is, so the whole truth holds at every
    step, and nothing is left waiting once the create is done or closed."""
    for close_after in (None, 1, 2, 3, 4):
        h, sgx = make_sgx((0, MiB), sanitize=False)
        sgx.sanitize(100)
        cgroup(h, "/t", PID)
        encl = sgx.create(PID, 1 << 20)
        sgx.add_pages(encl, PID, 0, sgx.free_pages, False)
        assert sgx.free_pages == 0 and usage_pages(h.root.children["t"]) == 100
        steps = sgx.create.steps(PID, PAGE_SIZE)
        seen = set()
        step = 0
        try:
            while True:
                next(steps)
                step += 1
                seen |= {bool(sgx.allocator.waiting), bool(sgx.allocator.held)}
                check_invariants(sgx)
                if step == close_after:
                    steps.close()
                    break
        except StopIteration:
            pass
        assert not sgx.allocator.waiting and not sgx.allocator.held
        check_invariants(sgx)
        if close_after is None:
            assert seen == {True, False} and len(sgx.enclaves) == 2


def test_add_pages_charges_the_cgroup_the_process_is_in_at_each_page():
    """A process moved while its ADD_PAGES is in progress: the pages added after the move
    are charged to its new cgroup, as each allocation charges `current`'s."""
    h, sgx = make_sgx()
    a, b = cgroup(h, "a", 100), cgroup(h, "b")
    encl = sgx.create(100, 1 << 24)
    steps = sgx.add_pages.steps(encl, 100, 0, 2048, False)
    next(steps)
    steps.send(None)  # a first chunk, charged to a
    before = usage_pages(a)
    h.move(100, b)
    with pytest.raises(StopIteration):
        while True:
            steps.send(None)
    assert usage_pages(a) == before
    assert usage_pages(b) > 0
    check_invariants(sgx)


def test_edmm_over_evicted_pages_charges_the_cgroup_the_process_moved_to():
    """RESTRICT_PERMISSIONS over evicted pages, the process moved after its first step to
    a cgroup of 8 pages: the loads charge the new cgroup and reclaim there as they go,
    instead of failing a charge the old cgroup's room had promised (EBUSY)."""
    h, sgx = make_sgx()
    cgroup(h, "a", 200)
    b = cgroup(h, "b", misc_max=8 * PAGE_SIZE)
    encl = sgx.create(200, 1 << 22)
    sgx.add_pages(encl, 200, 0, 1024, False)
    sgx.init(encl)
    while sgx.reclaim.can_reclaim_global():
        sgx.reclaim.reclaim_global(None)
    assert encl.nr_evicted
    steps = sgx.edmm.restrict_permissions.steps(encl, 200, 0, 1024)
    steps.send(None)
    h.move(200, b)
    with pytest.raises(StopIteration) as done:
        while True:
            steps.send(None)
    assert done.value.value == 1024
    assert usage_pages(b) <= 8
    check_invariants(sgx)
