"""Exact membership, in both modes (--membership cgroup and events), through a real mount:
processes started the way daemons, shells and container runtimes start them (a double
fork, `sh -c '(sleep 30 &)'`) stay in their cgroup, cgroup.kill and cgroup.freeze reach
them, and their enclaves are charged there."""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .util import errno_of, pids, read, sh, wait_for, write

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (FUSE, cgroups)")

MODES = ("cgroup", "events")
_serial = itertools.count()


def marked(marker: str) -> list[int]:
    """Live (non-zombie) processes started by this test: `marker` is in their argv."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{name}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] in "ZX"
        except OSError:
            continue
        if marker.encode() in argv and not zombie:
            out.append(int(name))
    return sorted(out)


@pytest.fixture
def marker():
    """A unique sleep length (`sleep 600.N`) naming this test's processes; whatever is
    left of them is killed afterwards, by pid."""
    value = f"600.{os.getpid() % 1000}{next(_serial):03d}"
    yield value
    for _ in range(50):
        left = marked(value)
        if not left:
            return
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@pytest.fixture(params=MODES)
def mounted(request, mount_epcfs, tmp_path):
    """(daemon, cgroup `w` under its root, enclave socket) in one membership mode."""
    sock = tmp_path / "sgx.sock"
    daemon = mount_epcfs("--membership", request.param, "--time-scale", "0",
                         "--enclave-socket", str(sock))
    w = daemon.path / "w"
    w.mkdir()
    yield daemon, w, sock
    for cg in (w,):
        if cg.exists():
            for pid in pids(cg):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def double_forks(cg: Path, n: int, marker: str) -> str:
    return (f'echo 0 > {cg}/cgroup.procs; i=0; while [ $i -lt {n} ]; do '
            f'sh -c "(sleep {marker} >/dev/null 2>&1 &)"; i=$((i+1)); done')


def test_the_mode_is_logged_at_start(mounted):
    daemon, w, _ = mounted
    mode = daemon.proc.args[daemon.proc.args.index("--membership") + 1]
    assert f"membership: {mode}" in daemon.log.read_text()


def test_double_forked_children_stay_one_by_one(mounted, marker):
    _, w, _ = mounted
    assert sh(double_forks(w, 40, marker)).ok
    wait_for(lambda: len(marked(marker)) == 40, what="40 sleeps")
    assert pids(w) == marked(marker)
    assert errno_of(os.rmdir, w) == errno.EBUSY  # they keep it populated
    for pid in marked(marker):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: errno_of(os.rmdir, w) == 0, what="rmdir once they are gone")


def test_a_burst_of_orphans_all_stay(mounted, marker):
    _, w, _ = mounted
    r = sh(f'echo 0 > {w}/cgroup.procs; i=0; while [ $i -lt 300 ]; do '
           f'(sleep {marker} >/dev/null 2>&1 &) & i=$((i+1)); done; wait')
    assert r.ok, r
    wait_for(lambda: len(marked(marker)) == 300, what="300 sleeps")
    assert pids(w) == marked(marker)


def test_kill_leaves_no_survivor_while_the_member_keeps_forking(mounted, marker):
    _, w, _ = mounted
    p = subprocess.Popen(["sh", "-c", f'echo 0 > {w}/cgroup.procs; while :; do '
                          f'sh -c "(sleep {marker} &)"; done'])
    try:
        wait_for(lambda: len(marked(marker)) >= 30, what="the member to fork")
        assert write(w / "cgroup.kill", "1") == 0
        assert p.wait(10) == -signal.SIGKILL
        wait_for(lambda: not marked(marker), what="every double-forked child killed")
        time.sleep(0.3)  # anything forked at the last moment would show up by now
        assert marked(marker) == []
        assert read(w / "cgroup.events").startswith("populated 0")
    finally:
        p.kill()
        p.wait()


def _sizes(files: list[Path]) -> list[int]:
    return [f.stat().st_size for f in files]


def test_a_frozen_cgroups_double_forked_children_are_frozen(mounted, marker, tmp_path):
    _, w, _ = mounted
    beats = [tmp_path / f"beat{i}" for i in range(5)]
    loop = tmp_path / "beat.sh"
    loop.write_text('while :; do echo . >> "$2"; sleep 0.02; done\n')
    script = f'echo 0 > {w}/cgroup.procs; ' + "; ".join(
        f"sh -c '(sh {loop} {marker} {b} >/dev/null 2>&1 &)'" for b in beats)
    assert sh(script).ok
    wait_for(lambda: all(b.exists() and b.stat().st_size > 4 for b in beats),
             what="heartbeats")
    assert write(w / "cgroup.freeze", "1") == 0
    wait_for(lambda: "frozen 1" in read(w / "cgroup.events"), what="frozen")
    time.sleep(0.1)
    before = _sizes(beats)
    time.sleep(0.5)
    assert _sizes(beats) == before  # no loop ran while frozen
    assert write(w / "cgroup.freeze", "0") == 0
    wait_for(lambda: all(a > b for a, b in zip(_sizes(beats), before, strict=False)), what="thawed")


def test_a_double_forked_grandchilds_enclave_is_charged_to_its_cgroup(mounted, marker):
    daemon, w, sock = mounted
    load = f"{sys.executable} -m epcfs.cli load --size 1M --hold {marker} --socket {sock}"
    assert sh(f'echo 0 > {w}/cgroup.procs; sh -c "({load} >/dev/null 2>&1 &)"').ok
    wait_for(lambda: int(read(w / "misc.current").split()[1]) > 1 << 20,
             what="the enclave (1M heap and its SECS) charged to w")
    (grandchild,) = marked(marker)
    assert pids(w) == [grandchild]
    os.kill(grandchild, signal.SIGTERM)
    wait_for(lambda: read(w / "misc.current") == "sgx_epc 0\n", what="release")


# -- the mirror's life (cgroup mode) -----------------------------------------------------


def mirrors(*daemons) -> set[str]:
    """The cgroup mirrors of `daemons` below this test's own cgroup (where a daemon it
    starts puts its mirror). Named by pid: other test runs' daemons may come and go in
    the same cgroup meanwhile."""
    from epcfs.host.mirror import own_cgroup_dir

    directory, _ = own_cgroup_dir()
    ns = os.stat("/proc/self/ns/pid").st_ino
    prefixes = tuple(f"epcfs-{ns}-{d.proc.pid}-" for d in daemons)
    return {name for name in os.listdir(directory) if name.startswith(prefixes)}


def test_unmount_removes_the_mirror_and_frees_its_processes(mount_epcfs, marker):
    daemon = mount_epcfs("--membership", "cgroup")
    (new,) = mirrors(daemon)
    (daemon.path / "a").mkdir()
    (daemon.path / "a" / "b").mkdir()
    assert sh(double_forks(daemon.path / "a" / "b", 3, marker)).ok
    assert write(daemon.path / "a" / "cgroup.freeze", "1") == 0
    assert daemon.stop() == 0
    assert not mirrors(daemon)
    left = marked(marker)
    assert len(left) == 3  # still running, thawed, back in the daemon's cgroup
    for pid in left:
        with open(f"/proc/{pid}/cgroup") as f:
            assert new not in f.read()


def test_the_next_start_removes_a_killed_daemons_mirror(mount_epcfs, marker):
    daemon = mount_epcfs("--membership", "cgroup")
    (stale,) = mirrors(daemon)
    (daemon.path / "a").mkdir()
    assert sh(double_forks(daemon.path / "a", 3, marker)).ok
    daemon.proc.kill()
    daemon.proc.wait()
    assert mirrors(daemon) == {stale}  # SIGKILL: nothing ran
    again = mount_epcfs("--membership", "cgroup")
    assert not mirrors(daemon)
    assert "removing the cgroup mirror a killed daemon left" in again.log.read_text()
    assert len(marked(marker)) == 3
    again.stop()
    assert not mirrors(again)


def _pid_namespace_of_a_sleeper() -> tuple[subprocess.Popen, int, int]:
    """A process alone in a new pid namespace: (unshare, the process, the namespace's
    inode)."""
    p = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "sleep", "60"])
    children = Path(f"/proc/{p.pid}/task/{p.pid}/children")
    wait_for(lambda: children.read_text().split())
    child = int(children.read_text().split()[0])
    return p, child, os.stat(f"/proc/{child}/ns/pid").st_ino


@pytest.mark.skipif(os.stat("/proc/self/ns/pid").st_ino != 0xEFFFFFFC,
                    reason="only the initial pid namespace sees every other")
def test_a_mirror_of_a_dead_pid_namespace_is_removed_and_a_live_ones_kept(mount_epcfs):
    from epcfs.host.mirror import own_cgroup_dir

    directory, _ = own_cgroup_dir()
    dead, dead_child, dead_ns = _pid_namespace_of_a_sleeper()
    live, _, live_ns = _pid_namespace_of_a_sleeper()
    dead.kill()
    dead.wait()
    wait_for(lambda: not os.path.exists(f"/proc/{dead_child}"))
    gone = Path(directory, f"epcfs-{dead_ns}-3-1")
    kept = Path(directory, f"epcfs-{live_ns}-3-1")
    try:
        gone.mkdir()
        kept.mkdir()
        mount_epcfs("--membership", "cgroup").stop()
        assert not gone.exists()
        assert kept.exists()  # its namespace still has a process: maybe its daemon
    finally:
        live.kill()
        live.wait()
        for d in (gone, kept):
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()


@pytest.mark.parametrize("mode", MODES)
def test_the_v1_layout_keeps_double_forked_children_in_both_hierarchies(mount_epcfs, marker,
                                                                      mode):
    """A process is in one cgroup of each v1 hierarchy, and its children inherit both."""
    daemon = mount_epcfs("--cgroup-version", "1", "--membership", mode)
    misc, memory = daemon.path / "misc" / "w", daemon.path / "memory" / "v"
    misc.mkdir()
    memory.mkdir()
    assert sh(f"echo 0 > {memory}/cgroup.procs; " + double_forks(misc, 20, marker)).ok
    wait_for(lambda: len(marked(marker)) == 20, what="20 sleeps")
    assert pids(misc) == marked(marker)
    assert pids(memory) == marked(marker)
    assert f"membership: {mode}" in daemon.log.read_text()


def _without_cgroup2(mountpoint: Path, mode: str, env=None) -> subprocess.Popen:
    """A daemon in a mount namespace where no cgroup2 hierarchy is mounted."""
    daemon = (f"exec {sys.executable} -m epcfs.cli mount -f --membership {mode} "
              f"{mountpoint}")
    return subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         "for m in $(awk '$3 == \"cgroup2\" {print $2}' /proc/mounts); do umount -l $m; done;"
         + daemon], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        cwd=Path(__file__).resolve().parents[2])


def test_without_a_writable_hierarchy_auto_falls_back_and_cgroup_refuses(tmp_path,
                                                                          ready_notice):
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    refused = _without_cgroup2(mountpoint, "cgroup")
    out, _ = refused.communicate(timeout=30)
    assert refused.returncode == 1
    assert "--membership cgroup: " in out and "Traceback" not in out
    notice = ready_notice()
    auto = _without_cgroup2(mountpoint, "auto", env=notice.env)
    try:
        wait_for(lambda: notice.ready() or auto.poll() is not None, what="ready")
    finally:
        notice.close()
        auto.send_signal(signal.SIGTERM)
        out, _ = auto.communicate(timeout=15)
    assert auto.returncode == 0, out
    assert "membership: events (no cgroup hierarchy to mirror in" in out


def _named_cgroup(pid: int, name: str) -> str | None:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controllers == f"name={name}":
                return path
    return None


def test_the_next_start_removes_a_killed_v1_daemons_mirrors(mount_epcfs, marker):
    daemon = mount_epcfs("--cgroup-version", "1", "--membership", "cgroup")
    for controller in ("misc", "memory"):
        (daemon.path / controller / "a").mkdir()
    assert sh(f"echo 0 > {daemon.path}/memory/a/cgroup.procs; "
              + double_forks(daemon.path / "misc" / "a", 1, marker)).ok
    (sleeper,) = marked(marker)
    assert _named_cgroup(sleeper, "epcfs.misc").endswith("/a")
    daemon.proc.kill()
    daemon.proc.wait()
    again = mount_epcfs("--cgroup-version", "1", "--membership", "cgroup")
    assert again.log.read_text().count("removing the cgroup mirror a killed daemon") == 2
    assert _named_cgroup(sleeper, "epcfs.misc") == "/"
    assert _named_cgroup(sleeper, "epcfs.memory") == "/"
