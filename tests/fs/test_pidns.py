"""Pid namespaces: cgroup.procs speaks the writer's and the reader's namespace.

`Proc` is exercised on a fake /proc tree (NSpid lines, ns/pid links) for the mapping
rules, then on real namespaces made with unshare(1), nested too, for the NSpid and
NS_GET_PARENT plumbing and the tracker's write path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from epcfs.host.caller import Caller
from epcfs.host.cgroup_tracker import MirrorTracker
from epcfs.host.events import EventTracker
from epcfs.host.mirror import Mirror
from epcfs.host.pidns import to_caller_ns, to_daemon_ns
from epcfs.host.proc import Proc
from epcfs.model.cgroup import Hierarchy
from epcfs.model.errors import KernelError

# pid -> (NSpid, namespace); the daemon's namespace is "host".
FAKE = {
    1: ((1,), "host"),
    5: ((5,), "host"),
    100: ((100, 1), "A"),      # container A: its init
    101: ((101, 2), "A"),
    200: ((200, 1), "B"),      # container B: same inner pids as A
    201: ((201, 2), "B"),
    300: ((300, 3, 1), "A2"),  # nested in A: A sees it as 3
}
PARENT_NS = {"A": "host", "B": "host", "A2": "A"}


class FakeProc(Proc):
    """A fake /proc whose nsfs parents come from PARENT_NS (no ioctl on plain files)."""

    def pid_ns(self, pid: int, up: int = 0) -> str | None:
        ns = super().pid_ns(pid)
        for _ in range(up):
            ns = ns and f"pid:[{PARENT_NS[ns[5:-1]]}]"
        return ns


@pytest.fixture
def fake_proc(tmp_path: Path) -> FakeProc:
    for pid, (nspid, ns) in FAKE.items():
        d = tmp_path / str(pid)
        (d / "ns").mkdir(parents=True)
        (d / "ns" / "pid").symlink_to(f"pid:[{ns}]")
        (d / "task" / str(pid)).mkdir(parents=True)
        (d / "status").write_text(
            f"Name:\tx\nState:\tS (sleeping)\nTgid:\t{pid}\nPid:\t{pid}\nPPid:\t1\n"
            f"NSpid:\t{' '.join(map(str, nspid))}\nThreads:\t1\n")
    return FakeProc(str(tmp_path))


def test_status_reads_nspid(fake_proc):
    st = fake_proc.status(300)
    assert (st.nspid, st.level) == ((300, 3, 1), 2)
    assert fake_proc.status(5).level == 0


def test_host_callers_see_and_write_daemon_pids(fake_proc):
    assert to_daemon_ns(fake_proc, 201, 5) == 201
    assert to_caller_ns(fake_proc, [1, 5, 100, 201], 5) == [1, 5, 100, 201]
    assert to_daemon_ns(fake_proc, 201, 0) == 201  # caller outside our namespace: as is


def test_container_pids_map_to_their_own_namespace_only(fake_proc):
    # the same inner pid 2 is 101 for A and 201 for B
    assert to_daemon_ns(fake_proc, 2, 100) == 101
    assert to_daemon_ns(fake_proc, 2, 200) == 201
    assert to_daemon_ns(fake_proc, 1, 201) == 200
    assert to_daemon_ns(fake_proc, 5, 100) is None  # a host pid means nothing in A
    assert to_daemon_ns(fake_proc, 3, 100) == 300   # nested: A names it 3
    assert to_daemon_ns(fake_proc, 3, 200) is None


def test_readers_see_only_their_namespace(fake_proc):
    everyone = sorted(FAKE)
    assert to_caller_ns(fake_proc, everyone, 101) == [1, 2, 3]
    assert to_caller_ns(fake_proc, everyone, 201) == [1, 2]
    assert to_caller_ns(fake_proc, everyone, 300) == [1]


# -- real namespaces --------------------------------------------------------------------

needs_unshare = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1)")


def _spawn_in_new_pidns(depth: int) -> tuple[subprocess.Popen, int]:
    """A `sleep` `depth` pid namespaces down; returns the unshare process and the sleep's
    pid here (its NSpid ends in 1 at each level: it is the init of the innermost one)."""
    cmd: list[str] = []
    for _ in range(depth):
        cmd += ["unshare", "--pid", "--fork", "--mount-proc"]
    p = subprocess.Popen([*cmd, "sleep", "60"], start_new_session=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid in Proc().pids():
            st = Proc().status(pid)
            if st is not None and len(st.nspid) == depth + 1 and _descends(pid, p.pid):
                try:
                    if Path(f"/proc/{pid}/comm").read_text().strip() == "sleep":
                        return p, pid
                except OSError:
                    pass
        time.sleep(0.02)
    p.kill()
    raise RuntimeError("no sleep in a new pid namespace")


def _descends(pid: int, ancestor: int) -> bool:
    while pid > 1:
        if pid == ancestor:
            return True
        st = Proc().status(pid)
        if st is None:
            return False
        pid = st.ppid
    return False


def _kill(p: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, 9)
    p.wait()


@needs_unshare
def test_real_nested_namespaces_map_both_ways():
    outer, a = _spawn_in_new_pidns(1)
    try:
        inner, b = _spawn_in_new_pidns(2)
        try:
            proc = Proc()
            assert proc.status(a).nspid == (a, 1)
            assert to_daemon_ns(proc, 1, a) == a
            assert to_daemon_ns(proc, 1, b) == b
            assert to_caller_ns(proc, [os.getpid(), a, b], a) == [1]
            assert to_caller_ns(proc, [os.getpid(), a, b], b) == [1]
            # b's outer namespace (the middle one) sees b as its NSpid[1]
            middle_init = proc.status(b).nspid[1]
            assert middle_init > 1
            assert proc.pid_ns(b, 1) != proc.pid_ns(a)  # siblings, not the same
            assert proc.pid_ns(b, 2) == proc.pid_ns(os.getpid())
        finally:
            _kill(inner)
    finally:
        _kill(outer)


@needs_unshare
@pytest.mark.parametrize("mode", ["cgroup", "events"])
def test_tracker_moves_the_writers_pid_and_lists_in_the_readers(mode):
    h = Hierarchy({"sgx_epc": 1 << 20})
    t = MirrorTracker(h, Mirror()) if mode == "cgroup" else EventTracker(h)
    outer, a = _spawn_in_new_pidns(1)
    try:
        cg = t.mkdir(h.root, "c")
        inside = Caller(a, 0, 0)  # as if `a` wrote "1" (itself, in its namespace)
        t.attach(1, cg, inside)
        assert t.members(cg) == [a]
        assert to_caller_ns(t.proc, t.members(cg), a) == [1]
        with pytest.raises(KernelError) as e:
            t.attach(os.getpid(), cg, inside)  # the host's pid means nothing to it
        assert e.value.errno == errno.ESRCH
        assert os.getpid() not in to_caller_ns(t.proc, t.members(h.root), a)
    finally:
        _kill(outer)
        t.close()
