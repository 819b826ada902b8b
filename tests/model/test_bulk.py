"""The bulk ADD_PAGES path must give exactly what page-by-page gives.

Hypothesis writes random programs (cgroup layouts, limits, NUMA sections, partial
sanitization, several enclaves and processes, faults that set accessed bits, EINIT that
lets SECS pages go, ksgxd and async rounds) and runs each on two models, bulk on and
off, comparing the whole state after every operation.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epcfs.model import Blocked, Hierarchy, KernelError, Sgx, SgxPageType
from epcfs.model.constants import PAGE_SIZE, SGX_EPC
from epcfs.model.invariants import check_invariants

from .snapshot import snapshot

KiB = 1 << 10
EXAMPLES = int(os.environ.get("EPCFS_HYPOTHESIS_BULK", "100"))

KINDS = ["add"] * 8 + ["create"] * 2 + ["init", "fault", "fault", "release", "sanitize",
                                         "ksgxd", "async", "max", "edmm", "edmm"]
EDMM = ["trim", "tcs", "restrict", "accept", "remove"]


@st.composite
def ops(draw):
    kind = draw(st.sampled_from(KINDS))
    if kind == "add":
        return (kind, draw(st.integers(0, 7)), draw(st.integers(1, 3)), draw(st.floats(0, 1)),
                draw(st.integers(1, 900)), draw(st.booleans()), draw(st.integers(0, 2)))
    if kind == "create":
        return (kind, draw(st.integers(1, 3)), draw(st.integers(16, 23)))
    if kind == "fault":
        return (kind, draw(st.integers(0, 7)), draw(st.integers(1, 3)),
                draw(st.lists(st.floats(0, 1), min_size=1, max_size=6)))
    if kind == "edmm":
        return (kind, draw(st.integers(0, 7)), draw(st.sampled_from(EDMM)),
                draw(st.floats(0, 1)), draw(st.integers(1, 400)))
    if kind in ("init", "release"):
        return (kind, draw(st.integers(0, 7)))
    if kind == "sanitize":
        return (kind, draw(st.integers(0, 300)))
    if kind == "max":
        return (kind, draw(st.sampled_from([20, 64, 100, 300, 1000, 1 << 20])))
    return (kind,)


setups = st.fixed_dictionaries({
    "sections": st.sampled_from([[(0, 2048 * KiB)], [(0, 1024 * KiB), (1, 512 * KiB)],
                                 [(1, 768 * KiB), (0, 768 * KiB), (2, 256 * KiB)]]),
    "dirty": st.integers(0, 600),
    "layout": st.sampled_from(["flat", "nested", "shared"]),
    "misc_max": st.sampled_from([48, 100, 200, 400, 2000]),
    "memory_max": st.sampled_from([None, 40, 300, 3000]),
})


def edmm(sgx: Sgx, encl, what: str, first: int, count: int) -> int:
    """One EDMM ioctl (or EACCEPT) by the enclave's owner."""
    if what == "accept":
        return sgx.edmm.accept(encl, first, count)
    if what == "restrict":
        return sgx.edmm.restrict_permissions(encl, encl.owner, first, count)
    if what == "remove":
        return sgx.edmm.remove_pages(encl, encl.owner, first, count)
    ptype = SgxPageType.TRIM if what == "trim" else SgxPageType.TCS
    return sgx.edmm.modify_types(encl, encl.owner, first, count, ptype)


def execute(setup: dict, program: list, bulk: bool):
    """Run the program; yields (result, snapshot) after every operation."""
    h = Hierarchy()
    sgx = Sgx(h, setup["sections"], bulk=bulk)
    sgx.sanitize(sgx.epc.total_pages - setup["dirty"])
    h.write_subtree_control(h.root, "+misc +memory")
    a, b = h.mkdir(h.root, "a"), h.mkdir(h.root, "b")
    limited = a
    if setup["layout"] == "nested":
        h.write_subtree_control(a, "+misc +memory")
        h.move(1, h.mkdir(a, "a1"))
        h.move(3, h.mkdir(a, "a2"))
    else:
        h.move(1, a)
        h.move(3, a if setup["layout"] == "shared" else b)
    h.move(2, b)
    limited.misc.res[SGX_EPC].max = setup["misc_max"] * PAGE_SIZE
    if setup["memory_max"] is not None:
        limited.memory.max = setup["memory_max"]
    encls = []
    for op in program:
        kind = op[0]
        result = None
        try:
            if kind == "create":
                encls.append(sgx.create(op[1], 1 << op[2]))
            elif kind == "add" and encls:
                building = [e for e in encls if not e.initialized and not e.released]
                if building:
                    e = building[op[1] % len(building)]
                    off = int(op[3] * (e.size_pages - 1))
                    count = min(op[4], e.size_pages - off)
                    result = sgx.add_pages(e, op[2], off, count, op[5], node=op[6])
            elif kind == "edmm" and encls:
                live = [e for e in encls if e.initialized and not e.released]
                if live:
                    e = live[op[1] % len(live)]
                    first = int(op[3] * (e.size_pages - 1))
                    count = min(op[4], e.size_pages - first)
                    result = edmm(sgx, e, op[2], first, count)
            elif kind == "init" and encls:
                e = encls[op[1] % len(encls)]
                if not e.initialized and not e.released:
                    sgx.init(e)
            elif kind == "fault" and encls:
                e = encls[op[1] % len(encls)]
                result = [sgx.fault(e, op[2], int(f * (e.size_pages - 1))) for f in op[3]]
            elif kind == "release" and encls:
                sgx.release(encls[op[1] % len(encls)])
            elif kind == "sanitize":
                result = sgx.sanitize(op[1])
            elif kind == "ksgxd":
                result = sgx.reclaim.ksgxd().scanned
            elif kind == "async":
                result = [sgx.reclaim.work_item(css).scanned
                          for css in list(sgx.reclaim.async_work)]
            elif kind == "max":
                limited.misc.res[SGX_EPC].max = op[1] * PAGE_SIZE
        except KernelError as e:
            result = ("error", e.errno, e.count)
        except Blocked as e:
            result = ("blocked", e.count)
        check_invariants(sgx)
        yield result, snapshot(sgx)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(setup=setups, program=st.lists(ops(), min_size=10, max_size=40))
def test_bulk_equals_page_by_page(setup, program):
    for step, (fast, slow) in enumerate(zip(execute(setup, program, True),
                                            execute(setup, program, False), strict=True)):
        assert fast[0] == slow[0], f"result of step {step}: {program[step]}"
        for key in fast[1]:
            assert fast[1][key] == slow[1][key], f"{key} after step {step}: {program[step]}"
