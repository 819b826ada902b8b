"""The selftest enclave, built and run through the epcfs enclave protocol.

Two halves:

- Building (what load.c does): the segment table of test_encl.elf plus a heap, the
  enclave size, and SGX_IOC_ENCLAVE_CREATE / ADD_PAGES / INIT as protocol calls, with
  the real binary's perror() texts on failure. test_encl.elf is never read: the simulated
  test_sgx carries its layout, so it runs from any directory (the scripts copy only
  test_sgx and ash_cgexec.sh around; a stray test_encl.elf is ignored).

- Running (what the CPU and the vDSO do): EENTER/ERESUME of a TCS and the enclave's own
  loads, stores, EACCEPT and EMODPE. Every page an entry or an operation uses is touched
  through the daemon, which may have to ELDU it back, or EAUG it on a #PF in an
  unbacked address. What only the CPU knows — EPCM types and permissions, pending and
  modified pages, PTE permissions after mprotect() — is kept here. An exception inside
  the enclave is reported the way __vdso_sgx_enter_enclave reports it: the call returns 0
  with run.function = ERESUME and the exception's vector, error code and address. That
  includes a fault the kernel answers with SIGBUS (ELDU or EAUG failed): the kernel's
  fixup_vdso_exception() turns a SIGBUS at the vDSO's ENCLU into such a report, so a
  SIGBUS reply to a touch never kills test_sgx. A fault the kernel retries (EBUSY from
  the protocol: VM_FAULT_NOPAGE) is retried here, for as long as the test's timeout
  allows. Any other signal reply (e.g. SIGKILL) kills the process with that signal.

Layout of the built-in test_encl.elf (as linked from test_encl.lds with two TCSs, the
same as hardware runs print it, e.g. `0x...3000 0x...6000 0x03` for data):

    page 0-1  TCS #1, TCS #2          segment 0, RW (0x03), SGX_PAGE_TYPE_TCS, measured
    page 2    code (.text, .rodata)   segment 1, RX (0x05), measured
    page 3-4  encl_buffer[8192]       segment 2, RW (0x03), measured
    page 5-6  SSA of TCS #1, TCS #2
    page 7-8  stack of TCS #1, TCS #2
    page 9-   heap                    RW (0x03), unmeasured (ENCL_HEAP_SIZE_DEFAULT = 4096,
                                      or all EPC for the oversubscribed tests)

encl_size is the smallest power of two >= the whole span (at least 4096).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable

from .harness import Metadata, die_by_signal, perror

PAGE_SIZE = 4096
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
RW = PROT_READ | PROT_WRITE
RX = PROT_READ | PROT_EXEC
ENCL_HEAP_SIZE_DEFAULT = 4096

# SGX_SECINFO_* permission bits and SGX_PAGE_TYPE_* values
SECINFO_R, SECINFO_W, SECINFO_X = 1, 2, 4
PAGE_TYPE_TCS, PAGE_TYPE_REG, PAGE_TYPE_TRIM = 1, 2, 4

# ENCLU leaves as sgx_enclave_run.function reports them
EENTER, ERESUME, EEXIT = 2, 3, 4

# exception vectors and #PF error code bits
VECTOR_GP, VECTOR_PF = 13, 14
PF_PRESENT, PF_WRITE, PF_USER, PF_INSTR, PF_SGX = 0x1, 0x2, 0x4, 0x10, 0x8000

MAGIC = 0x1122334455667788
MAGIC2 = 0x8877665544332211

ERESTARTSYS = 512
"""Kernel-internal: an ioctl interrupted before doing anything is restarted."""


class Segment:
    """struct encl_segment: offsets and sizes in bytes, prot as PROT_* bits."""

    __slots__ = ("offset", "size", "prot", "measure", "tcs")

    def __init__(self, offset: int, size: int, prot: int, measure: bool = True,
                 tcs: bool = False) -> None:
        self.offset = offset
        self.size = size
        self.prot = prot
        self.measure = measure
        self.tcs = tcs


IMAGE = (
    Segment(0x0000, 2 * PAGE_SIZE, RW, tcs=True),
    Segment(0x2000, 1 * PAGE_SIZE, RX),
    Segment(0x3000, 6 * PAGE_SIZE, RW),
)

# page indices (from the enclave base) of what the enclave code uses
TCS1, TCS2, CODE, BUFFER, DATA2, SSA1, SSA2, STACK1, STACK2 = range(9)
HEAP = 9
DATA_OFFSET = IMAGE[2].offset
"""encl_get_data_offset(): the first RW segment after the TCS one."""
TCS_OFFSET = IMAGE[0].offset

ENCL_DYN_ENTRY = 0x2040
"""encl_get_entry(encl, "encl_dyn_entry"): an offset into the code page (nonzero)."""

_BASE_HINT = 0x7F0000000000
"""Where encl_map_area()'s reservation lands (only used in addresses the tests print)."""


