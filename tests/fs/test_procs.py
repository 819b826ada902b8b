"""Processes in cgroups through a real mount: moves, fork inheritance, exits, kill, freeze."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

from .util import bash, pids, read, sh, sleeper, wait_for, write

THREADED = """
import sys, threading, time
ev = threading.Event()
t = threading.Thread(target=ev.wait, daemon=True)
t.start()
print(t.native_id, flush=True)
time.sleep(60)
"""


def populated(cg) -> bool:
    return read(cg / "cgroup.events").startswith("populated 1")


def state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_echo_0_moves_the_writer_and_its_later_children(cg):
    r = sh(f"echo 0 > {cg}/cgroup.procs && echo $$ && cat {cg}/cgroup.procs")
    assert r.ok, r
    shell, *listed = r.out.split()
    assert shell in listed  # the shell, and the cat it forked afterwards
    assert len(listed) == 2
    wait_for(lambda: not populated(cg), what="shell and cat to exit")
    assert read(cg / "cgroup.procs") == ""


def test_echo_pid_moves_a_whole_process_and_a_tid_its_group(cg, root):
    p = subprocess.Popen([sys.executable, "-c", THREADED], stdout=subprocess.PIPE, text=True)
    try:
        tid = int(p.stdout.readline())
        assert tid != p.pid
        assert write(cg / "cgroup.procs", str(tid)) == 0
        assert pids(cg) == [p.pid]
        assert sorted(int(t) for t in read(cg / "cgroup.threads").split()) == sorted(
            int(t) for t in os.listdir(f"/proc/{p.pid}/task"))
        assert str(p.pid) not in read(root / "cgroup.procs").split()
        # a thread may be "moved" where its process already is, nowhere else
        assert write(cg / "cgroup.threads", str(tid)) == 0
        os.mkdir(cg / "other")
        assert write(cg / "other" / "cgroup.threads", str(tid)) == errno.EOPNOTSUPP
        # moving again moves it out of the old cgroup; same cgroup again is fine
        assert write(cg / "other" / "cgroup.procs", str(p.pid)) == 0
        assert write(cg / "other" / "cgroup.procs", str(p.pid)) == 0
        assert pids(cg) == [] and pids(cg / "other") == [p.pid]
        assert read(cg / "cgroup.events") == "populated 1\nfrozen 0\n"  # via the child
        assert write(root / "cgroup.procs", str(p.pid)) == 0
        assert str(p.pid) in read(root / "cgroup.procs").split()
        assert not populated(cg)
    finally:
        p.kill()
        p.wait()


def _flags(pid: str) -> int:
    try:
        return int(read(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[6])
    except FileNotFoundError:  # exited meanwhile
        return 0


def test_kernel_threads_cannot_be_moved(cg):
    assert write(cg / "cgroup.procs", "2") == errno.EINVAL  # kthreadd
    per_cpu = [p for p in os.listdir("/proc") if p.isdigit() and _flags(p) & 0x04000000]
    if per_cpu:
        assert write(cg / "cgroup.procs", per_cpu[0]) == errno.EINVAL
    assert pids(cg) == []


def test_children_inherit_the_cgroup_even_when_orphaned(cg):
    """Fork semantics: a child forked after the move is in the cgroup, and stays there
    after its parent exits and it is reparented."""
    r = sh(f"echo 0 > {cg}/cgroup.procs; sleep 30 >/dev/null 2>&1 & "
           "sh -c 'sleep 30 >/dev/null 2>&1 & echo $!'; exit 0")
    assert r.ok, r
    grandchild = int(r.out)
    try:
        listed = wait_for(lambda: pids(cg) if len(pids(cg)) == 2 else None,
                          what="the two sleeps alone")
        assert grandchild in listed
        assert populated(cg)
    finally:
        write(cg / "cgroup.kill", "1")
    wait_for(lambda: not populated(cg))


def test_existing_children_stay_where_they_were(cg, root):
    r = subprocess.Popen(["sh", "-c", "sleep 30 & echo $!; exec sleep 30"],
                         stdout=subprocess.PIPE, text=True)
    try:
        child = int(r.stdout.readline())
        assert write(cg / "cgroup.procs", str(r.pid)) == 0
        assert pids(cg) == [r.pid]
        assert child in [int(p) for p in read(root / "cgroup.procs").split()]
    finally:
        r.kill()
        r.wait()
        os.kill(child, signal.SIGKILL)


def test_exits_are_noticed_at_once_and_zombies_are_not_members(cg):
    p = sleeper()
    assert write(cg / "cgroup.procs", str(p.pid)) == 0
    assert populated(cg)
    os.kill(p.pid, signal.SIGKILL)  # not reaped: a zombie until p.wait()
    wait_for(lambda: state(p.pid) == "Z", what="zombie")
    assert read(cg / "cgroup.procs") == ""
    assert read(cg / "cgroup.events") == "populated 0\nfrozen 0\n"
    # writing a zombie's pid succeeds and moves nothing (the kernel skips exiting tasks)
    assert write(cg / "cgroup.procs", str(p.pid)) == 0
    assert read(cg / "cgroup.procs") == ""
    p.wait()
    assert write(cg / "cgroup.procs", str(p.pid)) == errno.ESRCH


def test_cgroup_kill_kills_the_subtree(cg):
    os.mkdir(cg / "a")
    procs = [sleeper(), sleeper()]
    write(cg / "cgroup.procs", str(procs[0].pid))
    write(cg / "a" / "cgroup.procs", str(procs[1].pid))
    outsider = sleeper()
    try:
        r = bash("echo 1 > cgroup.kill", cwd=cg)
        assert r.ok, r
        for p in procs:
            assert p.wait(5) == -signal.SIGKILL
        wait_for(lambda: not populated(cg))
        assert outsider.poll() is None
        os.rmdir(cg / "a")
    finally:
        outsider.kill()
        outsider.wait()


def test_freeze_reaches_the_subtree_and_thaws(cg):
    """The frozen state is reported once it is reached (at once with --membership events,
    asynchronously like the kernel's with cgroup); that the processes really stop is in
    test_membership."""
    os.mkdir(cg / "a")
    p = sleeper()
    try:
        write(cg / "a" / "cgroup.procs", str(p.pid))
        assert bash("echo 1 > cgroup.freeze", cwd=cg).ok
        assert read(cg / "cgroup.freeze") == "1\n"
        assert read(cg / "a" / "cgroup.freeze") == "0\n"
        wait_for(lambda: read(cg / "a" / "cgroup.events") == "populated 1\nfrozen 1\n",
                 what="frozen")
        assert bash("echo 0 > cgroup.freeze", cwd=cg).ok
        wait_for(lambda: read(cg / "a" / "cgroup.events") == "populated 1\nfrozen 0\n",
                 what="thawed")
    finally:
        p.kill()
        p.wait()


def test_many_short_lived_children(cg):
    """A busy fork/exit workload leaves nothing behind."""
    r = sh(f"echo 0 > {cg}/cgroup.procs; for i in $(seq 40); do true & done; wait")
    assert r.ok, r
    wait_for(lambda: read(cg / "cgroup.procs") == "", what="all gone")
    time.sleep(0.05)
    assert read(cg / "cgroup.events") == "populated 0\nfrozen 0\n"
