"""The `enclave` fixture's tests, in the order and with the timeouts of the selftest.

Each body does what its namesake does to the enclave — and so to the EPC — and checks
what it checks. A failed check prints what the selftest prints, with the main.c line
number of that check (main.c as in the SGX EPC cgroup series' final base), because
people compare such logs with hardware runs. Checks that cannot fail here (the vDSO's
return value, user_data) are left out: they print nothing when they pass.
"""

from __future__ import annotations

import errno

from .encl import (
    DATA_OFFSET,
    EEXIT,
    ENCL_DYN_ENTRY,
    ENCL_HEAP_SIZE_DEFAULT,
    ERESUME,
    MAGIC,
    MAGIC2,
    PAGE_SIZE,
    PAGE_TYPE_TCS,
    PAGE_TYPE_TRIM,
    PROT_READ,
    PROT_WRITE,
    SECINFO_R,
    SECINFO_W,
    TCS_OFFSET,
    Op,
    Run,
    TestEnclave,
)
from .harness import Fixture, Metadata, TestCase

SETUP_DEFAULT = "setup_test_encl(ENCL_HEAP_SIZE_DEFAULT, &self->encl, _metadata)"
SETUP_TOTAL = "setup_test_encl(total_mem, &self->encl, _metadata)"

# SGX_SECINFO_* flags the tests pass to EACCEPT (they only document intent here)
SECINFO_REG = 0x200
SECINFO_TCS = 0x100
SECINFO_TRIM = 0x400
SECINFO_PENDING = 0x08
SECINFO_MODIFIED = 0x10
SECINFO_PR = 0x20

NOT_SUPPORTED_MODT = "Kernel does not support SGX_IOC_ENCLAVE_MODIFY_TYPES ioctl()"
NOT_SUPPORTED_RESTRICT = "Kernel does not support SGX_IOC_ENCLAVE_RESTRICT_PERMISSIONS ioctl()"
NO_SGX2 = "System does not support SGX2"
NO_EAUG = "Kernel does not support adding pages to initialized enclave"


# -- check helpers ------------------------------------------------------------------------


def eexit(md: Metadata, line: int, run: Run) -> None:
    """EXPECT_EEXIT(&self->run)."""
    if not md.expect_eq(line, "(&self->run)->function", run.function, "EEXIT", EEXIT):
        md.log(line, f"0x{run.exception_vector:02x} 0x{run.exception_error_code:02x} "
                     f"0x{run.exception_addr:016x}")


def no_exception(md: Metadata, line: int, run: Run) -> None:
    """EXPECT_EQ of exception_vector, _error_code and _addr against 0 on three lines."""
    md.expect_eq(line, "self->run.exception_vector", run.exception_vector, "0", 0)
    md.expect_eq(line + 1, "self->run.exception_error_code", run.exception_error_code,
                 "0", 0)
    md.expect_eq(line + 2, "self->run.exception_addr", run.exception_addr, "0", 0)


def clean_exit(md: Metadata, line: int, run: Run) -> None:
    """EXPECT_EEXIT on `line`, then no exception on the three lines after it."""
    eexit(md, line, run)
    no_exception(md, line + 1, run)


def accepted(md: Metadata, line: int, run: Run, op: Op) -> None:
    """clean_exit at `line`, then EXPECT_EQ(eaccept_op.ret, 0) four lines below."""
    clean_exit(md, line, run)
    md.expect_eq(line + 4, "eaccept_op.ret", op.ret, "0", 0)


def faulted(md: Metadata, lines: tuple[int, int, int, int], run: Run, code: int,
            code_src: str, addr: int, addr_src: str = "data_start") -> None:
    """An expected #PF: function ERESUME, vector 14, error code, address (None = skip)."""
    l_func, l_vec, l_code, l_addr = lines
    if l_func:
        md.expect_eq(l_func, "self->run.function", run.function, "ERESUME", ERESUME)
    md.expect_eq(l_vec, "self->run.exception_vector", run.exception_vector, "14", 14)
    if l_code:
        md.expect_eq(l_code, "self->run.exception_error_code", run.exception_error_code,
                     code_src, code)
    md.expect_eq(l_addr, "self->run.exception_addr", run.exception_addr, addr_src, addr)


