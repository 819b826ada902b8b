"""The kselftest harness, as the SGX selftest binary links it (TEST_HARNESS_MAIN).

What a caller of test_sgx can observe is reproduced: the options and their exit codes,
the TAP lines on stdout (line by line, as with a line-buffered stdio), the diagnostics on
stderr, and the process model — every test runs in a forked child that makes itself a
process-group leader; the parent waits on a pidfd with the test's timeout and SIGKILLs
the child's group when it expires. Only the parent writes stdout. A SIGTERM to the parent
kills it with the default action and leaves the child running to completion.

The grandchild the real harness forks for TEST_F is folded into the child: the test body
runs in the child itself. A test body ends in one of three ways, as in the harness:
normally (exit code PASS, FAIL after a failed EXPECT, or SKIP), by an ASSERT (the fixture
teardown runs, then the process dies of SIGABRT: "terminated by assertion"), or by a
signal from outside ("terminated unexpectedly by signal N").

Timeouts can be scaled down for the project's own tests with $EPCFS_TEST_TIMEOUT_SCALE (a
positive float); it is deliberately not an option.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator

KSFT_PASS = 0
KSFT_FAIL = 1
KSFT_XFAIL = 2
KSFT_XPASS = 3
KSFT_SKIP = 4

TIMEOUT_DEFAULT = 30
"""Seconds; TEST_F's default (TEST_F_TIMEOUT overrides it per test)."""

TIMEOUT_SCALE_ENV = "EPCFS_TEST_TIMEOUT_SCALE"
REASON_SIZE = 1024
"""Size of the shared buffer a SKIP reason travels in from the child to the parent."""

ARGV_OPTSTRING = "hlF:f:V:v:t:T:r:"
FILTER_OPTSTRING = "F:f:V:v:t:T:r:"

