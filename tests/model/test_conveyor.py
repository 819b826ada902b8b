"""The folds over long ranges must give exactly what page by page gives.

An enclave bigger than the EPC walks its heap (Sgx.touch beside the reclaimers), EDMM
ioctls run over it (direct reclaim and loads in cycles), pages are removed while evicted.
Hypothesis draws the layout (NUMA sections, cgroups, limits, a second enclave, PCMD
alignment through the heap's offset) and a program of long operations, and runs each on
two models, folds on and off, comparing the whole state after every operation. A fold
that was never taken would make this pass trivially, so the suite also checks that the
folds do happen on the benchmark's shapes.
"""

from __future__ import annotations

import os
from functools import partial

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epcfs.model import Hierarchy, Sgx, SgxPageType
from epcfs.model.constants import PAGE_SIZE, PCMDS_PER_PAGE, SGX_EPC
from epcfs.model.conveyor import Conveyor, highest
from epcfs.model.engine import run
from epcfs.model.invariants import check_invariants

from .helpers import outcome
from .snapshot import snapshot

KiB = 1 << 10
EXAMPLES = int(os.environ.get("EPCFS_HYPOTHESIS_CONVEYOR", "300"))

progressions = st.lists(st.tuples(st.integers(0, 600), st.integers(1, 12)), max_size=4)


@given(st.sampled_from([16, 64]), st.integers(1, 40), progressions, progressions)
def test_highest_is_the_running_maximum(per, cycles, charged, freed):
    """highest() against the backing store's level after every cycle's write-back."""

    def below(events, x):
        return sum(1 for a, c in events for j in range(c) if a + PCMDS_PER_PAGE * j < x)

    level = [per + below(charged, per * (t + 1)) - below(freed, per * t)
             for t in range(cycles)]
    assert highest(per, cycles, charged, freed) == max(level)


setups = st.fixed_dictionaries({
    "sections": st.sampled_from([[(0, 1024 * KiB)], [(0, 512 * KiB), (1, 512 * KiB)],
                                 [(1, 768 * KiB), (0, 256 * KiB), (2, 512 * KiB)]]),
    "layout": st.sampled_from(["root", "child", "nested"]),
    "misc_max": st.sampled_from([None, 100, 600]),
    "memory_max": st.sampled_from([None, 200, 5000]),
    "heap": st.sampled_from([1.2, 2.0, 3.0]),
    "offset": st.integers(0, 40),
    "other": st.booleans(),
    "init": st.booleans(),
})

op = st.one_of(
    st.tuples(st.sampled_from(["touch", "touch alone"]), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.sampled_from(["trim", "restrict", "tcs", "remove"]), st.floats(0, 1),
              st.floats(0, 1)),
    st.tuples(st.sampled_from(["accept", "trim+accept"]), st.floats(0, 1), st.floats(0, 1)),
    st.tuples(st.just("touch"), st.just(0.0), st.just(1.0)),
    st.tuples(st.sampled_from(["ksgxd", "move"]), st.just(0.0), st.just(0.0)),
)

PID, OTHER = 1, 2