def reset_exception(run: Run) -> None:
    run.exception_vector = run.exception_error_code = run.exception_addr = 0


def ioctl_ok(md: Metadata, lines: tuple[int, int, int], ioc: str, result: tuple[int, int, int],
             count_src: str, count: int) -> None:
    """EXPECT ret == 0, errno_save == 0 and <ioc>.count == <count> (result is always 0)."""
    ret, err, done = result
    md.expect_eq(lines[0], "ret", ret, "0", 0)
    md.expect_eq(lines[1], "errno_save", err, "0", 0)
    md.expect_eq(lines[2], f"{ioc}.count", done, count_src, count)


def probe_modify_types(md: Metadata, e: TestEnclave, line: int) -> None:
    """MODIFY_TYPES with zeroed arguments: ENOTTY/ENODEV skip, anything else must fail."""
    ret, err, _ = e.modify_types(0, 0, 0)
    if ret == -1:
        if err == errno.ENOTTY:
            md.skip(NOT_SUPPORTED_MODT)
        elif err == errno.ENODEV:
            md.skip(NO_SGX2)
    md.expect_eq(line, "ret", ret, "-1", -1)


def probe_restrict(md: Metadata, e: TestEnclave, line: int) -> None:
    """RESTRICT_PERMISSIONS with zeroed arguments: must fail; ENOTTY/ENODEV skip."""
    ret, err, _ = e.restrict(0, 0, 0)
    md.assert_eq(line, "ret", ret, "-1", -1)
    if err == errno.ENOTTY:
        md.skip(NOT_SUPPORTED_RESTRICT)
    elif err == errno.ENODEV:
        md.skip(NO_SGX2)


def put_get_buffer(md: Metadata, e: TestEnclave, run: Run, lines: tuple[int, int, int]) -> None:
    """PUT_TO_BUFFER(MAGIC), GET_FROM_BUFFER: EEXIT, value, EEXIT."""
    put_op = Op("put_buf", value=MAGIC)
    e.call(put_op, run)
    eexit(md, lines[0], run)
    get_op = Op("get_buf")
    e.call(get_op, run)
    md.expect_eq(lines[1], "get_op.value", get_op.value, "MAGIC", MAGIC)
    eexit(md, lines[2], run)


def put_get_addr(md: Metadata, e: TestEnclave, run: Run, addr: int,
                 lines: tuple[int, int, int]) -> tuple[Op, Op]:
    """PUT_TO_ADDRESS(MAGIC), GET_FROM_ADDRESS on one page, both expected to exit cleanly."""
    put_op = Op("put_addr", addr=addr, value=MAGIC)
    e.call(put_op, run)
    clean_exit(md, lines[0], run)
    get_op = Op("get_addr", addr=addr)
    e.call(get_op, run)
    md.expect_eq(lines[1], "get_addr_op.value", get_op.value, "MAGIC", MAGIC)
    clean_exit(md, lines[2], run)
    return put_op, get_op


# -- the tests ------------------------------------------------------------------------------


