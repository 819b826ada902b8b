"""Every writable interface file, valid and invalid input, through `echo … > file`.

Each case runs the write twice: with sh (dash: exit status; dash reports every failed
write as "I/O error") and with bash (which prints the errno's message, e.g. "Invalid
argument"). Afterwards the file must read as expected: the new value for a valid write,
exactly what it read before for a refused one. Expectations are the kernel's (checked on
a real 6.18 kernel where it has the file; misc and memory parsing from their sources).
"""

from __future__ import annotations

import errno
import shlex

import pytest

from .util import bash, message, read, sh, write

OK = 0
EINVAL, ERANGE, ESRCH, E2BIG = errno.EINVAL, errno.ERANGE, errno.ESRCH, errno.E2BIG
EOPNOTSUPP = errno.EOPNOTSUPP

# (file, written text, errno or OK, contents afterwards; None: as before the write)
CASES = [
    # cgroup.max.depth / cgroup.max.descendants: `max` or int (base 0), negative ERANGE
    ("cgroup.max.depth", "5", OK, "5\n"),
    ("cgroup.max.depth", "max", OK, "max\n"),
    ("cgroup.max.depth", "  7  ", OK, "7\n"),
    ("cgroup.max.depth", "0x10", OK, "16\n"),
    ("cgroup.max.depth", "010", OK, "8\n"),
    ("cgroup.max.depth", "-0", OK, "0\n"),
    ("cgroup.max.depth", "+3", OK, "3\n"),
    ("cgroup.max.depth", "-1", ERANGE, None),
    ("cgroup.max.depth", "2147483648", ERANGE, None),
    ("cgroup.max.depth", "abc", EINVAL, None),
    ("cgroup.max.depth", "", EINVAL, None),
    ("cgroup.max.depth", "5 6", EINVAL, None),
    ("cgroup.max.depth", "max5", EINVAL, None),
    ("cgroup.max.depth", "08", EINVAL, None),
    ("cgroup.max.descendants", "3", OK, "3\n"),
    ("cgroup.max.descendants", "max", OK, "max\n"),
    ("cgroup.max.descendants", "99999999999999999999", ERANGE, None),
    ("cgroup.max.descendants", "-5", ERANGE, None),
    ("cgroup.max.descendants", "1k", EINVAL, None),
    # cgroup.freeze: 0 or 1, other ints ERANGE
    ("cgroup.freeze", "1", OK, "1\n"),
    ("cgroup.freeze", "0x1", OK, "1\n"),
    ("cgroup.freeze", "0", OK, "0\n"),
    ("cgroup.freeze", "2", ERANGE, None),
    ("cgroup.freeze", "-1", ERANGE, None),
    ("cgroup.freeze", "", EINVAL, None),
    ("cgroup.freeze", "yes", EINVAL, None),
    # cgroup.kill: only 1
    ("cgroup.kill", "1", OK, None),
    ("cgroup.kill", "0", ERANGE, None),
    ("cgroup.kill", "2", ERANGE, None),
    ("cgroup.kill", "", EINVAL, None),
    ("cgroup.kill", "x", EINVAL, None),
    # cgroup.type: only `threaded` parses; threaded mode is not modelled (EOPNOTSUPP)
    ("cgroup.type", "domain", EINVAL, "domain\n"),
    ("cgroup.type", "junk", EINVAL, "domain\n"),
    ("cgroup.type", "threaded", EOPNOTSUPP, "domain\n"),
    # cgroup.subtree_control: +/- tokens, unknown names EINVAL
    ("cgroup.subtree_control", "+misc", OK, "misc\n"),
    ("cgroup.subtree_control", "+misc +memory", OK, "memory misc\n"),
    ("cgroup.subtree_control", "+memory -memory", OK, ""),
    ("cgroup.subtree_control", "-misc", OK, ""),
    ("cgroup.subtree_control", "", OK, ""),
    ("cgroup.subtree_control", "  +misc   ", OK, "misc\n"),
    ("cgroup.subtree_control", "+nosuch", EINVAL, ""),
    ("cgroup.subtree_control", "+cpu", EINVAL, ""),
    ("cgroup.subtree_control", "misc", EINVAL, ""),
    ("cgroup.subtree_control", "+misc\t+memory", EINVAL, ""),
    # cgroup.procs / cgroup.threads: int pid, 0 = the writer
    ("cgroup.procs", "abc", EINVAL, ""),
    ("cgroup.procs", "-1", EINVAL, ""),
    ("cgroup.procs", "", EINVAL, ""),
    ("cgroup.procs", "1 2", EINVAL, ""),
    ("cgroup.procs", "2147483648", EINVAL, ""),
    ("cgroup.procs", "99999999", ESRCH, ""),
    ("cgroup.threads", "abc", EINVAL, ""),
    ("cgroup.threads", "99999999", ESRCH, ""),
    ("cgroup.threads", "0", EOPNOTSUPP, ""),  # a thread cannot leave its domain cgroup
    # misc.max: `<res> <max|u64>`, base 0, no suffixes, stored unrounded
    ("misc.max", "sgx_epc 1000", OK, "sgx_epc 1000\n"),
    ("misc.max", "sgx_epc 0x1000", OK, "sgx_epc 4096\n"),
    ("misc.max", "sgx_epc 010", OK, "sgx_epc 8\n"),
    ("misc.max", "sgx_epc +5", OK, "sgx_epc 5\n"),
    ("misc.max", "sgx_epc max", OK, "sgx_epc max\n"),
    ("misc.max", "sgx_epc 18446744073709551615", OK, "sgx_epc max\n"),
    ("misc.max", "sgx_epc 999999999999", OK, "sgx_epc 999999999999\n"),
    ("misc.max", "sgx_epc 18446744073709551616", ERANGE, None),
    ("misc.max", "sgx_epc -1", EINVAL, None),
    ("misc.max", "sgx_epc 1K", EINVAL, None),
    ("misc.max", "sgx_epc", EINVAL, None),
    ("misc.max", "sgx_epc ", EINVAL, None),
    ("misc.max", "sgx_epc  5", EINVAL, None),
    ("misc.max", "sgx_epc 5 sev 6", EINVAL, None),
    ("misc.max", "nosuch 5", EINVAL, None),
    ("misc.max", "sev 5", EINVAL, None),  # a resource without capacity
    ("misc.max", "", EINVAL, None),
    # memory.max / memory.swap.max: memparse (K/M/G…, base 0), rounded down to pages
    ("memory.max", "1M", OK, "1048576\n"),
    ("memory.max", "4097", OK, "4096\n"),
    ("memory.max", "0x2000", OK, "8192\n"),
    ("memory.max", "1g", OK, "1073741824\n"),
    ("memory.max", "max", OK, "max\n"),
    ("memory.max", "9223372036854775807", OK, "max\n"),
    # simple_strtoull wraps modulo 2^64: no ERANGE
    ("memory.max", "99999999999999999999999", OK, "200376420520685568\n"),
    ("memory.max", "1KB", EINVAL, None),
    ("memory.max", "-1", EINVAL, None),
    ("memory.max", "+5", EINVAL, None),
    ("memory.max", "0x", EINVAL, None),
    ("memory.max", "1x", EINVAL, None),
    ("memory.max", "", OK, "0\n"),  # memparse("") is 0: the kernel accepts it
    ("memory.swap.max", "1G", OK, "1073741824\n"),
    ("memory.swap.max", "max", OK, "max\n"),
    ("memory.swap.max", "lots", EINVAL, None),
    # memory.peak: any write resets this fd's peak (6.12+)
    ("memory.peak", "reset", OK, "0\n"),
    # read-only files: root may open them for writing, the write is EINVAL
    ("cgroup.controllers", "+misc", EINVAL, None),
    ("cgroup.events", "populated 1", EINVAL, None),
    ("cgroup.stat", "x", EINVAL, None),
    ("misc.current", "sgx_epc 0", EINVAL, None),
    ("misc.peak", "0", EINVAL, None),
    ("misc.events", "0", EINVAL, None),
    ("misc.events.local", "0", EINVAL, None),
    ("memory.current", "0", EINVAL, None),
    ("memory.events", "0", EINVAL, None),
    ("memory.events.local", "0", EINVAL, None),
    # over a page: the shells split it into page-sized writes, each parsed whole
    ("cgroup.max.depth", "x" * 4096, EINVAL, None),
    ("cgroup.controllers", "x" * 5000, EINVAL, None),
]