def execute(setup: dict, program: list, bulk: bool):
    """Yields (result, snapshot) after building and after every operation."""
    h = Hierarchy()
    sgx = Sgx(h, setup["sections"], bulk=bulk)
    sgx.sanitize_all()
    h.write_subtree_control(h.root, "+misc +memory")
    where = h.root
    if setup["layout"] != "root":
        where = h.mkdir(h.root, "a")
        if setup["layout"] == "nested":
            h.write_subtree_control(where, "+misc +memory")
            where = h.mkdir(where, "a1")
        h.move(PID, where)
        if setup["misc_max"] is not None:
            where.misc.res[SGX_EPC].max = setup["misc_max"] * PAGE_SIZE
        if setup["memory_max"] is not None:
            where.memory.max = setup["memory_max"]
    spare = h.mkdir(h.root, "b")
    pages = sgx.epc.total_pages
    first = 2 + setup["offset"]
    heap = int(pages * setup["heap"])
    size = 1 << ((first + heap) * PAGE_SIZE - 1).bit_length()
    encl = sgx.create(PID, size)
    if setup["other"]:
        other = sgx.create(OTHER, 64 * PAGE_SIZE)
        sgx.add_pages(other, OTHER, 0, 40, False)
    results = [outcome(lambda: sgx.add_pages(encl, PID, 0, first, True)),
               outcome(lambda: sgx.add_pages(encl, PID, first, heap, False))]
    if setup["init"]:
        sgx.init(encl)
    check_invariants(sgx)
    yield results, snapshot(sgx)
    edmm = sgx.edmm
    trim, tcs = SgxPageType.TRIM, SgxPageType.TCS
    calls = {  # each called with (first page, count)
        "touch": lambda i, n: run(sgx.touch.steps(encl, PID, i, n), sgx.reclaim.catch_up),
        "touch alone": lambda i, n: sgx.touch(encl, PID, i, n),  # Blocked at a wait
        "accept": lambda i, n: edmm.accept(encl, i, n),
        "trim+accept": lambda i, n: (edmm.modify_types(encl, PID, i, n, trim),
                                     edmm.accept(encl, i, n)),
        "ksgxd": lambda i, n: sgx.reclaim.ksgxd().scanned,
        "move": lambda i, n: h.move(PID, spare if h.cgroup_of(PID) is not spare else where),
        "restrict": lambda i, n: edmm.restrict_permissions(encl, PID, i, n),
        "remove": lambda i, n: edmm.remove_pages(encl, PID, i, n),
        "trim": lambda i, n: edmm.modify_types(encl, PID, i, n, trim),
        "tcs": lambda i, n: edmm.modify_types(encl, PID, i, n, tcs),
    }
    for kind, a, b in program:
        lo = first + int(a * (heap - 1))
        count = max(1, int(b * (first + heap - lo)))
        result = outcome(partial(calls[kind], lo, count))
        check_invariants(sgx)
        yield result, snapshot(sgx)


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(setups, st.lists(op, min_size=1, max_size=8))
def test_folds_equal_page_by_page(setup, program):
    folded = execute(setup, program, bulk=True)
    stepped = execute(setup, program, bulk=False)
    for step, ((r1, s1), (r2, s2)) in enumerate(zip(folded, stepped, strict=True)):
        assert r1 == r2, f"result differs after step {step}"
        assert s1 == s2, f"state differs after step {step}"


def test_the_folds_are_taken(monkeypatch):
    """On the benchmark's shapes (a heap twice the EPC walked twice; trim, accept and
    remove of a heap as big as the EPC) most pages go through a fold, and the result
    is the same as page by page."""
    taken = []
    fold = Conveyor.fold

    def counting(self, *args):
        n = fold(self, *args)
        taken.append(n)
        return n

    monkeypatch.setattr(Conveyor, "fold", counting)
    states = []
    for bulk in (True, False):
        taken.clear()
        h = Hierarchy()
        sgx = Sgx(h, [(0, 2048 * KiB), (1, 2048 * KiB)], bulk=bulk)
        sgx.sanitize_all()
        heap = 2 * sgx.epc.total_pages
        encl = sgx.create(PID, 1 << ((10 + heap) * PAGE_SIZE - 1).bit_length())
        sgx.add_pages(encl, PID, 0, 10 + heap, False)
        sgx.init(encl)
        for _ in range(2):
            assert run(sgx.touch.steps(encl, PID, 10, heap), sgx.reclaim.catch_up).name == "OK"
        walked = sum(taken)
        sgx.edmm.modify_types(encl, PID, 10, heap, SgxPageType.TRIM)
        run(sgx.touch.steps(encl, PID, 10, heap), sgx.reclaim.catch_up)
        sgx.edmm.accept(encl, 10, heap)
        sgx.edmm.remove_pages(encl, PID, 10, heap)
        check_invariants(sgx)
        if bulk:
            assert walked > heap, "the walks did not fold"
            assert sum(taken) > 2 * heap, "trim and accept did not fold"
        states.append(snapshot(sgx))
        assert encl.nr_pages == 10  # the measured pages before the heap stay
    assert states[0] == states[1]
