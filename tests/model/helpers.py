"""Small builders shared by the model tests."""

from __future__ import annotations

from collections.abc import Callable

from epcfs.model import Blocked, Cgroup, Fault, Hierarchy, KernelError, Sgx
from epcfs.model.constants import PAGE_SIZE, SGX_EPC

MiB = 1 << 20


def make_sgx(*sections: tuple[int, int], sanitize: bool = True,
             bulk: bool = True) -> tuple[Hierarchy, Sgx]:
    """A hierarchy with misc and memory enabled at the root, and an SGX on `sections`
    (default: one 16 MiB section on node 0), sanitized unless told otherwise."""
    h = Hierarchy()
    sgx = Sgx(h, list(sections) or [(0, 16 * MiB)], bulk=bulk)
    if sanitize:
        sgx.sanitize_all()
    h.write_subtree_control(h.root, "+misc +memory")
    return h, sgx


def cgroup(h: Hierarchy, path: str, *pids: int, misc_max: int | None = None,
           memory_max: int | None = None) -> Cgroup:
    """mkdir -p `path` with misc and memory enabled on every level, then move `pids` in.
    Limits are in bytes (misc) and pages (memory)."""
    cg = h.root
    for name in path.strip("/").split("/"):
        if name not in cg.children:
            if not cg.is_root:
                h.write_subtree_control(cg, "+misc +memory")
            h.mkdir(cg, name)
        cg = cg.children[name]
    for pid in pids:
        h.move(pid, cg)
    if misc_max is not None:
        cg.misc.res[SGX_EPC].max = misc_max
    if memory_max is not None:
        cg.memory.max = memory_max
    return cg


def usage_pages(cg: Cgroup) -> int:
    return cg.misc.res[SGX_EPC].usage // PAGE_SIZE


def encl_size(pages: int) -> int:
    """The test_sgx sizing rule: the smallest power of two holding `pages` pages."""
    return max(PAGE_SIZE, 1 << (pages * PAGE_SIZE - 1).bit_length())


def full_epc_with_one_reclaimable_page(h, sgx, pid):
    """The EPC fully charged with one page on an LRU, and nothing woke ksgxd since it
    last ran: an enclave's only child was written back by ksgxd (its SECS with it), a
    vEPC took all but two free pages, then the enclave faulted its page back (ELDU of
    SECS and child, no reclaim), taking the last two. The wake-up check of those two
    allocations ran while the LRU was empty; the page joined it right after."""
    encl = sgx.create(pid, 1 << 20)
    sgx.add_pages(encl, pid, 0, 1, False)
    sgx.init(encl)
    vepc = sgx.create_vepc(pid)
    while sgx.free_pages:
        assert sgx.vepc_fault(vepc, pid, vepc.nr_pages) is Fault.OK
    assert sgx.reclaim.take_ksgxd_wakeup()
    sgx.reclaim.ksgxd()  # writes the child back, and the SECS after its last child: 2 pages free
    assert sgx.lru_pages(h.root.misc) == 0 and sgx.free_pages == 2
    assert sgx.fault(encl, pid, 0) is Fault.OK
    assert sgx.free_pages == 0 and sgx.lru_pages(h.root.misc) == 1
    assert not sgx.reclaim.take_ksgxd_wakeup()
    return encl, vepc


def outcome(call: Callable[[], object]) -> object:
    """What a model call answered, as comparable data: its result, or the error (errno
    and pages done) or Blocked (pages done) it raised."""
    try:
        return call()
    except KernelError as e:
        return ("error", e.errno, e.count)
    except Blocked as e:
        return ("blocked", e.count)
