"""The cgroup v1 layout (`epcfs mount --cgroup-version 1`): a read-only directory holding
two hierarchies, misc and memory, each with v1's core files; real shell commands and the
errno (and bash's message) they get."""

from __future__ import annotations

import errno
import os
import shlex
import stat
import subprocess
import sys

import pytest

from .util import bash, message, read, sh, wait_for

UNLIMITED = "9223372036854771712\n"
"""PAGE_COUNTER_MAX pages in bytes: how v1 shows an unlimited memory limit."""

OK = 0


@pytest.fixture
def v1(mount_epcfs, tmp_path):
    daemon = mount_epcfs("--cgroup-version", "1", "--capacity", "16M", "--time-scale", "0",
                         "--enclave-socket", str(tmp_path / "sgx.sock"))
    return daemon.path


def listing(path) -> set[str]:
    return set(os.listdir(path))


CORE = {"cgroup.procs", "cgroup.clone_children", "tasks", "notify_on_release"}
ROOT_CORE = CORE | {"cgroup.sane_behavior", "release_agent"}


def test_layout(v1):
    assert sorted(os.listdir(v1)) == ["memory", "misc"]
    assert stat.S_IMODE(os.stat(v1).st_mode) == 0o755
    assert listing(v1 / "misc") == ROOT_CORE | {"misc.capacity", "misc.current", "misc.peak"}
    assert listing(v1 / "memory") == ROOT_CORE | {
        "memory.usage_in_bytes", "memory.limit_in_bytes", "memory.memsw.usage_in_bytes",
        "memory.memsw.limit_in_bytes"}
    assert sh("mkdir misc/a misc/a/b memory/a", cwd=v1).ok
    assert listing(v1 / "misc/a/b") == CORE | {"misc.max", "misc.current", "misc.peak",
                                              "misc.events", "misc.events.local"}
    assert listing(v1 / "memory/a") == CORE | {
        "memory.usage_in_bytes", "memory.max_usage_in_bytes", "memory.limit_in_bytes",
        "memory.failcnt", "memory.memsw.usage_in_bytes", "memory.memsw.limit_in_bytes",
        "memory.memsw.max_usage_in_bytes", "memory.memsw.failcnt"}
    assert "cgroup.subtree_control" not in listing(v1 / "misc/a")
    assert read(v1 / "misc/misc.capacity") == "sgx_epc 16777216\n"
    assert read(v1 / "misc/a/misc.max") == "sgx_epc max\n"
    assert read(v1 / "memory/a/memory.limit_in_bytes") == UNLIMITED
    assert read(v1 / "memory/a/memory.usage_in_bytes") == "0\n"
    assert read(v1 / "misc/cgroup.sane_behavior") == "0\n"
    assert sh("rmdir misc/a/b misc/a memory/a", cwd=v1).ok
    assert sorted(os.listdir(v1 / "misc")) == sorted(ROOT_CORE | {"misc.capacity",
                                                                 "misc.current", "misc.peak"})


@pytest.mark.parametrize(("command", "err"), [
    ("mkdir x", errno.EROFS),
    ("touch x", errno.EROFS),
    ("rmdir misc", errno.EROFS),
    ("mv misc x", errno.EROFS),
    ("rm -f misc/tasks", errno.EPERM),
])
def test_top_directory_is_read_only(v1, command, err):
    """/sys/fs/cgroup is the tmpfs systemd remounts read-only: EROFS, as that would say."""
    result = bash(command, cwd=v1)
    assert result.rc != 0
    assert message(err) in result.err, result.err
    assert sorted(os.listdir(v1)) == ["memory", "misc"]


def _echo(path, text: str, err: int) -> None:
    command = f"echo {shlex.quote(text)} > {shlex.quote(str(path))}"
    result = bash(command)
    assert result.rc == (1 if err else 0), result
    if err:
        assert f"write error: {message(err)}" in result.err, result.err
        assert sh(command).rc == 1


MEMORY_CASES = [
    # (file, text, errno, limit_in_bytes after, memsw.limit_in_bytes after)
    ("memory.limit_in_bytes", "8M", OK, "8388608\n", UNLIMITED),
    ("memory.limit_in_bytes", "4097", OK, "4096\n", UNLIMITED),
    ("memory.limit_in_bytes", "0x2000", OK, "8192\n", UNLIMITED),
    ("memory.limit_in_bytes", "-1", OK, UNLIMITED, UNLIMITED),
    ("memory.limit_in_bytes", "max", errno.EINVAL, UNLIMITED, UNLIMITED),
    ("memory.limit_in_bytes", "-2", errno.EINVAL, UNLIMITED, UNLIMITED),
    ("memory.limit_in_bytes", "1KB", errno.EINVAL, UNLIMITED, UNLIMITED),
    # below an unlimited limit_in_bytes: EINVAL (set the memory limit first)
    ("memory.memsw.limit_in_bytes", "1G", errno.EINVAL, UNLIMITED, UNLIMITED),
    ("memory.memsw.limit_in_bytes", "-1", OK, UNLIMITED, UNLIMITED),
    ("memory.memsw.limit_in_bytes", "lots", errno.EINVAL, UNLIMITED, UNLIMITED),
]


