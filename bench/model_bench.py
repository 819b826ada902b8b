"""How fast the EPC model simulates, and what it costs in memory at large EPC sizes.

    .venv/bin/python bench/model_bench.py [--capacities 128M,1G,4G,64G] [--seconds 2]
        [--budget 20]

Prints three tables:

1. One oversubscribed enclave load per capacity C, each in a fresh process (so peak RSS
   is that load's): test_sgx's enclave (10 measured pages, then a heap of C) is created
   and every page EADDed with reclaim as needed, in one ADD_PAGES call for the heap,
   then EINIT. Once in a cgroup without an EPC limit (only the capacity binds) and once
   under misc.max = C/128 (the selftest's LARGE: nearly every page is written back).
2. Simulated page operations per second, unpaced (no timing model): ENCLS leaves that
   move a page (EADD, EWB, ELDU, EAUG, EREMOVE) per second of model time, for
   - the load as the enclave server issues it (ADD_PAGES in chunks of 512 pages),
   - the same load page by page (bulk path off: the reference implementation),
   - an enclave accessing pages of a heap twice the EPC with a stride (every access
     to an evicted page is a fault: ELDU on the no-reclaim path, RETRY, the reclaimers
     run, fault again), page by page by nature: each access is its own call.
3. test_sgx's unclobbered_vdso_oversubscribed_remove per capacity, unpaced, each
   operation kind timed on its own with its page ops/s and its ratio to 128M: the
   load, MODIFY_TYPES to TRIM over the heap, EACCEPT of every heap page (the enclave
   accesses the heap first, as the enclave server runs it), REMOVE_PAGES over the
   heap; and an enclave walking twice through a twice-oversubscribed heap (Sgx.touch,
   the reclaimers running whenever a fault waits). Each kind goes in SLICES calls, so
   that one that has not finished after --budget seconds stops between two; its time
   is then projected from its rate so far (marked ~).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import errno  # noqa: E402

from epcfs.model import Fault, Hierarchy, KernelError, Sgx, SgxPageType  # noqa: E402
from epcfs.model.constants import PAGE_SIZE, SGX_EPC  # noqa: E402
from epcfs.model.engine import run  # noqa: E402
from epcfs.model.invariants import check_invariants  # noqa: E402
from epcfs.units import parse_size  # noqa: E402

TEST_ENCL_PAGES = 10
"""test_encl.elf's pages before the heap (2 TCS + code and data)."""
ADD_CHUNK = 512
"""Pages per ADD_PAGES step, as the enclave server issues them."""
PAGE_OPS = ("EADD", "EWB", "ELDU", "EAUG", "EREMOVE")
PID = 1000