def _id(case) -> str:
    name, text, err, _ = case
    return f"{name}:{text[:24]!r}:{errno.errorcode.get(err, 'OK')}"


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_echo(cg, case):
    name, text, err, after = case
    path = cg / name
    before = read(path) if name != "cgroup.kill" else None
    command = f"echo {shlex.quote(text)} > {name}"

    dash = sh(command, cwd=cg)
    assert dash.rc == (1 if err else 0), dash
    if err:
        assert "I/O error" in dash.err or message(err) in dash.err, dash.err

    result = bash(command, cwd=cg)
    assert result.rc == (1 if err else 0), result
    if err:
        assert f"write error: {message(err)}" in result.err, result.err
    else:
        assert result.err == ""

    if name != "cgroup.kill":
        assert read(path) == (before if after is None else after)


@pytest.mark.parametrize("name", ["cgroup.max.depth", "cgroup.controllers", "misc.max"])
def test_one_write_over_a_page_is_e2big(cg, name):
    """kernfs refuses a single write() longer than a page before parsing it."""
    before = read(cg / name)
    assert write(cg / name, "1" * 4097) == E2BIG
    assert write(cg / name, "sgx_epc " + "1" * 4088) in (EINVAL, ERANGE)  # one full page
    assert read(cg / name) == before


ROOT_CASES = [
    ("misc.capacity", "sgx_epc 1", EINVAL, None),
    ("misc.current", "sgx_epc 0", EINVAL, None),
    ("cgroup.max.depth", "3", OK, "3\n"),
    ("cgroup.max.depth", "max", OK, "max\n"),
    ("cgroup.procs", "abc", EINVAL, None),
]


@pytest.mark.parametrize("case", ROOT_CASES, ids=_id)
def test_echo_root(mount_epcfs, case):
    """The root's own files (a private mount: these change root state)."""
    root = mount_epcfs().path
    name, text, err, after = case
    before = read(root / name)
    result = bash(f"echo {shlex.quote(text)} > {name}", cwd=root)
    assert result.rc == (1 if err else 0), result
    if err:
        assert f"write error: {message(err)}" in result.err
    if name != "cgroup.procs":  # the root's lists every process on the machine
        assert read(root / name) == (before if after is None else after)


def test_every_writable_file_is_covered(cg):
    """Adding a writable file without adding cases here fails this test."""
    import os
    import stat

    writable = {n for n in os.listdir(cg) if os.stat(cg / n).st_mode & stat.S_IWUSR}
    covered = {case[0] for case in CASES}
    assert writable <= covered, writable - covered