USAGE = (
    "Usage: {prog} [-h|-l] [-t|-T|-v|-V|-f|-F|-r name]\n"
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


# ---------------------------------------------------------------------------------------
# Output: one write(2) per line, like stdio with line buffering (stdout) or none (stderr).


def _write(fd: int, text: str) -> None:
    data = text.encode("utf-8", "surrogateescape")
    while data:
        n = os.write(fd, data)
        data = data[n:]


def out(line: str) -> None:
    """A line on stdout (printf with _IOLBF)."""
    _write(1, line + "\n")


def msg(line: str) -> None:
    """ksft_print_msg: a "# "-prefixed line on stdout."""
    out("# " + line)


def err(text: str) -> None:
    """Unbuffered stderr. A closed stderr is not the test's business (the child ignores
    SIGPIPE so that a closed daemon connection surfaces as EPIPE, not as a death)."""
    with contextlib.suppress(BrokenPipeError):
        _write(2, text)


def perror(prefix: str, errnum: int) -> None:
    err(f"{prefix}: {os.strerror(errnum)}\n")


# ---------------------------------------------------------------------------------------
# getopt(3), GNU flavour: argv is scanned left to right, non-options are skipped (they are
# permuted to the end) unless POSIXLY_CORRECT is set, "--" ends the options.


def getopt(args: list[str], optstring: str) -> Iterator[tuple[str, str | None]]:
    """Yield (option, argument); an error yields ("?", message) in glibc's wording."""
    posix = "POSIXLY_CORRECT" in os.environ or optstring.startswith("+")
    optstring = optstring.lstrip("+")
    takes_arg = {c: optstring[i + 1:i + 2] == ":"
                 for i, c in enumerate(optstring) if c != ":"}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return
        if len(arg) < 2 or not arg.startswith("-"):
            if posix:
                return
            i += 1
            continue
        j = 1
        while j < len(arg):
            c = arg[j]
            j += 1
            if c not in takes_arg:
                yield "?", f"invalid option -- '{c}'"
            elif not takes_arg[c]:
                yield c, None
            elif j < len(arg):
                yield c, arg[j:]
                break
            elif i + 1 < len(args):
                i += 1
                yield c, args[i]
                break
            else:
                yield "?", f"option requires an argument -- '{c}'"
                break
        i += 1


# ---------------------------------------------------------------------------------------
# Tests and fixtures.


class TestCase:
    """TEST_F(fixture, name) or TEST_F_TIMEOUT(fixture, name, timeout)."""

    __slots__ = ("name", "fn", "timeout")
    __test__ = False  # not a pytest class

    def __init__(self, name: str, fn: Callable[[Metadata], None],
                 timeout: int = TIMEOUT_DEFAULT) -> None:
        self.name = name
        self.fn = fn
        self.timeout = timeout


class Fixture:
    """A fixture and its tests; without FIXTURE_VARIANT it runs once, unnamed variant."""

    __slots__ = ("name", "tests", "variants")

    def __init__(self, name: str, tests: tuple[TestCase, ...] = (),
                 variants: tuple[str, ...] = ("",)) -> None:
        self.name = name
        self.tests = tests
        self.variants = variants


class Selected:
    """One test under one variant of its fixture."""

    __slots__ = ("fixture", "variant", "test")

    def __init__(self, fixture: Fixture, variant: str, test: TestCase) -> None:
        self.fixture = fixture
        self.variant = variant
        self.test = test

    @property
    def full_name(self) -> str:
        variant = f".{self.variant}" if self.variant else ""
        return f"{self.fixture.name}{variant}.{self.test.name}"


def _list_row(fixture: str, variant: str, test: str) -> str:
    return f"{fixture:<20} {variant:<25} {test}"  # "%-20s %-25s %s"


def list_tests(fixtures: list[Fixture]) -> None:
    lines = []
    for n, f in enumerate(fixtures):
        if n == 0:
            lines.append(_list_row("# FIXTURE", "VARIANT", "TEST"))
        else:
            lines.append("-" * 80)
        rows = max(len(f.variants), len(f.tests), 1)
        for r in range(rows):
            lines.append(_list_row(f.name if r == 0 else "",
                                   f.variants[r] if r < len(f.variants) else "",
                                   f.tests[r].name if r < len(f.tests) else ""))
    err("".join(line + "\n" for line in lines))


def argv_check(prog: str, args: list[str], fixtures: list[Fixture]) -> int:
    for opt, arg in getopt(args, ARGV_OPTSTRING):
        if opt in "fFvVtTr":
            continue
        if opt == "l":
            list_tests(fixtures)
            return KSFT_SKIP
        if opt == "?":
            err(f"{prog}: {arg}\n")
        err(USAGE.format(prog=prog))
        return KSFT_SKIP if opt == "h" else KSFT_FAIL
    return KSFT_PASS


def test_enabled(filters: list[tuple[str, str]], sel: Selected) -> bool:
    """The first filter that names this test decides; only exclusions → the rest runs."""
    f, v, t = sel.fixture.name, sel.variant, sel.test.name
    has_positive = False
    for opt, arg in filters:
        include = opt.islower()
        has_positive |= include
        kind = opt.lower()
        if (kind == "t" and arg == t) or (kind == "f" and arg == f) or \
                (kind == "v" and arg == v):
            return include
        if kind == "r":
            # fixture[.variant].test compared piecewise at fixed offsets, as the
            # harness does (the separators themselves are not compared)
            vskip = len(v) + (1 if v else 0)
            if (len(arg) == len(f) + 1 + vskip + len(t) and arg[:len(f)] == f
                    and arg[len(f) + 1:len(f) + 1 + len(v)] == v
                    and arg[len(f) + 1 + vskip:] == t):
                return True
    return not has_positive


# ---------------------------------------------------------------------------------------
# The child side: what TH_LOG, EXPECT_*, ASSERT_* and SKIP do inside a test.


class Skipped(Exception):
    """SKIP(return, …): the test body returns."""


class Bail(Exception):
    """A failed ASSERT: teardown, then abort()."""


class Metadata:
    """struct __test_metadata as seen by a running test (in the child)."""

    def __init__(self, name: str, reason: mmap.mmap | None = None) -> None:
        self.name = name
        self.exit_code = KSFT_PASS
        self._reason = reason
        self.teardown: list[Callable[[], None]] = []

    def log(self, line: int, text: str) -> None:
        """TH_LOG from main.c:<line>."""
        err(f"# main.c:{line}:{self.name}:{text}\n")

    def check(self, line: int, exp_src: str, exp: int, op: str, seen_src: str, seen: int,
              *, fatal: bool = False) -> bool:
        """__EXPECT: on failure log `Expected <exp> (<v>) <op> <seen> (<v>)`, mark the test
        failed and, for an ASSERT, bail out."""
        ok = {"==": exp == seen, "!=": exp != seen, "<": exp < seen,
              "<=": exp <= seen, ">": exp > seen, ">=": exp >= seen}[op]
        if not ok:
            self.log(line, f"Expected {exp_src} ({exp}) {op} {seen_src} ({seen})")
            self.exit_code = KSFT_FAIL
            if fatal:
                raise Bail
        return ok

    def expect_eq(self, line: int, exp_src: str, exp: int, seen_src: str, seen: int) -> bool:
        return self.check(line, exp_src, exp, "==", seen_src, seen)

    def assert_eq(self, line: int, exp_src: str, exp: int, seen_src: str, seen: int) -> None:
        self.check(line, exp_src, exp, "==", seen_src, seen, fatal=True)

    def assert_true(self, line: int, src: str, value: bool) -> None:
        self.check(line, "0", 0, "!=", src, int(bool(value)), fatal=True)

    def skip(self, reason: str) -> None:
        if self._reason is not None:
            data = reason.encode("utf-8", "surrogateescape")[:REASON_SIZE - 1]
            self._reason[:len(data) + 1] = data + b"\0"
        self.exit_code = KSFT_SKIP
        err(f"#      SKIP      {reason}\n")
        raise Skipped

    def run_teardown(self) -> None:
        while self.teardown:
            self.teardown.pop()()


def die_by_signal(signum: int) -> None:
    """End this process the way the C program would: by the signal, default action.

    The core limit is dropped first: a core dump of a Python interpreter is large and
    slow, and nothing would read it."""
    try:
        import resource

        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    except (ImportError, OSError, ValueError):
        pass
    with contextlib.suppress(OSError, ValueError):
        signal.signal(signum, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signum])
    os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # not reached unless the signal is ignored by force


