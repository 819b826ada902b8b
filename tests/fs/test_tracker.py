"""The trackers in-process, as the enclave server uses them: which cgroup is a peer in?
Every membership backend: the kernel-backed mirror, fork events, and PPid walks (events
without the proc connector)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import pytest

from epcfs.host.caller import Caller
from epcfs.host.cgroup_tracker import MirrorTracker
from epcfs.host.events import EventTracker
from epcfs.host.mirror import Mirror
from epcfs.model.cgroup import Hierarchy
from epcfs.model.errors import KernelError

from .util import wait_for

ME = Caller(os.getpid(), 0, 0)


@pytest.fixture(params=["mirror", "connector", "ppid-walk"])
def tracked(request):
    """(hierarchy, tracker, whether it knows where orphans were forked)"""
    h = Hierarchy({"sgx_epc": 1 << 20})
    if request.param == "mirror":
        t = MirrorTracker(h, Mirror())
    else:
        t = EventTracker(h, use_connector=request.param == "connector")
        if request.param == "connector" and t.forks is None:
            pytest.skip("no proc connector here")
    yield h, t, request.param != "ppid-walk"
    t.close()


def test_cgroup_of_follows_moves_forks_and_exits(tracked):
    h, t, connector = tracked
    a = t.mkdir(h.root, "a")
    p = subprocess.Popen(["sh", "-c", "read x; sleep 30 & echo $!; exec sleep 30"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert t.cgroup_of(p.pid) is h.root
        t.attach(p.pid, a, ME)
        assert t.cgroup_of(p.pid) is a
        p.stdin.write("go\n")
        p.stdin.flush()
        child = int(p.stdout.readline())
        assert t.cgroup_of(child) is a  # forked after the move
        assert t.members(a) == sorted([p.pid, child])
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        wait_for(lambda: t.members(a) == [child])
        assert t.cgroup_of(child) is a  # orphaned, still there
        assert a.populated
        os.kill(child, signal.SIGKILL)
        wait_for(lambda: not t.members(a))
        assert not a.populated and child not in h.procs
    finally:
        p.kill()
        p.wait()


def test_orphans_forked_before_anyone_looked(tracked):
    """Fork events and the kernel see a child whose parent exits before it is looked up."""
    h, t, exact = tracked
    if not exact:
        pytest.skip("the PPid walk cannot know where an orphan was forked")
    a = t.mkdir(h.root, "a")
    p = subprocess.Popen(["sh", "-c", "read x; sleep 30 >/dev/null & echo $!"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    t.attach(p.pid, a, ME)
    p.stdin.write("go\n")
    p.stdin.flush()
    child = int(p.stdout.readline())
    p.wait()
    try:
        assert t.cgroup_of(child) is a
    finally:
        os.kill(child, signal.SIGKILL)


def test_threads_resolve_to_their_process_and_unknown_pids_fail(tracked):
    h, t, _ = tracked
    a = t.mkdir(h.root, "a")
    p = subprocess.Popen([sys.executable, "-c",
                          "import threading,time\n"
                          "t=threading.Thread(target=time.sleep,args=(30,),daemon=True)\n"
                          "t.start(); print(t.native_id, flush=True); time.sleep(30)"],
                         stdout=subprocess.PIPE, text=True)
    try:
        tid = int(p.stdout.readline())
        t.attach(tid, a, ME)
        assert h.procs[p.pid] is a and tid not in h.procs
        assert t.cgroup_of(tid) is a
        assert sorted(t.threads(a)) == sorted(int(x) for x in os.listdir(f"/proc/{p.pid}/task"))
    finally:
        p.kill()
        p.wait()
    with pytest.raises(KernelError) as e:
        t.cgroup_of(99999999)
    assert e.value.errno == errno.ESRCH
    assert t.cgroup_of(1) is h.root


def test_exit_hooks_and_oom_kills(tracked):
    h, t, _ = tracked
    a = t.mkdir(h.root, "a")
    h.write_subtree_control(h.root, "+memory")
    b = t.mkdir(h.root, "b")
    seen = []
    t.exit_hooks.append(seen.append)
    p = subprocess.Popen(["sleep", "30"])
    t.attach(p.pid, b, ME)
    assert h.memory_try_charge(b.memory, 10, p.pid, None)
    h.set_memory_max(b.memory, 5)  # over the limit: the OOM killer picks p
    t.deliver_oom_kills()
    assert p.wait(5) == -signal.SIGKILL
    wait_for(lambda: t.settle() or seen == [p.pid])  # no run() task here: settle()
    assert b.memory.events["oom_kill"] == 1
    assert a.procs == set()


def test_lost_fork_events_are_resynchronised_from_proc_and_logged(caplog):
    """ENOBUFS (the connector's queue overflowed): what /proc still shows is recovered,
    children of live members included, and the log says events were lost."""
    h = Hierarchy({"sgx_epc": 1 << 20})
    t = EventTracker(h)
    if t.forks is None:
        pytest.skip("no proc connector here")
    a = t.mkdir(h.root, "a")
    p = subprocess.Popen(["sh", "-c", "read x; sleep 30 & echo $!; exec sleep 30"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        t.attach(p.pid, a, ME)
        p.stdin.write("go\n")
        p.stdin.flush()
        child = int(p.stdout.readline())
        t.forks.drain()  # the fork events are gone unread
        t.forks.lost = True
        t.settle()
        assert t.members(a) == sorted([p.pid, child])
        assert "fork events lost" in caplog.text
    finally:
        p.kill()
        p.wait()
        t.close()
