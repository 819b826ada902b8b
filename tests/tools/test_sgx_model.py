"""In-process checks of test_sgx's pieces: getopt, the test filter, the enclave CPU model."""

from __future__ import annotations

import errno

import pytest

from epcfs.client import SignalOutcome
from epcfs.tools.sgx_selftest import encl as E
from epcfs.tools.sgx_selftest.cases import FIXTURES
from epcfs.tools.sgx_selftest.harness import Metadata, Selected, getopt
from epcfs.tools.sgx_selftest.harness import test_enabled as enabled

# -- getopt and the filter --------------------------------------------------------------------


def test_getopt_permutes_groups_and_stops_at_double_dash(monkeypatch):
    monkeypatch.delenv("POSIXLY_CORRECT", raising=False)
    opts = "hlF:f:V:v:t:T:r:"
    assert list(getopt(["foo", "-t", "x", "bar", "-lTy", "-t-l"], opts)) == [
        ("t", "x"), ("l", None), ("T", "y"), ("t", "-l")]
    assert list(getopt(["-t", "a", "--", "-l"], opts)) == [("t", "a")]
    assert list(getopt(["-q", "-"], opts)) == [("?", "invalid option -- 'q'")]
    monkeypatch.setenv("POSIXLY_CORRECT", "1")
    assert list(getopt(["foo", "-l"], opts)) == []


def selected(test: str) -> Selected:
    fixture = FIXTURES[1]
    return Selected(fixture, "", next(t for t in fixture.tests if t.name == test))


@pytest.mark.parametrize(("filters", "test", "runs"), [
    ([], "augment", True),
    ([("t", "augment")], "augment", True),
    ([("t", "augment")], "augment_via_eaccept", False),  # exact names
    ([("T", "augment")], "tcs_entry", True),  # only exclusions: the rest runs
    ([("T", "augment"), ("t", "augment")], "augment", False),  # the first match decides
    ([("t", "augment"), ("T", "augment")], "augment", True),
    ([("F", "enclave")], "augment", False),
    ([("f", "enclave"), ("T", "augment")], "augment", True),
    ([("v", "")], "augment", True),  # the unnamed variant
    ([("V", "")], "augment", False),
    ([("r", "enclave.augment")], "augment", True),
    ([("r", "enclave.augment")], "tcs_entry", False),
    ([("r", "enclave-augment")], "augment", True),  # like the harness: separator unchecked
])
def test_filter(filters, test, runs):
    assert enabled(filters, selected(test)) is runs


# -- the enclave model over a scripted connection --------------------------------------------


class ScriptedConn:
    """Answers like a correct daemon unless `script[op]` (a list) says otherwise."""

    def __init__(self, **script) -> None:
        self.script = {op: list(replies) for op, replies in script.items()}
        self.calls: list[tuple[str, dict]] = []

    def call(self, op: str, **fields) -> dict:
        self.calls.append((op, fields))
        replies = self.script.get(op)
        reply = replies.pop(0) if replies else None
        if isinstance(reply, BaseException):
            raise reply
        return reply if reply is not None else {"ok": True, "count": fields.get("count", 0)}

    def close(self) -> None:
        pass


def oserror(code: int, count: int = 0) -> OSError:
    e = OSError(code, "")
    e.count = count
    return e


def built(conn: ScriptedConn) -> E.TestEnclave:
    e = E.TestEnclave(Metadata("model"))
    e.conn = conn
    assert e.setup(E.ENCL_HEAP_SIZE_DEFAULT)
    conn.calls.clear()
    return e


def test_busy_faults_are_retried_until_served():
    conn = ScriptedConn(touch=[oserror(errno.EBUSY), oserror(errno.EBUSY)])
    e = built(conn)
    run = E.Run(tcs=e.encl_base)
    put = E.Op("put_buf", value=E.MAGIC)
    assert e.call(put, run) == 0 and run.function == E.EEXIT
    assert [f["offset"] for op, f in conn.calls] == [0, 0, 0, 5, 2, 7, 3]


def test_an_unserved_fault_is_an_exception_then_the_tcs_is_stuck():
    # touches: TCS, SSA, code, stack succeed; the buffer page gets SIGBUS
    conn = ScriptedConn(touch=[None, None, None, None, SignalOutcome("SIGBUS")])
    e = built(conn)
    run = E.Run(tcs=e.encl_base)
    e.call(E.Op("put_buf", value=E.MAGIC), run)
    assert (run.function, run.exception_vector, run.exception_error_code,
            run.exception_addr) == (E.ERESUME, 14, 0x6, e.encl_base + 3 * 4096)
    get = E.Op("get_buf")
    e.call(get, run)  # EENTER on a TCS whose SSA frame is in use: #GP
    assert (run.function, run.exception_vector, run.exception_error_code) == (E.ERESUME, 13, 0)
    assert get.value == 0
    run.tcs = e.encl_base + 4096  # the other TCS still works
    e.call(get, run)
    assert run.function == E.EEXIT and get.value == 1  # encl_buffer = { 1 }


def test_eaccept_range_resumes_after_busy_and_reports_the_failing_page():
    first, n = E.HEAP, 1
    conn = ScriptedConn(accept=[oserror(errno.EBUSY, count=0)])
    e = built(conn)
    run = E.Run(tcs=e.encl_base)
    assert e.eaccept_range(run, first, n) == (n, 0)
    assert [f for op, f in conn.calls if op == "accept"] == [
        {"offset": first, "count": n}, {"offset": first, "count": n}]

    e2 = E.TestEnclave(Metadata("model"))
    e2.conn = ScriptedConn(accept=[oserror(errno.EBUSY, count=3), oserror(errno.EINVAL, 2)])
    assert e2.setup(64 * 4096)
    run = E.Run(tcs=e2.encl_base)
    assert e2.eaccept_range(run, E.HEAP, 64) == (5, errno.EINVAL)
    assert [f for op, f in e2.conn.calls if op == "accept"] == [
        {"offset": E.HEAP, "count": 64}, {"offset": E.HEAP + 3, "count": 61}]


def test_segments_and_enclave_size():
    e = built(ScriptedConn())
    assert [(s.offset, s.size, s.prot, s.measure, s.tcs) for s in e.segments] == [
        (0, 0x2000, 3, True, True), (0x2000, 0x1000, 5, True, False),
        (0x3000, 0x6000, 3, True, False), (0x9000, 0x1000, 3, False, False)]
    assert e.encl_size == 0x10000 and e.encl_base % e.encl_size == 0
