"""vEPC: guest pages charged to the VMM, never reclaimed; allocation failures reach the
guest as SIGBUS, EBUSY as a retry (kernel-facts §3, error outcomes)."""

from epcfs.model import Fault
from epcfs.model.constants import PAGE_SIZE

from .helpers import cgroup, make_sgx, usage_pages

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
    sgx.check_invariants()
    sgx.release_vepc(vepc)
    assert usage_pages(cg) == 0 and sgx.encls["EREMOVE"] == sgx.epc.total_pages + 4
    assert sgx.vepc_fault(vepc, VMM, 0) is Fault.SIGBUS
    sgx.check_invariants()


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
    assert list(sgx.async_work) == [cg.misc]
    sgx.work_item(cg.misc)
    assert sgx.vepc_fault(vepc, VMM, 3) is Fault.OK
    sgx.check_invariants()