class Page:
    """EPCM entry of one enclave page, as far as the CPU's checks go (immutable)."""

    __slots__ = ("ptype", "perms", "pending", "modified", "pr")

    def __init__(self, ptype: int = PAGE_TYPE_REG, perms: int = RW, pending: bool = False,
                 modified: bool = False, pr: bool = False) -> None:
        self.ptype = ptype
        self.perms = perms
        self.pending = pending  # EAUG'd, not yet EACCEPTed
        self.modified = modified  # EMODT'd, not yet EACCEPTed
        self.pr = pr  # EMODPR'd, not yet EACCEPTed

    def but(self, **changes) -> Page:
        fields = {name: getattr(self, name) for name in self.__slots__}
        return Page(**{**fields, **changes})


def replace(page: Page | None, **changes) -> Page | None:
    return page.but(**changes) if page is not None else None


class Fault(Exception):  # noqa: N818 — a CPU exception, not an error of this program
    """An exception __vdso_sgx_enter_enclave reports in struct sgx_enclave_run."""

    def __init__(self, vector: int, code: int = 0, addr: int = 0) -> None:
        super().__init__(vector, code, addr)
        self.vector = vector
        self.code = code
        self.addr = addr


class Run:
    """struct sgx_enclave_run: the fields the tests read."""

    __slots__ = ("tcs", "function", "exception_vector", "exception_error_code",
                 "exception_addr", "user_data")

    def __init__(self, tcs: int = 0) -> None:
        self.tcs = tcs  # address of the TCS to enter
        self.function = 0
        self.exception_vector = 0
        self.exception_error_code = 0
        self.exception_addr = 0
        self.user_data = 0


class Op:
    """An encl_op_* request: `kind` plus its fields; results (value, ret) come back in it."""

    __slots__ = ("kind", "addr", "value", "flags", "ret", "tcs_page", "ssa", "entry")

    def __init__(self, kind: str, *, addr: int = 0, value: int = 0, flags: int = 0,
                 tcs_page: int = 0, ssa: int = 0, entry: int = 0) -> None:
        self.kind = kind
        self.addr = addr
        self.value = value
        self.flags = flags
        self.ret = 0
        self.tcs_page = tcs_page
        self.ssa = ssa
        self.entry = entry


PTE_SIZE = 8
"""Bytes of one x86-64 page-table entry."""


def _signum(name: str) -> int:
    try:
        return int(signal.Signals[name])
    except KeyError:
        return signal.SIGKILL


