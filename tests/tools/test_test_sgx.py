"""test_sgx as the run_epc_cg_selftests.sh scripts run it: `./test_sgx -t <test>`.

Each test starts the program (a ./test_sgx in a scratch directory, as the scripts call it)
against a FakeEpc and checks stdout, stderr and the exit status — byte for byte where the
kselftest harness fixes the text.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from .fake_epc import DROP, FakeEpc

REPO = Path(__file__).resolve().parents[2]
OVERSUB = "unclobbered_vdso_oversubscribed"
MAGIC = 0x1122334455667788

USAGE = (
    "Usage: ./test_sgx [-h|-l] [-t|-T|-v|-V|-f|-F|-r name]\n"
    "\t-h       print help\n"
    "\t-l       list all tests\n"
    "\n"
    "\t-t name  include test\n"
    "\t-T name  exclude test\n"
    "\t-v name  include variant\n"
    "\t-V name  exclude variant\n"
    "\t-f name  include fixture\n"
    "\t-F name  exclude fixture\n"
    "\t-r name  run specified test\n"
    "\n"
    "Test filter options can be specified multiple times. The filtering stops\n"
    "at the first match. For example to include all tests from variant 'bla'\n"
    "but not test 'foo' specify '-T foo -v bla'.\n"
)

ALL_TESTS = [
    "unclobbered_vdso", OVERSUB, f"{OVERSUB}_remove", "clobbered_vdso",
    "clobbered_vdso_and_user_function", "tcs_entry", "pte_permissions", "tcs_permissions",
    "epcm_permissions", "augment", "augment_via_eaccept", "tcs_create",
    "remove_added_page_no_eaccept", "remove_added_page_invalid_access",
    "remove_added_page_invalid_access_after_eaccept", "remove_untouched_page",
]

LISTING = (
    "# FIXTURE            VARIANT                   TEST\n"
    "global                                         \n"
    + "-" * 80 + "\n"
    + "".join(f"{'enclave' if i == 0 else '':<20} {'':<25} {t}\n"
              for i, t in enumerate(ALL_TESTS))
)


def tap_one(name: str, ok: bool, skip: str | None = None) -> str:
    """The whole stdout of a one-test run."""
    totals = ("pass:0 fail:0 xfail:0 xpass:0 skip:1" if skip else
              "pass:1 fail:0 xfail:0 xpass:0 skip:0" if ok else
              "pass:0 fail:1 xfail:0 xpass:0 skip:0")
    result = (f"ok 1 enclave.{name} # SKIP {skip}" if skip else
              f"ok 1 enclave.{name}" if ok else f"not ok 1 enclave.{name}")
    return (
        "TAP version 13\n1..1\n# Starting 1 tests from 1 test cases.\n"
        f"#  RUN           enclave.{name} ...\n"
        f"# {'OK' if ok else 'FAIL':>13}  enclave.{name}\n"
        f"{result}\n"
        f"# {'PASSED' if ok else 'FAILED'}: {1 if ok else 0} / 1 tests passed.\n"
        f"# Totals: {totals} error:0\n"
    )


@pytest.fixture
def workdir():
    """A short directory (unix socket paths are limited) holding ./test_sgx."""
    d = Path(tempfile.mkdtemp(prefix="sgx", dir="/tmp"))
    (d / "test_sgx").write_text(
        f"#!{sys.executable}\nimport sys\nfrom epcfs.tools.test_sgx import main\n"
        "sys.exit(main())\n")
    (d / "test_sgx").chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def epc(workdir):
    server = FakeEpc(str(workdir / "epc.sock"), capacity=64 << 20)
    yield server
    server.close()


def environ(workdir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("KSFT_TAP_LEVEL", "POSIXLY_CORRECT", "EPCFS_TEST_TIMEOUT_SCALE")}
    env.update(EPCFS_SOCKET=str(workdir / "epc.sock"), PYTHONPATH=str(REPO), **extra)
    return env


def test_sgx(workdir: Path, *args: str, merge: bool = False, timeout: float = 60,
             **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["./test_sgx", *args], cwd=workdir, env=environ(workdir, **env), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT if merge else subprocess.PIPE,
        timeout=timeout)


test_sgx.__test__ = False  # a helper, not a test


# -- the interface: options, listing, exit codes -------------------------------------------


def test_list_and_help_exit_4_with_nothing_on_stdout(workdir):
    r = test_sgx(workdir, "-l")
    assert (r.returncode, r.stdout, r.stderr) == (4, "", LISTING)
    r = test_sgx(workdir, "-h")
    assert (r.returncode, r.stdout, r.stderr) == (4, "", USAGE)
    r = test_sgx(workdir, "-t", "x", "-l", "-x")  # the first of -l/-h/error decides
    assert (r.returncode, r.stderr) == (4, LISTING)


def test_bad_option_prints_getopt_error_and_usage_exit_1(workdir):
    r = test_sgx(workdir, "-x")
    assert (r.returncode, r.stdout) == (1, "")
    assert r.stderr == "./test_sgx: invalid option -- 'x'\n" + USAGE
    r = test_sgx(workdir, "-t")
    assert r.returncode == 1
    assert r.stderr == "./test_sgx: option requires an argument -- 't'\n" + USAGE
    r = test_sgx(workdir, "--help")
    assert r.returncode == 1
    assert r.stderr.startswith("./test_sgx: invalid option -- '-'\n")


def test_no_match_runs_nothing_and_passes(workdir):
    r = test_sgx(workdir, "-t", "unclobbered")  # exact names only: no prefix match
    assert r.returncode == 0
    assert r.stdout == (
        "TAP version 13\n1..0\n# Starting 0 tests from 0 test cases.\n"
        "# PASSED: 0 / 0 tests passed.\n"
        "# Totals: pass:0 fail:0 xfail:0 xpass:0 skip:0 error:0\n")


# -- the scripts' test ---------------------------------------------------------------------


def test_oversubscribed_passes_byte_exact(workdir, epc):
    r = test_sgx(workdir, "-t", OVERSUB)
    assert (r.returncode, r.stdout, r.stderr) == (0, tap_one(OVERSUB, True), "")

    # -t is exact: _remove did not run; one enclave, built as the selftest builds it
    assert [m["size"] for m in epc.ops("create")] == [128 << 20]  # 2^k >= 36 KiB + 64 MiB
    assert [(m["offset"], m["count"], m["measured"], m["tcs"]) for m in epc.ops("add")] == [
        (0, 2, True, True), (2, 1, True, False), (3, 6, True, False),
        (9, (64 << 20) // 4096, False, False)]
    assert len(epc.ops("init")) == 1
    touched = {m["offset"] for m in epc.ops("touch")}
    assert touched == {0, 2, 3, 5, 7}  # TCS #1, code, encl_buffer, its SSA and stack
    assert not epc.ops("modify_types") and not epc.ops("remove")


def test_child_makes_its_own_connection(workdir, epc):
    proc = subprocess.Popen(["./test_sgx", "-t", "unclobbered_vdso"], cwd=workdir,
                            env=environ(workdir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert epc.pids() and proc.pid not in epc.pids()  # the forked child connected


def test_add_enomem_fails_like_the_selftest(workdir, epc):
    epc.rules["add"] = lambda c, m: None if m["measured"] else {"errno": errno.ENOMEM,
                                                                "count": 17}
    r = test_sgx(workdir, "-t", OVERSUB)
    assert (r.returncode, r.stdout) == (1, tap_one(OVERSUB, False))
    t = f"# main.c:232:{OVERSUB}:"
    assert r.stderr == (
        "SGX_IOC_ENCLAVE_ADD_PAGES failed: Cannot allocate memory\n"
        f"{t}0x0000000000000000 0x0000000000002000 0x03\n"
        f"{t}0x0000000000002000 0x0000000000001000 0x05\n"
        f"{t}0x0000000000003000 0x0000000000006000 0x03\n"
        f"{t}0x0000000000009000 0x0000000004000000 0x03\n"
        f"# main.c:247:{OVERSUB}:Failed to initialize the test enclave.\n"
        f"# main.c:361:{OVERSUB}:Expected 0 (0) != "
        "setup_test_encl(total_mem, &self->encl, _metadata) (0)\n"
        f"# {OVERSUB}: Test terminated by assertion\n")
    assert all(c.closed.wait(5) for c in epc.conns)  # the enclave was released


def test_missing_daemon_is_a_missing_device(workdir):
    r = test_sgx(workdir, "-t", "unclobbered_vdso")  # nobody listens on the socket path
    assert (r.returncode, r.stdout) == (1, tap_one("unclobbered_vdso", False))
    assert r.stderr == (
        "Unable to open /dev/sgx_enclave: No such file or directory\n"
        "# main.c:189:unclobbered_vdso:Failed to load the test enclave.\n"
        "# main.c:288:unclobbered_vdso:Expected 0 (0) != "
        "setup_test_encl(ENCL_HEAP_SIZE_DEFAULT, &self->encl, _metadata) (0)\n"
        "# unclobbered_vdso: Test terminated by assertion\n")


def test_remove_skips_without_edmm_byte_exact(workdir):
    server = FakeEpc(str(workdir / "epc.sock"), capacity=4 << 30)
    server.rules["modify_types"] = lambda c, m: {"errno": errno.ENOTTY, "count": 0}
    try:
        r = test_sgx(workdir, "-t", f"{OVERSUB}_remove", merge=True)
    finally:
        server.close()
    assert r.returncode == 0
    name = f"{OVERSUB}_remove"
    reason = "Kernel does not support SGX_IOC_ENCLAVE_MODIFY_TYPES ioctl()"
    assert r.stdout == (
        "TAP version 13\n1..1\n# Starting 1 tests from 1 test cases.\n"
        f"#  RUN           enclave.{name} ...\n"
        f"# main.c:403:{name}:Creating an enclave with 4294967296 bytes heap may take a "
        "while ...\n"
        f"#      SKIP      {reason}\n"
        f"#            OK  enclave.{name}\n"
        f"ok 1 enclave.{name} # SKIP {reason}\n"
        "# PASSED: 1 / 1 tests passed.\n"
        "# Totals: pass:0 fail:0 xfail:0 xpass:0 skip:1 error:0\n")


def test_remove_runs_trim_accept_remove_of_the_whole_heap(workdir, epc):
    r = test_sgx(workdir, "-t", f"{OVERSUB}_remove")
    assert (r.returncode, r.stdout) == (0, tap_one(f"{OVERSUB}_remove", True))
    n, heap = 64 << 20, (64 << 20) // 4096
    assert r.stderr == "".join(
        f"# main.c:{line}:{OVERSUB}_remove:{text} may take a while ...\n" for line, text in (
            (403, f"Creating an enclave with {n} bytes heap"),
            (458, f"Changing type of {n} bytes to trimmed"),
            (474, f"Entering enclave to run EACCEPT for each page of {n} bytes"),
            (495, f"Removing {n} bytes from enclave")))
    assert [(m["offset"], m["count"], m["page_type"]) for m in epc.ops("modify_types")] == [
        (0, 0, 0), (9, heap, 4)]
    assert [(m["offset"], m["count"]) for m in epc.ops("accept")] == [(9, heap)]
    assert [(m["offset"], m["count"]) for m in epc.ops("remove")] == [(9, heap)]


def test_every_test_passes_against_a_correct_kernel(workdir, epc):
    epc.capacity = 1 << 20
    r = test_sgx(workdir)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr.count("may take a while") == 4 and "Expected" not in r.stderr
    assert f"1..{len(ALL_TESTS)}\n" in r.stdout
    for i, name in enumerate(ALL_TESTS, 1):
        assert f"\nok {i} enclave.{name}\n" in r.stdout
    assert r.stdout.endswith(
        f"# PASSED: {len(ALL_TESTS)} / {len(ALL_TESTS)} tests passed.\n"
        f"# Totals: pass:{len(ALL_TESTS)} fail:0 xfail:0 xpass:0 skip:0 error:0\n")
    # the EDMM footprints: augment adds one page, tcs_create three, then re-adds one
    assert [m["offset"] for m in epc.ops("augment")] == [10, 10, 10, 12, 11, 11]


def test_exclusions_run_the_rest_and_r_names_one(workdir, epc):
    excluded = [a for t in ALL_TESTS if t != "tcs_entry" for a in ("-T", t)]
    r = test_sgx(workdir, *excluded)
    assert (r.returncode, r.stdout) == (0, tap_one("tcs_entry", True))
    assert {m["offset"] for m in epc.ops("touch")} == {0, 1, 2, 5, 6, 7, 8}  # both TCSs
    r = test_sgx(workdir, "-r", "enclave.pte_permissions")
    assert (r.returncode, r.stdout) == (0, tap_one("pte_permissions", True))
    r = test_sgx(workdir, "-T", "augment", "-t", "augment", "-t", "tcs_entry")  # first wins
    assert (r.returncode, r.stdout) == (0, tap_one("tcs_entry", True))


def test_a_wrong_edmm_answer_fails_the_check(workdir, epc):
    epc.rules["remove"] = lambda c, m: {"ok": True, "count": m["count"]}  # no EPERM
    name = "remove_added_page_no_eaccept"
    r = test_sgx(workdir, "-t", name)
    assert (r.returncode, r.stdout) == (1, tap_one(name, False))
    assert r.stderr == (
        f"# main.c:1666:{name}:Expected ret (0) == -1 (-1)\n"
        f"# main.c:1667:{name}:Expected errno_save (0) == EPERM (1)\n"
        f"# main.c:1668:{name}:Expected remove_ioc.count (4096) == 0 (0)\n"
        f"# {name}: Test failed\n")


def test_sigbus_on_a_fault_is_reported_through_the_vdso(workdir, epc):
    epc.rules["touch"] = lambda c, m: {"signal": "SIGBUS"}
    r = test_sgx(workdir, "-t", "unclobbered_vdso")
    assert (r.returncode, r.stdout) == (1, tap_one("unclobbered_vdso", False))
    eexit = ("Expected (&self->run)->function (3) == EEXIT (4)\n"
             "# main.c:{0}:unclobbered_vdso:0x0e 0x06 0x00007f0000000000\n")
    assert r.stderr == (
        "# main.c:298:unclobbered_vdso:" + eexit.format(298)
        + f"# main.c:306:unclobbered_vdso:Expected get_op.value (0) == MAGIC ({MAGIC})\n"
        + "# main.c:307:unclobbered_vdso:" + eexit.format(307)
        + "# unclobbered_vdso: Test failed\n")


# -- the process model -------------------------------------------------------------------


def test_child_killed_by_sigkill_fails(workdir, epc):
    def oom_kill(conn, message):
        os.kill(conn.pid, signal.SIGKILL)
        return DROP

    epc.rules["touch"] = oom_kill
    r = test_sgx(workdir, "-t", OVERSUB)
    assert (r.returncode, r.stdout) == (1, tap_one(OVERSUB, False))
    assert r.stderr == f"# {OVERSUB}: Test terminated unexpectedly by signal 9\n"

    epc.rules["touch"] = lambda c, m: {"signal": "SIGKILL"}  # the same, said in a reply
    r = test_sgx(workdir, "-t", OVERSUB)
    assert r.stderr == f"# {OVERSUB}: Test terminated unexpectedly by signal 9\n"


def test_timeout_kills_the_child_group(workdir, epc):
    release = threading.Event()
    epc.rules["touch"] = lambda c, m: release.wait(20) and None
    start = time.monotonic()
    try:
        r = test_sgx(workdir, "-t", "unclobbered_vdso", EPCFS_TEST_TIMEOUT_SCALE="0.05")
    finally:
        release.set()
    assert time.monotonic() - start < 10
    assert (r.returncode, r.stdout) == (1, tap_one("unclobbered_vdso", False))
    assert r.stderr == "# unclobbered_vdso: Test terminated by timeout\n"
    (child,) = epc.pids()
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_sigterm_to_the_parent_leaves_the_child_running(workdir, epc):
    release = threading.Event()
    epc.rules["touch"] = lambda c, m: release.wait(20) and None
    proc = subprocess.Popen(["./test_sgx", "-t", OVERSUB], cwd=workdir,
                            env=environ(workdir), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert epc.wait_for(lambda: epc.ops("touch"))  # the child is in the test body
        proc.send_signal(signal.SIGTERM)
        # wait(), not communicate(): the child still holds stdout and stderr
        assert proc.wait(timeout=10) == -signal.SIGTERM  # died of it, default action
        (child,) = epc.pids()
        os.kill(child, 0)  # still there
        touches = len(epc.ops("touch"))
    finally:
        release.set()
    # it finishes its test (the rest of put, then get) and releases the enclave
    assert epc.wait_for(lambda: epc.conns[0].closed.is_set())
    out, err = proc.communicate(timeout=10)
    assert "ok 1" not in out and not err  # nobody reports it any more
    assert len(epc.ops("touch")) > touches
    assert not [m for m in epc.ops() if m["op"] not in ("info", "declare", "create", "add",
                                                        "init", "touch")]


def test_eight_concurrent_runs(workdir, epc):
    procs = [subprocess.Popen(["./test_sgx", "-t", OVERSUB], cwd=workdir, env=environ(workdir),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(8)]
    results = [(p.communicate(timeout=60), p.returncode) for p in procs]
    assert all(rc == 0 and out == tap_one(OVERSUB, True) and not err
               for (out, err), rc in results)
    assert len(epc.ops("create")) == 8