def _child(test: TestCase, reason: mmap.mmap) -> None:
    code = KSFT_FAIL
    try:
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)  # setpgrp(): the timeout kills the whole group
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        md = Metadata(test.name, reason)
        try:
            try:
                test.fn(md)
            except Skipped:
                pass
            except Bail:
                md.run_teardown()
                die_by_signal(signal.SIGABRT)
            md.run_teardown()
            code = md.exit_code
        finally:
            md.teardown.clear()
    except BaseException:  # noqa: BLE001 — a bug here must not leak into the parent's loop
        import traceback

        err(traceback.format_exc())
        code = KSFT_FAIL
    finally:
        os._exit(code)


# ---------------------------------------------------------------------------------------
# The parent side.


def _timeout_scale() -> float:
    try:
        scale = float(os.environ.get(TIMEOUT_SCALE_ENV, "1"))
    except ValueError:
        return 1.0
    return scale if scale > 0 else 1.0


def _wait(pid: int, timeout: float) -> tuple[bool, int]:
    """Wait for the child up to `timeout` seconds; on expiry SIGKILL its process group.
    Returns (timed_out, wait status)."""
    timed_out = False
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = -1
    if pidfd >= 0:
        try:
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            timed_out = not poller.poll(max(0, int(timeout * 1000)))
        finally:
            os.close(pidfd)
    else:  # no pidfd (very old kernel): poll waitpid instead
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return False, status
            if time.monotonic() >= deadline:
                timed_out = True
                break
            time.sleep(0.01)
    if timed_out:
        with contextlib.suppress(OSError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)  # in case it had not made its group yet
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            return timed_out, status
        except InterruptedError:
            continue


def _outcome(name: str, timed_out: bool, status: int) -> int:
    if timed_out:
        err(f"# {name}: Test terminated by timeout\n")
        return KSFT_FAIL
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code in (KSFT_SKIP, KSFT_XPASS, KSFT_XFAIL, KSFT_PASS):
            return code
        err(f"# {name}: Test failed\n")
        return KSFT_FAIL
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig == signal.SIGABRT:
            err(f"# {name}: Test terminated by assertion\n")
        else:
            err(f"# {name}: Test terminated unexpectedly by signal {sig}\n")
        return KSFT_FAIL
    err(f"# {name}: Test ended in some other way [{status}]\n")
    return KSFT_FAIL