def unclobbered_vdso(md: Metadata) -> None:
    e = TestEnclave(md)
    md.assert_true(288, SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    put_get_buffer(md, e, Run(tcs=e.encl_base), (298, 306, 307))


def unclobbered_vdso_oversubscribed(md: Metadata) -> None:
    e = TestEnclave(md)
    total_mem = e.total_epc_mem()
    md.check(360, "total_mem", total_mem, "!=", "0", 0, fatal=True)
    md.assert_true(361, SETUP_TOTAL, e.setup(total_mem))
    put_get_buffer(md, e, Run(tcs=e.encl_base), (371, 379, 380))


def unclobbered_vdso_oversubscribed_remove(md: Metadata) -> None:
    e = TestEnclave(md)
    total_mem = e.total_epc_mem()
    md.check(402, "total_mem", total_mem, "!=", "0", 0, fatal=True)
    md.log(403, f"Creating an enclave with {total_mem} bytes heap may take a while ...")
    md.assert_true(405, SETUP_TOTAL, e.setup(total_mem))
    probe_modify_types(md, e, 426)

    run = Run(tcs=e.encl_base)
    heap = e.segments[-1]
    put_get_buffer(md, e, run, (439, 447, 448))

    md.log(458, f"Changing type of {heap.size} bytes to trimmed may take a while ...")
    result = e.modify_types(heap.offset, heap.size, PAGE_TYPE_TRIM)
    ioctl_ok(md, (463, 464, 466), "modt_ioc", result, "heap->size", heap.size)

    md.log(474, "Entering enclave to run EACCEPT for each page of "
                f"{heap.size} bytes may take a while ...")
    pages = heap.size // PAGE_SIZE
    done, ret = e.eaccept_range(run, heap.offset // PAGE_SIZE, pages)
    if done < pages:  # the page that failed: the loop's checks, then its ASSERTs
        no_exception(md, 482, run)
        md.assert_eq(485, "eaccept_op.ret", ret, "0", 0)
        md.assert_eq(486, "self->run.function", run.function, "EEXIT", EEXIT)

    md.log(495, f"Removing {heap.size} bytes from enclave may take a while ...")
    ret, err, count = e.remove(heap.offset, heap.size)
    md.expect_eq(500, "ret", ret, "0", 0)
    md.expect_eq(501, "errno_save", err, "0", 0)
    md.expect_eq(502, "remove_ioc.count", count, "heap->size", heap.size)


def clobbered_vdso(md: Metadata) -> None:
    e = TestEnclave(md)
    md.assert_true(510, SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    put_get_buffer(md, e, Run(tcs=e.encl_base), (520, 528, 529))


def clobbered_vdso_and_user_function(md: Metadata) -> None:
    e = TestEnclave(md)
    md.assert_true(546, SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    put_get_buffer(md, e, Run(tcs=e.encl_base), (559, 567, 568))


def tcs_entry(md: Metadata) -> None:
    e = TestEnclave(md)
    md.assert_true(579, SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    run = Run(tcs=e.encl_base)
    op = Op("nop")
    e.call(op, run)
    clean_exit(md, 588, run)
    run.tcs = e.encl_base + PAGE_SIZE  # the second TCS
    e.call(op, run)
    clean_exit(md, 598, run)


def pte_permissions(md: Metadata) -> None:
    e = TestEnclave(md)
    md.assert_true(624, SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    run = Run(tcs=e.encl_base)
    data_start = e.encl_base + DATA_OFFSET + PAGE_SIZE
    put_op, get_op = put_get_addr(md, e, run, data_start, (645, 660, 661))

    e.mprotect(data_start, PAGE_SIZE, PROT_READ)
    put_op.value = MAGIC2
    e.call(put_op, run)
    faulted(md, (0, 681, 682, 683), run, 0x7, "0x7", data_start)
    reset_exception(run)

    e.mprotect(data_start, PAGE_SIZE, PROT_READ | PROT_WRITE)
    e.call(put_op, run, ERESUME)
    clean_exit(md, 702, run)

    get_op.value = 0
    e.call(get_op, run)
    md.expect_eq(711, "get_addr_op.value", get_op.value, "MAGIC2", MAGIC2)
    clean_exit(md, 712, run)


def tcs_permissions(md: Metadata) -> None:
    e = TestEnclave(md)
    md.assert_true(726, SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    probe_restrict(md, e, 745)
    ret, err, count = e.restrict(TCS_OFFSET, PAGE_SIZE, SECINFO_R)
    md.expect_eq(765, "ret", ret, "-1", -1)
    md.expect_eq(766, "errno_save", err, "EINVAL", errno.EINVAL)
    md.expect_eq(768, "ioc.count", count, "0", 0)


def epcm_permissions(md: Metadata) -> None:
    e = TestEnclave(md)
    md.assert_true(789, SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    run = Run(tcs=e.encl_base)
    probe_restrict(md, e, 808)
    data_start = e.encl_base + DATA_OFFSET + PAGE_SIZE
    put_op, get_op = put_get_addr(md, e, run, data_start, (841, 856, 857))

    result = e.restrict(DATA_OFFSET + PAGE_SIZE, PAGE_SIZE, SECINFO_R)
    ioctl_ok(md, (876, 877, 879), "restrict_ioc", result, "4096", 4096)

    eaccept_op = Op("eaccept", addr=data_start, flags=SECINFO_R | SECINFO_REG | SECINFO_PR)
    e.call(eaccept_op, run)
    accepted(md, 891, run, eaccept_op)

    put_op.value = MAGIC2
    e.call(put_op, run)
    faulted(md, (905, 906, 907, 908), run, 0x8007, "0x8007", data_start)
    reset_exception(run)

    run.tcs = e.encl_base + PAGE_SIZE
    emodpe_op = Op("emodpe", addr=data_start, flags=SECINFO_R | SECINFO_W)
    e.call(emodpe_op, run)
    clean_exit(md, 933, run)

    run.tcs = e.encl_base
    e.call(put_op, run, ERESUME)
    clean_exit(md, 956, run)

    get_op.value = 0
    e.call(get_op, run)
    md.expect_eq(965, "get_addr_op.value", get_op.value, "MAGIC2", MAGIC2)
    eexit(md, 966, run)
    no_exception(md, 968, run)


def _augment_start(md: Metadata, lines: tuple[int, int]) -> tuple[TestEnclave, Run, int]:
    """The augment tests' start: SGX2, the default enclave, and room for one more page
    past its contents, whose address is returned."""
    e = TestEnclave(md)
    if not e.sgx2_supported():
        md.skip("SGX2 not supported")
    md.assert_true(lines[0], SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    md.check(lines[1], "total_size + PAGE_SIZE", e.total_size + PAGE_SIZE, "<",
             "self->encl.encl_size", e.encl_size)
    return e, Run(tcs=e.encl_base), e.encl_base + e.total_size


def _eaccept_pending(md: Metadata, e: TestEnclave, run: Run, addr: int) -> Op:
    """EACCEPT a page that is not there yet: the #PF makes the kernel EAUG it. A plain
    not-present #PF back means no EAUG support: skipped, as the kernel test does."""
    eaccept_op = Op("eaccept", addr=addr,
                    flags=SECINFO_R | SECINFO_W | SECINFO_REG | SECINFO_PENDING)
    e.call(eaccept_op, run)
    if run.exception_vector == 14 and run.exception_error_code == 4 and \
            run.exception_addr == addr:
        md.skip(NO_EAUG)
    return eaccept_op


def augment(md: Metadata) -> None:
    e, run, addr = _augment_start(md, (990, 1006))

    put_op = Op("put_addr", addr=addr, value=MAGIC)
    e.call(put_op, run)
    faulted(md, (1041, 1042, 0, 1043), run, 0, "", addr, "(unsigned long)addr")
    if run.exception_error_code == 0x6:
        md.skip(NO_EAUG)
    md.expect_eq(1050, "self->run.exception_error_code", run.exception_error_code,
                 "0x8007", 0x8007)
    reset_exception(run)

    run.tcs = e.encl_base + PAGE_SIZE
    eaccept_op = Op("eaccept", addr=addr,
                    flags=SECINFO_R | SECINFO_W | SECINFO_REG | SECINFO_PENDING)
    e.call(eaccept_op, run)
    accepted(md, 1066, run, eaccept_op)

    run.tcs = e.encl_base
    e.call(put_op, run, ERESUME)
    clean_exit(md, 1080, run)

    get_op = Op("get_addr", addr=addr)
    e.call(get_op, run)
    md.expect_eq(1095, "get_addr_op.value", get_op.value, "MAGIC", MAGIC)
    clean_exit(md, 1096, run)


def augment_via_eaccept(md: Metadata) -> None:
    e, run, addr = _augment_start(md, (1120, 1136))
    eaccept_op = _eaccept_pending(md, e, run, addr)
    accepted(md, 1174, run, eaccept_op)
    put_get_addr(md, e, run, addr, (1190, 1205, 1206))


def tcs_create(md: Metadata) -> None:
    e = TestEnclave(md)
    md.assert_true(1241, SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    run = Run(tcs=e.encl_base)
    probe_modify_types(md, e, 1266)
    total_size = e.total_size
    md.check(1285, "total_size + 3 * PAGE_SIZE", total_size + 3 * PAGE_SIZE, "<",
             "self->encl.encl_size", e.encl_size)
    stack_end = e.encl_base + total_size
    tcs = e.encl_base + total_size + PAGE_SIZE
    ssa = e.encl_base + total_size + 2 * PAGE_SIZE

    # three pages by EACCEPT → #PF → EAUG: stack, SSA, the future TCS
    eaccept_op = _eaccept_pending(md, e, run, stack_end)
    accepted(md, 1323, run, eaccept_op)
    for addr, line in ((ssa, 1333), (tcs, 1343)):
        eaccept_op.addr = addr
        e.call(eaccept_op, run)
        accepted(md, line, run, eaccept_op)

    init_op = Op("init_tcs_page", tcs_page=tcs, ssa=total_size + 2 * PAGE_SIZE,
                 entry=ENCL_DYN_ENTRY)
    e.call(init_op, run)
    clean_exit(md, 1370, run)

    result = e.modify_types(total_size + PAGE_SIZE, PAGE_SIZE, PAGE_TYPE_TCS)
    ioctl_ok(md, (1385, 1386, 1388), "modt_ioc", result, "4096", 4096)
    eaccept_op = Op("eaccept", addr=tcs, flags=SECINFO_TCS | SECINFO_MODIFIED)
    e.call(eaccept_op, run)
    accepted(md, 1398, run, eaccept_op)

    run.tcs = tcs  # a workload through the new TCS
    put_op = Op("put_buf", value=MAGIC)
    e.call(put_op, run)
    clean_exit(md, 1415, run)
    get_op = Op("get_buf")
    e.call(get_op, run)
    md.expect_eq(1425, "get_buf_op.value", get_op.value, "MAGIC", MAGIC)
    clean_exit(md, 1426, run)

    # phase 2: trim the three pages, accept, remove, then EAUG where the TCS was
    result = e.modify_types(total_size, 3 * PAGE_SIZE, PAGE_TYPE_TRIM)
    ioctl_ok(md, (1448, 1449, 1451), "modt_ioc", result, "3 * PAGE_SIZE", 3 * PAGE_SIZE)
    run.tcs = e.encl_base
    eaccept_op = Op("eaccept", addr=stack_end, flags=SECINFO_TRIM | SECINFO_MODIFIED)
    for addr, line in ((stack_end, 1466), (tcs, 1477), (ssa, 1488)):
        eaccept_op.addr = addr
        eaccept_op.ret = 0
        e.call(eaccept_op, run)
        accepted(md, line, run, eaccept_op)

    result = e.remove(total_size, 3 * PAGE_SIZE)
    ioctl_ok(md, (1503, 1504, 1505), "remove_ioc", result, "3 * PAGE_SIZE", 3 * PAGE_SIZE)

    eaccept_op = Op("eaccept", addr=tcs,
                    flags=SECINFO_R | SECINFO_W | SECINFO_REG | SECINFO_PENDING)
    e.call(eaccept_op, run)
    accepted(md, 1518, run, eaccept_op)
    put_get_addr(md, e, run, tcs, (1533, 1548, 1549))


def _trim_data_page(md: Metadata, e: TestEnclave, lines: tuple[int, int, int],
                    ioc: str) -> None:
    result = e.modify_types(DATA_OFFSET + PAGE_SIZE, PAGE_SIZE, PAGE_TYPE_TRIM)
    ioctl_ok(md, lines, ioc, result, "4096", 4096)


def remove_added_page_no_eaccept(md: Metadata) -> None:
    e = TestEnclave(md)
    md.assert_true(1572, SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    run = Run(tcs=e.encl_base)
    probe_modify_types(md, e, 1596)
    data_start = e.encl_base + DATA_OFFSET + PAGE_SIZE
    put_get_addr(md, e, run, data_start, (1618, 1633, 1634))
    _trim_data_page(md, e, (1649, 1650, 1652), "modt_ioc")
    ret, err, count = e.remove(DATA_OFFSET + PAGE_SIZE, PAGE_SIZE)  # without EACCEPT
    md.expect_eq(1666, "ret", ret, "-1", -1)
    md.expect_eq(1667, "errno_save", err, "EPERM", errno.EPERM)
    md.expect_eq(1668, "remove_ioc.count", count, "0", 0)


def remove_added_page_invalid_access(md: Metadata) -> None:
    e = TestEnclave(md)
    md.assert_true(1683, SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    run = Run(tcs=e.encl_base)
    probe_modify_types(md, e, 1707)
    data_start = e.encl_base + DATA_OFFSET + PAGE_SIZE
    _, get_op = put_get_addr(md, e, run, data_start, (1729, 1744, 1745))
    _trim_data_page(md, e, (1760, 1761, 1763), "ioc")
    get_op.value = 0
    e.call(get_op, run)
    faulted(md, (1778, 1779, 1780, 1781), run, 0x8005, "0x8005", data_start)


def remove_added_page_invalid_access_after_eaccept(md: Metadata) -> None:
    e = TestEnclave(md)
    md.assert_true(1798, SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    run = Run(tcs=e.encl_base)
    probe_modify_types(md, e, 1822)
    data_start = e.encl_base + DATA_OFFSET + PAGE_SIZE
    _, get_op = put_get_addr(md, e, run, data_start, (1844, 1859, 1860))
    _trim_data_page(md, e, (1875, 1876, 1878), "ioc")
    eaccept_op = Op("eaccept", addr=data_start, flags=SECINFO_TRIM | SECINFO_MODIFIED)
    e.call(eaccept_op, run)
    accepted(md, 1887, run, eaccept_op)
    get_op.value = 0
    e.call(get_op, run)
    faulted(md, (1908, 1909, 1910, 1911), run, 0x8005, "0x8005", data_start)


def remove_untouched_page(md: Metadata) -> None:
    e = TestEnclave(md)
    md.assert_true(1922, SETUP_DEFAULT, e.setup(ENCL_HEAP_SIZE_DEFAULT))
    probe_modify_types(md, e, 1943)
    run = Run(tcs=e.encl_base)
    data_start = e.encl_base + DATA_OFFSET + PAGE_SIZE
    _trim_data_page(md, e, (1960, 1961, 1963), "modt_ioc")
    eaccept_op = Op("eaccept", addr=data_start, flags=SECINFO_TRIM | SECINFO_MODIFIED)
    e.call(eaccept_op, run)
    accepted(md, 1976, run, eaccept_op)
    result = e.remove(DATA_OFFSET + PAGE_SIZE, PAGE_SIZE)
    ioctl_ok(md, (1989, 1990, 1991), "remove_ioc", result, "4096", 4096)


TIMEOUT_LONG = 900

TESTS = (
    TestCase("unclobbered_vdso", unclobbered_vdso),
    TestCase("unclobbered_vdso_oversubscribed", unclobbered_vdso_oversubscribed),
    TestCase("unclobbered_vdso_oversubscribed_remove", unclobbered_vdso_oversubscribed_remove,
             timeout=TIMEOUT_LONG),
    TestCase("clobbered_vdso", clobbered_vdso),
    TestCase("clobbered_vdso_and_user_function", clobbered_vdso_and_user_function),
    TestCase("tcs_entry", tcs_entry),
    TestCase("pte_permissions", pte_permissions),
    TestCase("tcs_permissions", tcs_permissions),
    TestCase("epcm_permissions", epcm_permissions),
    TestCase("augment", augment),
    TestCase("augment_via_eaccept", augment_via_eaccept),
    TestCase("tcs_create", tcs_create),
    TestCase("remove_added_page_no_eaccept", remove_added_page_no_eaccept),
    TestCase("remove_added_page_invalid_access", remove_added_page_invalid_access),
    TestCase("remove_added_page_invalid_access_after_eaccept",
             remove_added_page_invalid_access_after_eaccept),
    TestCase("remove_untouched_page", remove_untouched_page),
)

FIXTURES = [Fixture("global"), Fixture("enclave", TESTS)]