class TestEnclave:
    """struct encl plus the open device: one protocol connection, one enclave."""

    __test__ = False  # not a pytest class

    def __init__(self, md: Metadata) -> None:
        self.md = md
        self.conn = None  # an epcfs.client.Enclave while the device is open
        self._cpuid: dict | None = None
        self.segments: list[Segment] = []
        self.encl_size = 0
        self.encl_base = 0
        self.added_end = 0  # pages [0, added_end) were EADDed
        self.initialized = False
        self.overrides: list[tuple[int, int, Callable[[Page | None], Page | None]]] = []
        self.pte_ro: set[int] = set()
        self.memory: dict[int, int] = {}
        self.tcs_pages: dict[int, tuple[int, int]] = {TCS1: (SSA1, STACK1),
                                                      TCS2: (SSA2, STACK2)}
        self.in_aex: set[int] = set()
        md.teardown.append(self.delete)

    # -- the device --------------------------------------------------------------------

    def _device(self):  # -> epcfs.client.Enclave
        """open("/dev/sgx_enclave", O_RDWR): a connection to the daemon. No daemon (no
        socket, or nobody listening on it) is a missing device node."""
        if self.conn is not None:
            return self.conn
        from ...client import Enclave

        try:
            self.conn = Enclave()
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR, None):
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT)) from None
            raise
        return self.conn

    def cpuid(self) -> dict:
        """CPUID leaf 0x12 as the daemon describes it (`info`): EPC sections and SGX2.
        Without a daemon, the EPC size comes from misc.capacity if the cgroup root has
        one; otherwise the machine looks like it has no EPC."""
        if self._cpuid is None:
            try:
                self._cpuid = dict(self._device().call("info"))
            except Exception:  # noqa: BLE001 — no daemon, or a broken one: no CPUID data
                self._cpuid = {"sections": [[0, _capacity_from_cgroupfs()]]}
        return self._cpuid

    def total_epc_mem(self) -> int:
        """get_total_epc_mem(): the sum of the EPC sections (page granular)."""
        return sum(int(size) & ~0xFFF for _, size in self.cpuid().get("sections", []))

    def sgx2_supported(self) -> bool:
        return bool(self.cpuid().get("sgx2", True))

    def delete(self) -> None:
        """encl_delete(): closing the fd releases the enclave."""
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.segments = []
        self.encl_size = self.encl_base = self.added_end = 0
        self.initialized = False

    def _call(self, op: str, **fields) -> dict:
        """One request; a signal reply (kernel-sent signal) kills this process."""
        from ...client import SignalOutcome

        if self.conn is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        try:
            return self.conn.call(op, **fields)
        except SignalOutcome as s:
            die_by_signal(_signum(s.signal))
            raise  # not reached

    def ioctl(self, op: str, **fields) -> tuple[int, int, int]:
        """An ioctl: (return value, errno, pages done) as the caller sees them. On
        success without a count in the reply, every page requested was done."""
        while True:
            try:
                reply = self._call(op, **fields)
            except OSError as e:
                code = e.errno or errno.EIO  # a closed connection: the device went away
                if code == ERESTARTSYS and not getattr(e, "count", 0):
                    continue
                return -1, code, int(getattr(e, "count", 0) or 0)
            return 0, 0, int(reply.get("count", fields.get("count", 0)))

    # -- building ----------------------------------------------------------------------

    def setup(self, heap_size: int) -> bool:
        """setup_test_encl(): load, build and map; on failure log what main.c logs."""
        try:
            self._device()
        except OSError as e:
            perror("Unable to open /dev/sgx_enclave", e.errno or errno.EIO)
            self.delete()
            self.md.log(189, "Failed to load the test enclave.")
            return False
        last = IMAGE[-1]
        heap = Segment(last.offset + last.size, heap_size, RW, measure=False)
        self.segments = [*IMAGE, heap]
        src_size = heap.offset + heap.size
        self.encl_size = PAGE_SIZE
        while self.encl_size < src_size:
            self.encl_size <<= 1
        self._declare_page_tables(src_size)
        if not self._build():
            for seg in self.segments:
                self.md.log(232, f"0x{seg.offset:016x} 0x{seg.size:016x} 0x{seg.prot:02x}")
            self.md.log(247, "Failed to initialize the test enclave.")
            self.delete()
            return False
        self.encl_base = -(-_BASE_HINT // self.encl_size) * self.encl_size
        return True

    def _declare_page_tables(self, src_size: int) -> None:
        """EADD reads every source page, which maps it (the zero page for the untouched
        heap) and fills page tables; the kernel charges those to the memcg, and they are
        what makes this process, not its harness parent, the memcg OOM killer's choice.
        Best effort: a charge refused at memory.max has queued its OOM decision, and the
        faulting read would simply retry."""
        with contextlib.suppress(OSError):
            self._call("declare", bytes=src_size // PAGE_SIZE * PTE_SIZE)

    def _build(self) -> bool:
        """encl_build(): ECREATE, one EADD ioctl per segment, EINIT."""
        ret, err, _ = self.ioctl("create", size=self.encl_size)
        if ret:
            perror("SGX_IOC_ENCLAVE_CREATE failed", err)
            return False
        for seg in self.segments:
            ret, err, _ = self.ioctl("add", offset=seg.offset // PAGE_SIZE,
                                     count=seg.size // PAGE_SIZE,
                                     measured=seg.measure, tcs=seg.tcs)
            if ret:
                perror("SGX_IOC_ENCLAVE_ADD_PAGES failed", err)
                return False
            self.added_end = (seg.offset + seg.size) // PAGE_SIZE
        ret, err, _ = self.ioctl("init")
        if ret:
            perror("SGX_IOC_ENCLAVE_INIT failed", err)
            return False
        self.initialized = True
        return True

    @property
    def total_size(self) -> int:
        """The sum of the segment sizes (the tests' `total_size`)."""
        return sum(seg.size for seg in self.segments)

    def addr(self, page: int) -> int:
        return self.encl_base + page * PAGE_SIZE

    # -- EDMM ioctls (offsets and lengths in bytes, as in the uapi structs) --------------

    def _edmm(self, op: str, offset: int, length: int, effect, **fields) -> tuple[int, int, int]:
        first, pages = offset // PAGE_SIZE, length // PAGE_SIZE
        ret, err, done = self.ioctl(op, offset=first, count=pages, **fields)
        if length:
            self._override(first, first + done, effect)
        return ret, err, done * PAGE_SIZE

    def modify_types(self, offset: int, length: int, page_type: int) -> tuple[int, int, int]:
        """SGX_IOC_ENCLAVE_MODIFY_TYPES → (ret, errno, count in bytes)."""
        return self._edmm("modify_types", offset, length,
                          lambda p: replace(p, ptype=page_type, modified=True),
                          page_type=page_type)

    def restrict(self, offset: int, length: int, perms: int) -> tuple[int, int, int]:
        """SGX_IOC_ENCLAVE_RESTRICT_PERMISSIONS → (ret, errno, count in bytes)."""
        return self._edmm("restrict", offset, length,
                          lambda p: replace(p, perms=perms, pr=True), permissions=perms)

    def remove(self, offset: int, length: int) -> tuple[int, int, int]:
        """SGX_IOC_ENCLAVE_REMOVE_PAGES → (ret, errno, count in bytes)."""
        return self._edmm("remove", offset, length, lambda p: None)

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        pages = range((addr - self.encl_base) // PAGE_SIZE,
                      (addr - self.encl_base + length) // PAGE_SIZE)
        if prot & PROT_WRITE:
            self.pte_ro.difference_update(pages)
        else:
            self.pte_ro.update(pages)

    # -- the CPU's view of pages --------------------------------------------------------

    def _override(self, start: int, end: int, fn: Callable[[Page | None], Page | None]) -> None:
        if end > start:
            self.overrides.append((start, end, fn))

    def page(self, p: int) -> Page | None:
        """The EPCM entry of page p, or None if the enclave has no page there."""
        if p < 0 or p * PAGE_SIZE >= self.encl_size:
            return None
        if p >= self.added_end:
            cur: Page | None = None
        elif p in (TCS1, TCS2):
            cur = Page(PAGE_TYPE_TCS, 0)
        elif p == CODE:
            cur = Page(perms=RX)
        else:
            cur = Page()
        for start, end, fn in self.overrides:
            if start <= p < end:
                cur = fn(cur)
        return cur

    def _retrying(self, op: str, offset: int, count: int) -> tuple[int, int]:
        """A request whose page faults the kernel serves: EBUSY is retried (the fault
        returned VM_FAULT_NOPAGE, the CPU faults again); a SIGBUS/SIGSEGV reply, or a
        lost daemon, raises _Unserved(page) (fixup_vdso_exception reports it instead of
        the signal). Returns (errno, pages done): (0, count) on success."""
        from ...client import SignalOutcome

        done = 0
        delay = 0.0005
        while True:
            if self.conn is None:
                raise _Unserved(offset + done)
            try:
                self.conn.call(op, offset=offset + done, count=count - done)
                return 0, count
            except SignalOutcome as s:
                if s.signal in ("SIGBUS", "SIGSEGV"):
                    raise _Unserved(offset + done) from None
                die_by_signal(_signum(s.signal))
            except ConnectionError:
                raise _Unserved(offset + done) from None
            except OSError as e:
                done += int(getattr(e, "count", 0) or 0)
                if e.errno != errno.EBUSY:
                    return e.errno or errno.EIO, done
                time.sleep(delay)
                delay = min(delay * 2, 0.02)

    def _fault_in(self, p: int, code: int) -> None:
        """The kernel's side of an access to page p: ELDU it if it was evicted. Anything
        but success becomes a #PF report (VM_FAULT_SIGBUS → fixup_vdso_exception)."""
        try:
            err, _ = self._retrying("touch", p, 1)
        except _Unserved:
            err = errno.EFAULT
        if err:
            raise Fault(VECTOR_PF, code, self.addr(p))

    def _augment(self, p: int, code: int) -> Page:
        """#PF on an address of an initialized enclave with no page: EAUG."""
        if not self.initialized or p * PAGE_SIZE >= self.encl_size:
            raise Fault(VECTOR_PF, code, self.addr(p))
        try:
            err, _ = self._retrying("augment", p, 1)
        except _Unserved:
            err = errno.EFAULT
        if err:
            raise Fault(VECTOR_PF, code, self.addr(p))
        self._override(p, p + 1, lambda _: Page(pending=True))
        return Page(pending=True)

    def access(self, p: int, kind: str) -> None:
        """A load ("r"), store ("w") or instruction fetch ("x") by the enclave at page p."""
        write = kind == "w"
        code = PF_USER | (PF_WRITE if write else 0) | (PF_INSTR if kind == "x" else 0)
        page = self.page(p)
        if page is None:
            page = self._augment(p, code)
        else:
            self._fault_in(p, code)
        if write and p in self.pte_ro:
            raise Fault(VECTOR_PF, PF_PRESENT | code, self.addr(p))
        need = {"r": SECINFO_R, "w": SECINFO_W, "x": SECINFO_X}[kind]
        if page.ptype != PAGE_TYPE_REG or page.pending or page.modified or \
                not page.perms & need:
            raise Fault(VECTOR_PF, PF_SGX | PF_PRESENT | code, self.addr(p))

    # -- entering the enclave ------------------------------------------------------------

    def _tcs_page(self, run: Run) -> int:
        return (run.tcs - self.encl_base) // PAGE_SIZE

    def _enter(self, run: Run, leaf: int) -> int:
        """EENTER/ERESUME up to the first instruction: returns the TCS page."""
        tcs = self._tcs_page(run)
        page = self.page(tcs)
        if page is None or page.ptype != PAGE_TYPE_TCS or page.pending or page.modified \
                or tcs not in self.tcs_pages:
            raise Fault(VECTOR_GP)
        if (leaf == EENTER) == (tcs in self.in_aex):
            raise Fault(VECTOR_GP)  # EENTER with CSSA == NSSA, or ERESUME with CSSA == 0
        ssa, _ = self.tcs_pages[tcs]
        self._fault_in(tcs, PF_USER | PF_WRITE)
        self._fault_in(ssa, PF_USER | PF_WRITE)
        self.in_aex.discard(tcs)
        return tcs

    def call(self, op: Op, run: Run, leaf: int = EENTER) -> int:
        """ENCL_CALL / vdso_sgx_enter_enclave(op, 0, 0, leaf, 0, 0, run): always 0 here;
        the outcome is in `run` (and in `op`)."""
        self._inside(run, leaf, lambda: self._execute(op))
        return 0

    def _inside(self, run: Run, leaf: int, body: Callable[[], object]) -> object:
        """Enter through run's TCS, do `body` from the first instruction on, and leave:
        EEXIT in `run` and body's result, or the AEX in `run` and the Fault that caused
        it (the TCS then needs ERESUME)."""
        try:
            tcs = self._enter(run, leaf)
            try:
                _, stack = self.tcs_pages[tcs]
                self.access(CODE, "x")
                self.access(stack, "w")
                result = body()
            except Fault:
                self.in_aex.add(tcs)
                raise
        except Fault as f:
            run.function = ERESUME
            run.exception_vector = f.vector
            run.exception_error_code = f.code
            run.exception_addr = f.addr
            return f
        run.function = EEXIT
        return result

    def _execute(self, op: Op) -> None:
        page = (op.addr - self.encl_base) // PAGE_SIZE
        if op.kind == "put_buf":
            self.access(BUFFER, "w")
            self.memory[self.addr(BUFFER)] = op.value
        elif op.kind == "get_buf":
            self.access(BUFFER, "r")
            op.value = self.memory.get(self.addr(BUFFER), 1)  # encl_buffer = { 1 }
        elif op.kind == "put_addr":
            self.access(page, "w")
            self.memory[op.addr] = op.value
        elif op.kind == "get_addr":
            self.access(page, "r")
            op.value = self.memory.get(op.addr, 0)
        elif op.kind == "nop":
            pass
        elif op.kind == "eaccept":
            op.ret, _ = self._eaccept(page)
        elif op.kind == "emodpe":
            self._fault_in(page, PF_USER)
            perms = op.flags & (SECINFO_R | SECINFO_W | SECINFO_X)
            self._override(page, page + 1, lambda p: p and replace(p, perms=p.perms | perms))
        elif op.kind == "init_tcs_page":
            tcs = (op.tcs_page - self.encl_base) // PAGE_SIZE
            self.access(tcs, "w")
            self.tcs_pages[tcs] = (op.ssa // PAGE_SIZE, tcs - 1)  # stack: the page before
        else:
            raise ValueError(op.kind)

    def _eaccept(self, p: int, count: int = 1) -> tuple[int, int]:
        """EACCEPT of pages [p, p+count), in order: (ret of the page that failed or 0,
        pages accepted). The daemon's errno stands in for the SGX error code EACCEPT
        returns. A page fault that cannot be served raises Fault."""
        if self.page(p) is None:
            self._augment(p, PF_USER)  # EACCEPT on an unbacked address: #PF → EAUG
        try:
            err, done = self._retrying("accept", p, count)
        except _Unserved as u:
            self._accepted(p, u.page)
            raise Fault(VECTOR_PF, PF_USER, self.addr(u.page)) from None
        self._accepted(p, p + done)
        return err, done

    def _accepted(self, start: int, end: int) -> None:
        self._override(start, end,
                       lambda pg: replace(pg, pending=False, modified=False, pr=False))

    def eaccept_range(self, run: Run, first: int, count: int) -> tuple[int, int]:
        """The EACCEPT-every-page loop of the oversubscribed remove test, its one entry
        per page folded into one protocol call: returns (pages accepted, ret of the page
        that failed); a page fault that could not be served is reported in `run`."""
        outcome = self._inside(run, EENTER, lambda: self._eaccept(first, count))
        if isinstance(outcome, Fault):
            page = (outcome.addr - self.encl_base) // PAGE_SIZE
            return (page - first if first <= page < first + count else 0), 0
        ret, done = outcome
        return done, ret


class _Unserved(Exception):  # noqa: N818
    """A fault at `page` the kernel answered with SIGBUS (or could not answer at all)."""

    def __init__(self, page: int) -> None:
        super().__init__(page)
        self.page = page


def _capacity_from_cgroupfs() -> int:
    from ...client import CGROUP_ROOT

    try:
        with open(os.path.join(CGROUP_ROOT, "misc.capacity")) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == "sgx_epc":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0