def machine(capacity: int, limit: int | None, bulk: bool = True) -> tuple[Hierarchy, Sgx]:
    """Two NUMA nodes sharing the capacity, sanitized; PID alone in /bench."""
    h = Hierarchy()
    sgx = Sgx(h, [(0, capacity // 2), (1, capacity - capacity // 2)], bulk=bulk)
    sgx.sanitize_all()
    h.write_subtree_control(h.root, "+misc +memory")
    cg = h.mkdir(h.root, "bench")
    h.move(PID, cg)
    if limit is not None:
        cg.misc.res[SGX_EPC].max = limit
    return h, sgx


def build(sgx: Sgx, heap: int, chunk: int | None):
    """The test_sgx enclave with a `heap`-page heap; `chunk` pages per ADD_PAGES (None:
    the whole heap at once)."""
    pages = TEST_ENCL_PAGES + heap
    encl = sgx.create(PID, 1 << (pages * PAGE_SIZE - 1).bit_length())
    sgx.add_pages(encl, PID, 0, 2, True, SgxPageType.TCS)
    sgx.add_pages(encl, PID, 2, TEST_ENCL_PAGES - 2, True)
    done = 0
    while done < heap:
        n = heap - done if chunk is None else min(chunk, heap - done)
        sgx.add_pages(encl, PID, TEST_ENCL_PAGES + done, n, False)
        done += n
    sgx.init(encl)
    return encl


def page_ops(sgx: Sgx) -> int:
    return sum(sgx.encls[name] for name in PAGE_OPS)


def one_load(capacity: int, limited: bool) -> dict:
    """Table 1's row, measured in this process."""
    h, sgx = machine(capacity, capacity // 128 if limited else None)
    t0 = time.perf_counter()
    build(sgx, capacity // PAGE_SIZE, None)
    seconds = time.perf_counter() - t0
    check_invariants(sgx)
    return {"seconds": seconds, "ewb": sgx.encls["EWB"], "eadd": sgx.encls["EADD"],
            "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def load_table(capacities: list[int]) -> None:
    print("oversubscribed enclave load (heap = C, one ADD_PAGES call), fresh process each")
    print(f"{'C':>6} {'EPC limit':>10} {'time':>11} {'EADD':>10} {'EWB':>10} {'peak RSS':>9}")
    base = {}
    for capacity in capacities:
        for limited in (False, True):
            out = subprocess.run([sys.executable, __file__, "--one-load", str(capacity),
                                  "--limited" if limited else "--unlimited"],
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out)
            base.setdefault(limited, row["seconds"])
            print(f"{human(capacity):>6} {'C/128' if limited else 'none':>10} "
                  f"{row['seconds'] * 1e3:>8.2f}ms {row['eadd']:>10} {row['ewb']:>10} "
                  f"{row['rss_mib']:>6.0f}MiB   ({row['seconds'] / base[limited]:.1f}x)")


def rate(label: str, sgx: Sgx, fn) -> None:
    before = page_ops(sgx)
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    ops = page_ops(sgx) - before
    print(f"{label:<58} {ops:>10} ops {seconds:>7.3f}s {ops / seconds / 1e6:>7.2f} M/s")


def rates_table(seconds: float) -> None:
    print("\nsimulated page operations (EADD, EWB, ELDU, EAUG, EREMOVE) per second, unpaced")
    capacity = 1 << 30
    h, sgx = machine(capacity, capacity // 128)
    rate(f"load, {human(capacity)} EPC, C/128 limit, {ADD_CHUNK}-page ADD_PAGES steps",
         sgx, lambda: build(sgx, capacity // PAGE_SIZE, ADD_CHUNK))
    capacity = 128 << 20
    h, sgx = machine(capacity, capacity // 128, bulk=False)
    rate(f"load, {human(capacity)} EPC, C/128 limit, page by page (no bulk)",
         sgx, lambda: build(sgx, capacity // PAGE_SIZE, ADD_CHUNK))
    h, sgx = machine(capacity, None)
    encl = build(sgx, 2 * capacity // PAGE_SIZE, ADD_CHUNK)

    def storm() -> None:
        deadline = time.perf_counter() + seconds
        i = TEST_ENCL_PAGES
        while time.perf_counter() < deadline:
            for _ in range(256):
                touched(sgx, encl, i, 1)
                i = TEST_ENCL_PAGES + (i + 7919 - TEST_ENCL_PAGES) % (encl.nr_pages - 10)

    rate(f"strided accesses to a 2x-oversubscribed heap, {human(capacity)} EPC", sgx, storm)
    check_invariants(sgx)


SLICES = 8
"""Calls per kind in table 3, so a kind can stop at its budget between two: the same
number at every capacity, so the ratios compare whole-heap work."""


def edmm_range(sgx: Sgx, call, first: int, count: int) -> int:
    """An EDMM ioctl over [first, first+count), resumed after EAGAIN as test_sgx does;
    the reclaimers run meanwhile."""
    done = 0
    while done < count:
        try:
            done += call(first + done, count - done)
        except KernelError as e:
            if e.errno != errno.EAGAIN:
                raise
            done += e.count
            sgx.reclaim.catch_up()
    return done


def touched(sgx: Sgx, encl, first: int, count: int) -> None:
    """The enclave accesses `count` pages from `first` in order, the reclaimers running
    whenever a fault has to wait (as beside the enclave server)."""
    outcome = run(sgx.touch.steps(encl, PID, first, count), sgx.reclaim.catch_up)
    assert outcome is Fault.OK, outcome


def timed(sgx: Sgx, total: int, budget: float, piece) -> tuple[float, int, bool]:
    """Run piece(done, n) over `total` pages in SLICES calls until done or over budget.
    Returns (seconds, page ops, finished)."""
    before = page_ops(sgx)
    t0 = time.perf_counter()
    done = 0
    size = -(-total // SLICES)
    while done < total:
        n = min(size, total - done)
        piece(done, n)
        done += n
        elapsed = time.perf_counter() - t0
        if elapsed > budget and done < total:
            return elapsed * total / done, page_ops(sgx) - before, False
    return time.perf_counter() - t0, page_ops(sgx) - before, True


def remove_test(capacity: int, budget: float) -> dict[str, tuple[float, int, bool]]:
    """Table 3's row for one capacity."""
    heap = capacity // PAGE_SIZE
    h, sgx = machine(capacity, None)
    first = TEST_ENCL_PAGES
    out: dict[str, tuple[float, int, bool]] = {}
    encl = sgx.create(PID, 1 << ((TEST_ENCL_PAGES + heap) * PAGE_SIZE - 1).bit_length())
    sgx.add_pages(encl, PID, 0, first, True)

    def load(done: int, n: int) -> None:
        sgx.add_pages(encl, PID, first + done, n, False)

    out["load"] = timed(sgx, heap, budget, load)
    if out["load"][2]:
        remove_phases(sgx, encl, heap, budget, out)
    h, sgx = machine(capacity, None)
    encl = build(sgx, 2 * heap, ADD_CHUNK)

    def touch(done: int, n: int) -> None:  # two walks through the whole heap
        touched(sgx, encl, TEST_ENCL_PAGES + done % (2 * heap), n)

    out["touch 2x"] = timed(sgx, 4 * heap, budget, touch)
    check_invariants(sgx)
    return out


def remove_phases(sgx: Sgx, encl, heap: int, budget: float,
                  out: dict[str, tuple[float, int, bool]]) -> None:
    """EINIT, then trim, accept and remove the heap, each timed, until one runs over."""
    first = TEST_ENCL_PAGES
    sgx.init(encl)

    def trim(done: int, n: int) -> None:
        edmm_range(sgx, lambda a, c: sgx.edmm.modify_types(encl, PID, a, c, SgxPageType.TRIM),
                   first + done, n)

    def accept(done: int, n: int) -> None:  # as the enclave server does it
        touched(sgx, encl, first + done, n)
        sgx.edmm.accept(encl, first + done, n)

    def remove(done: int, n: int) -> None:
        edmm_range(sgx, lambda a, c: sgx.edmm.remove_pages(encl, PID, a, c), first + done, n)

    for kind, piece in (("trim", trim), ("accept", accept), ("remove", remove)):
        out[kind] = timed(sgx, heap, budget, piece)
        if not out[kind][2]:
            return
    check_invariants(sgx)


def remove_table(capacities: list[int], budget: float) -> None:
    print("\nunclobbered_vdso_oversubscribed_remove and a touch loop, unpaced, per kind "
          f"(~: projected after {budget:g} s)")
    print(f"{'C':>6} {'kind':>9} {'time':>11} {'page ops':>11} {'M ops/s':>8} {'vs 128M':>8}")
    base: dict[str, float] = {}
    for capacity in capacities:
        for kind, (seconds, ops, finished) in remove_test(capacity, budget).items():
            base.setdefault(kind, seconds)
            mark = " " if finished else "~"
            rate = ops / seconds if finished else float("nan")
            if not finished:  # the rate so far: ops happened within `budget` seconds
                rate = ops / budget
            print(f"{human(capacity):>6} {kind:>9} {mark}{seconds * 1e3:>8.1f}ms {ops:>11} "
                  f"{rate / 1e6:>8.2f} {seconds / base[kind]:>7.1f}x")


def human(size: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--capacities", default="128M,1G,4G,64G")
    p.add_argument("--seconds", type=float, default=2.0, help="length of the fault storm")
    p.add_argument("--budget", type=float, default=20.0,
                   help="seconds per operation kind in table 3 before projecting")
    p.add_argument("--tables", default="1,2,3", help="which tables to print")
    p.add_argument("--one-load", type=int, help=argparse.SUPPRESS)
    p.add_argument("--limited", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--unlimited", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one_load:
        print(json.dumps(one_load(args.one_load, args.limited)))
        return
    capacities = [parse_size(c) for c in args.capacities.split(",")]
    tables = args.tables.split(",")
    if "1" in tables:
        load_table(capacities)
    if "2" in tables:
        rates_table(args.seconds)
    if "3" in tables:
        remove_table(capacities, args.budget)


if __name__ == "__main__":
    main()