@pytest.mark.parametrize("case", MEMORY_CASES,
                         ids=lambda c: f"{c[0]}:{c[1]}:{errno.errorcode.get(c[2], 'OK')}")
def test_memory_limit_writes(v1, case):
    name, text, err, limit, memsw = case
    cg = v1 / "memory/t"
    cg.mkdir()
    _echo(cg / name, text, err)
    assert read(cg / "memory.limit_in_bytes") == limit
    assert read(cg / "memory.memsw.limit_in_bytes") == memsw


def test_memsw_and_limit_must_stay_ordered(v1):
    """memsw.limit_in_bytes may not go below limit_in_bytes, nor the limit above it:
    EINVAL either way, and nothing changes. The selftest's order (limit, then memsw to the
    same value) works."""
    cg = v1 / "memory/t"
    cg.mkdir()
    _echo(cg / "memory.limit_in_bytes", "16M", OK)
    _echo(cg / "memory.memsw.limit_in_bytes", "8M", errno.EINVAL)
    _echo(cg / "memory.memsw.limit_in_bytes", "16M", OK)
    _echo(cg / "memory.limit_in_bytes", "32M", errno.EINVAL)
    _echo(cg / "memory.limit_in_bytes", "-1", errno.EINVAL)
    assert read(cg / "memory.limit_in_bytes") == "16777216\n"
    assert read(cg / "memory.memsw.limit_in_bytes") == "16777216\n"
    _echo(cg / "memory.limit_in_bytes", "4M", OK)
    _echo(cg / "memory.memsw.limit_in_bytes", "-1", OK)
    _echo(cg / "memory.limit_in_bytes", "-1", OK)
    assert read(cg / "memory.limit_in_bytes") == UNLIMITED


def test_root_memory_limit_is_einval(v1):
    _echo(v1 / "memory/memory.limit_in_bytes", "8M", errno.EINVAL)
    assert read(v1 / "memory/memory.limit_in_bytes") == UNLIMITED


