"""EPC sections on NUMA nodes: capacity, boot sanitization, per-node free lists and
the allocation order (kernel-facts §3, NUMA / capacity)."""

import pytest

from epcfs.model import Fault, Hierarchy, Sgx
from epcfs.model.constants import PAGE_SIZE
from epcfs.model.invariants import check_invariants

from .helpers import MiB, make_sgx

SECTION_PAGES = MiB // PAGE_SIZE


def test_capacity_is_the_sum_of_the_sections():
    h = Hierarchy()
    sgx = Sgx(h, [(0, 64 * MiB), (1, 64 * MiB)])
    assert h.misc.capacity["sgx_epc"] == 128 * MiB
    assert sgx.node_total_bytes(0) == sgx.node_total_bytes(1) == 64 * MiB
    assert sgx.node_total_bytes(2) == 0


@pytest.mark.parametrize("sections", [[], [(0, MiB)] * 9, [(0, 100)], [(-1, MiB)]])
def test_bad_sections_are_refused(sections):
    with pytest.raises(ValueError):
        Sgx(Hierarchy(), sections)


def test_pages_become_free_only_as_ksgxd_sanitizes_them():
    h, sgx = make_sgx((1, MiB), (0, MiB), sanitize=False)
    assert sgx.free_pages == 0 and not sgx.sanitized
    vepc = sgx.create_vepc(1)
    assert sgx.vepc_fault(vepc, 1, 0) is Fault.SIGBUS  # ENOMEM: nothing free or reclaimable
    assert sgx.sanitize(SECTION_PAGES + 10) == SECTION_PAGES + 10
    assert sgx.epc.nodes[1].free == SECTION_PAGES and sgx.epc.nodes[0].free == 10  # section order
    assert sgx.encls["EREMOVE"] == SECTION_PAGES + 10
    assert sgx.sanitize_all() == SECTION_PAGES - 10 and sgx.sanitized
    assert sgx.sanitize(5) == 0
    assert sgx.vepc_fault(vepc, 1, 0) is Fault.OK
    check_invariants(sgx)


@pytest.mark.parametrize(("node", "order"), [(1, [1, 3, 0]), (2, [3, 0, 1]), (5, [0, 1, 3]),
                                             (None, [0, 1, 3])])
def test_allocation_walks_nodes_from_the_local_one_and_wraps_once(node, order):
    h, sgx = make_sgx((0, MiB), (1, MiB), (3, MiB))
    vepc = sgx.create_vepc(1)
    taken = []
    for i in range(3 * SECTION_PAGES):
        before = {n: sgx.epc.nodes[n].free for n in (0, 1, 3)}
        assert sgx.vepc_fault(vepc, 1, i, node=node) is Fault.OK
        taken.append(next(n for n in (0, 1, 3) if sgx.epc.nodes[n].free < before[n]))
    assert taken == [n for n in order for _ in range(SECTION_PAGES)]
    assert sgx.vepc_fault(vepc, 1, 10**6, node=node) is Fault.SIGBUS  # all nodes empty
    check_invariants(sgx)


def test_freed_pages_go_back_to_their_own_node():
    h, sgx = make_sgx((0, MiB), (1, MiB))
    vepc = sgx.create_vepc(1)
    for i in range(SECTION_PAGES + 5):
        sgx.vepc_fault(vepc, 1, i, node=0)
    assert (sgx.epc.nodes[0].free, sgx.epc.nodes[1].free) == (0, SECTION_PAGES - 5)
    sgx.release_vepc(vepc)
    assert (sgx.epc.nodes[0].free, sgx.epc.nodes[1].free) == (SECTION_PAGES, SECTION_PAGES)
    check_invariants(sgx)