def _passed(code: int) -> bool:
    return code != KSFT_FAIL and code <= KSFT_SKIP


class Counts:
    """ksft_cnt."""

    def __init__(self) -> None:
        self.pass_ = self.fail = self.xfail = self.xpass = self.skip = self.error = 0

    @property
    def run(self) -> int:
        return self.pass_ + self.fail + self.xfail + self.xpass + self.skip


def _result_line(counts: Counts, code: int, name: str, diagnostic: str | None) -> None:
    tap, directive = "ok", ""
    if code == KSFT_PASS:
        counts.pass_ += 1
    elif code == KSFT_XFAIL:
        directive = " # XFAIL "
        counts.xfail += 1
    elif code == KSFT_XPASS:
        directive = " # XPASS "
        counts.xpass += 1
    elif code == KSFT_SKIP:
        directive = " # SKIP "
        counts.skip += 1
    else:
        tap = "not ok"
        counts.fail += 1
    if not directive and diagnostic is not None:
        directive = " #  "
    out(f"{tap} {counts.run} {name}{directive}{diagnostic or ''}")


def _run_test(sel: Selected, counts: Counts) -> bool:
    name = sel.full_name
    msg(f" RUN           {name} ...")
    reason = mmap.mmap(-1, REASON_SIZE)  # anonymous and MAP_SHARED: visible after fork
    try:
        try:
            pid = os.fork()
        except OSError:
            msg("ERROR SPAWNING TEST CHILD")
            code = KSFT_FAIL
        else:
            if pid == 0:
                _child(sel.test, reason)  # never returns
            with contextlib.suppress(OSError):
                os.setpgid(pid, pid)
            timed_out, status = _wait(pid, sel.test.timeout * _timeout_scale())
            code = _outcome(sel.test.name, timed_out, status)
        msg(f"         {'OK' if _passed(code) else 'FAIL':>4}  {name}")
        text = bytes(reason[:]).split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    finally:
        reason.close()
    if text:
        diagnostic: str | None = text
    elif code in (KSFT_PASS, KSFT_FAIL):
        diagnostic = None
    else:
        diagnostic = "unknown"
    _result_line(counts, code, name, diagnostic)
    return _passed(code)


def run(prog: str, args: list[str], fixtures: list[Fixture]) -> int:
    """test_harness_run(): the process exit code."""
    rc = argv_check(prog, args, fixtures)
    if rc != KSFT_PASS:
        return rc
    filters = [(o, a or "") for o, a in getopt(args, FILTER_OPTSTRING) if o != "?"]

    selected: list[Selected] = []
    cases = 0
    for f in fixtures:
        for v in f.variants:
            before = len(selected)
            selected += [s for s in (Selected(f, v, t) for t in f.tests)
                         if test_enabled(filters, s)]
            cases += len(selected) != before

    if "KSFT_TAP_LEVEL" not in os.environ:
        out("TAP version 13")
    out(f"1..{len(selected)}")
    msg(f"Starting {len(selected)} tests from {cases} test cases.")

    counts = Counts()
    passed = 0
    for sel in selected:
        passed += _run_test(sel, counts)
    ok = passed == len(selected)
    msg(f"{'PASSED' if ok else 'FAILED'}: {passed} / {len(selected)} tests passed.")
    if counts.run != len(selected):
        msg(f"Planned tests != run tests ({len(selected)} != {counts.run})")
    msg(f"Totals: pass:{counts.pass_} fail:{counts.fail} xfail:{counts.xfail} "
        f"xpass:{counts.xpass} skip:{counts.skip} error:{counts.error}")
    return KSFT_PASS if ok else KSFT_FAIL


def main(fixtures: list[Fixture], argv: list[str] | None = None) -> int:
    """A C program's main(): default signal dispositions, then the harness."""
    prog = sys.argv[0] if sys.argv and sys.argv[0] else "test_sgx"
    args = sys.argv[1:] if argv is None else list(argv)
    # Python ignores SIGPIPE and turns SIGINT into an exception; a C program dies of both.
    for sig in (signal.SIGPIPE, signal.SIGINT):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    try:
        return run(prog, args, fixtures)
    except OSError as e:
        if e.errno == errno.EPIPE:
            die_by_signal(signal.SIGPIPE)
        raise