def _holder(v1, cg, nbytes: int) -> subprocess.Popen:
    """A process that joins `cg` (memory hierarchy) through `tasks` and declares `nbytes`
    of memory through the enclave socket, then waits for stdin to close."""
    code = ("import sys; from epcfs.client import Enclave; e = Enclave(sys.argv[1]); "
            "e.declare(int(sys.argv[2])); print('held', flush=True); sys.stdin.read()")
    p = subprocess.Popen(
        ["sh", "-c", f'echo $$ > {shlex.quote(str(cg))}/tasks && exec "$@"', "holder",
         sys.executable, "-c", code, str(v1.parent / "sgx.sock"), str(nbytes)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return p


def test_limit_below_usage_is_ebusy_and_charges_follow_the_memory_hierarchy(v1):
    """Nothing epcfs charges can be reclaimed: a limit below usage is EBUSY (v1 does not
    OOM-kill on a limit write). The charge lands in the process's memory-hierarchy cgroup,
    whatever its misc cgroup is."""
    cg = v1 / "memory/t"
    cg.mkdir()
    (v1 / "misc/other").mkdir()
    p = _holder(v1, cg, 1 << 20)
    try:
        assert p.stdout.readline() == "held\n"
        assert read(cg / "memory.usage_in_bytes") == f"{1 << 20}\n"
        assert read(cg / "memory.memsw.usage_in_bytes") == f"{1 << 20}\n"
        assert read(v1 / "memory/memory.usage_in_bytes") == f"{1 << 20}\n"
        assert read(cg / "tasks").split() == [str(p.pid)]
        assert str(p.pid) in read(v1 / "misc/cgroup.procs").split()
        _echo(cg / "memory.limit_in_bytes", "512K", errno.EBUSY)
        assert read(cg / "memory.limit_in_bytes") == UNLIMITED
        _echo(cg / "memory.limit_in_bytes", "2M", OK)
        assert p.poll() is None
    finally:
        p.stdin.close()
        p.wait(10)
    wait_for(lambda: read(cg / "memory.usage_in_bytes") == "0\n", what="uncharge on exit")
    assert read(cg / "memory.max_usage_in_bytes") == f"{1 << 20}\n"
    _echo(cg / "memory.max_usage_in_bytes", "0", OK)
    assert read(cg / "memory.max_usage_in_bytes") == "0\n"


def test_failcnt_counts_refused_charges_and_resets(v1):
    cg = v1 / "memory/t"
    cg.mkdir()
    _echo(cg / "memory.limit_in_bytes", "1M", OK)
    p = _holder(v1, cg, 2 << 20)  # over the limit: refused, and the OOM killer takes it
    p.stdin.close()
    assert p.wait(10) == -9
    assert read(cg / "memory.failcnt") == "1\n"
    _echo(cg / "memory.failcnt", "0", OK)
    assert read(cg / "memory.failcnt") == "0\n"


def test_equal_memsw_limit_refuses_first_and_counts_there(v1):
    """With memsw = limit (as the bash selftests set them) try_charge_memcg meets the
    memory+swap counter first: memsw.failcnt counts the refusal, memory.failcnt not."""
    cg = v1 / "memory/t"
    cg.mkdir()
    _echo(cg / "memory.limit_in_bytes", "1M", OK)
    _echo(cg / "memory.memsw.limit_in_bytes", "1M", OK)
    p = _holder(v1, cg, 2 << 20)
    p.stdin.close()
    assert p.wait(10) == -9
    assert (read(cg / "memory.memsw.failcnt"), read(cg / "memory.failcnt")) == ("1\n", "0\n")
    _echo(cg / "memory.memsw.failcnt", "0", OK)
    assert read(cg / "memory.memsw.failcnt") == "0\n"
    assert read(cg / "memory.memsw.max_usage_in_bytes") == read(cg / "memory.max_usage_in_bytes")


def test_tasks_and_procs_move_between_cgroups_of_one_hierarchy(v1):
    """No no-internal-process rule in v1: a process may sit in a cgroup that has children.
    A thread id written to tasks moves its whole thread group (documented)."""
    (v1 / "misc/a/b").mkdir(parents=True)
    p = subprocess.Popen(["sleep", "60"])
    try:
        _echo(v1 / "misc/a/tasks", str(p.pid), OK)
        assert read(v1 / "misc/a/cgroup.procs") == f"{p.pid}\n"
        assert read(v1 / "misc/a/tasks") == f"{p.pid}\n"
        assert str(p.pid) not in read(v1 / "misc/cgroup.procs").split()
        _echo(v1 / "misc/a/b/cgroup.procs", str(p.pid), OK)
        assert read(v1 / "misc/a/cgroup.procs") == ""
        _echo(v1 / "misc/a/b/cgroup.procs", "abc", errno.EINVAL)
        _echo(v1 / "misc/a/b/tasks", "99999999", errno.ESRCH)
        assert bash(f"rmdir {v1}/misc/a/b").rc == 1
        # the memory hierarchy has its own membership: still in its root there
        assert str(p.pid) in read(v1 / "memory/cgroup.procs").split()
    finally:
        p.kill()
        p.wait()
    wait_for(lambda: read(v1 / "misc/a/b/cgroup.procs") == "", what="exit noticed")
    assert sh(f"rmdir {v1}/misc/a/b {v1}/misc/a").ok


def test_v1_flags_and_release_agent(v1):
    a = v1 / "misc/a"
    a.mkdir()
    assert read(a / "notify_on_release") == "0\n"
    assert read(a / "cgroup.clone_children") == "0\n"
    _echo(a / "notify_on_release", "1", OK)
    _echo(a / "cgroup.clone_children", "0x2", OK)
    _echo(a / "notify_on_release", "yes", errno.EINVAL)
    assert read(a / "notify_on_release") == "1\n"
    (a / "b").mkdir()  # inherited at mkdir
    assert read(a / "b/notify_on_release") == "1\n"
    assert read(a / "b/cgroup.clone_children") == "1\n"
    assert read(v1 / "misc/release_agent") == "\n"
    _echo(v1 / "misc/release_agent", "/sbin/agent", OK)
    assert read(v1 / "misc/release_agent") == "/sbin/agent\n"
    assert read(v1 / "memory/release_agent") == "\n"  # one per hierarchy


def test_misc_limits_in_v1(v1):
    a = v1 / "misc/a"
    a.mkdir()
    _echo(a / "misc.max", "sgx_epc 65536", OK)
    assert read(a / "misc.max") == "sgx_epc 65536\n"
    _echo(a / "misc.max", "sgx_epc 1K", errno.EINVAL)
    assert read(a / "misc.current") == "sgx_epc 0\n"
    assert read(a / "misc.events") == "sgx_epc.max 0\n"
