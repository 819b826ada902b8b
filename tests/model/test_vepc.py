"""vEPC: guest pages charged to the VMM, never reclaimed; allocation failures reach the
guest as SIGBUS, EBUSY as a retry (kernel-facts §3, error outcomes)."""

from epcfs.model import Fault
from epcfs.model.constants import PAGE_SIZE
from epcfs.model.invariants import check_invariants

from .helpers import MiB, cgroup, full_epc_with_one_reclaimable_page, make_sgx, usage_pages

VMM = 300


def test_guest_pages_are_charged_and_unreclaimable():
    h, sgx = make_sgx()
    cg = cgroup(h, "/vm", VMM)
    vepc = sgx.create_vepc(VMM)
    for i in (0, 1, 2, 7):
        assert sgx.vepc_fault(vepc, VMM, i) is Fault.OK
    assert sgx.vepc_fault(vepc, VMM, 1) is Fault.OK  # already backed
    assert usage_pages(cg) == 4 and sgx.lru_pages(cg.misc) == 0 and vepc.nr_pages == 4
    assert len(vepc.pages) == 2  # runs: 0..2 and 7
    check_invariants(sgx)
    sgx.release_vepc(vepc)
    assert usage_pages(cg) == 0 and sgx.encls["EREMOVE"] == sgx.epc.total_pages + 4
    assert sgx.vepc_fault(vepc, VMM, 0) is Fault.SIGBUS
    check_invariants(sgx)


def test_enomem_is_sigbus_and_ebusy_is_retry():
    h, sgx = make_sgx()
    cg = cgroup(h, "/vm", VMM, misc_max=3 * PAGE_SIZE)
    vepc = sgx.create_vepc(VMM)
    for i in range(3):
        assert sgx.vepc_fault(vepc, VMM, i) is Fault.OK
    assert sgx.vepc_fault(vepc, VMM, 3) is Fault.SIGBUS  # nothing reclaimable: ENOMEM
    assert cg.misc.res["sgx_epc"].events == 1
    cg.misc.res["sgx_epc"].max = 40 * PAGE_SIZE
    encl = sgx.create(VMM, 1 << 20)
    sgx.add_pages(encl, VMM, 0, 35, False)
    assert sgx.vepc_fault(vepc, VMM, 3) is Fault.RETRY  # an LRU page exists: EBUSY
    assert list(sgx.reclaim.async_work) == [cg.misc]
    sgx.reclaim.work_item(cg.misc)
    assert sgx.vepc_fault(vepc, VMM, 3) is Fault.OK
    check_invariants(sgx)


def test_vepc_fault_retries_while_nothing_can_reclaim_for_it():
    """Issue 10 item 5, the kernel's behaviour: the charge fails at capacity, the
    caller's subtree has a reclaimable page, so the no-reclaim path queues the cgroup's
    work item and answers EBUSY (VM_FAULT_RETRY). The work item reclaims only near a
    misc.max, and the root has none; ksgxd is woken only by an allocation that gets
    past its charge. So the fault keeps retrying until another task changes something:
    here the enclave's release."""
    h, sgx = make_sgx((0, MiB))
    encl, vepc = full_epc_with_one_reclaimable_page(h, sgx, VMM)
    for _ in range(3):
        assert sgx.vepc_fault(vepc, VMM, vepc.nr_pages) is Fault.RETRY
        assert list(sgx.reclaim.async_work) == [h.root.misc]
        assert not sgx.reclaim.work_item(h.root.misc).scanned and not sgx.reclaim.async_work
        assert not sgx.reclaim.take_ksgxd_wakeup()
    check_invariants(sgx)
    sgx.release(encl)
    assert sgx.vepc_fault(vepc, VMM, vepc.nr_pages) is Fault.OK
    check_invariants(sgx)


def test_a_reclaiming_allocation_ends_the_retrying():
    """Any allocation allowed to reclaim (another task's ioctl) takes the page off the
    LRU synchronously, and the SECS follows its last child: the new enclave gets both
    pages. Then nothing is reclaimable and the retrying fault gets SIGBUS (ENOMEM)."""
    h, sgx = make_sgx((0, MiB))
    encl, vepc = full_epc_with_one_reclaimable_page(h, sgx, VMM)
    assert sgx.vepc_fault(vepc, VMM, vepc.nr_pages) is Fault.RETRY
    sgx.create(VMM + 1, 1 << 20)
    assert sgx.lru_pages(h.root.misc) == 0 and encl.nr_evicted == 1
    assert sgx.vepc_fault(vepc, VMM, vepc.nr_pages) is Fault.SIGBUS
    check_invariants(sgx)
