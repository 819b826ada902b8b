"""epcfs from inside containers: `epcfs run --rootfs` (bubblewrap, busybox root).

The container has its own mount, pid, uts and ipc namespaces and a busybox root built by
scripts/make-rootfs; `--python` binds this interpreter, its venv and the sources
read-only so test_sgx and `python -m epcfs.cli load` run inside. Pids written to and read
from cgroup.procs are the container's own; the daemon maps them through NSpid.

Reads inside use busybox `cat`, which copies with sendfile(2): on kernels whose FUSE
splice stops at the reported size, the daemon reports sizes (`--file-size auto`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EPCFS = [sys.executable, "-m", "epcfs.cli"]

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces)"),
    pytest.mark.skipif(not shutil.which("bwrap"), reason="bubblewrap (bwrap) not installed"),
    pytest.mark.skipif(not shutil.which("busybox"), reason="busybox not installed"),
]

CAPACITY = "16M"


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rootfs") / "busybox"
    result = subprocess.run([str(REPO / "scripts" / "make-rootfs"), str(root)],
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        pytest.skip(f"cannot build a busybox rootfs: {result.stderr}")
    return root


def epcfs_at_cgroup_root() -> list[str]:
    """epcfs mounts at /sys/fs/cgroup visible here: `epcfs run` must never leave one."""
    with open("/proc/self/mounts") as f:
        return [line for line in f
                if line.split()[1] == "/sys/fs/cgroup" and "epcfs" in line.split()[2]]


def epcfs_run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*EPCFS, "run", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def test_scenario_runs_in_a_busybox_container(rootfs):
    result = epcfs_run("--capacity", CAPACITY, "--rootfs", str(rootfs), "--python", "--",
                       "sh", str(REPO / "scripts" / "scenario.sh"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout
    assert result.stdout.count("PASS:") >= 6
    assert "nothing left charged" in result.stdout
    assert not epcfs_at_cgroup_root()


def test_container_sees_its_own_pids_and_nothing_of_the_host(rootfs):
    script = r"""
echo "root-first" $(cat /sys/fs/cgroup/cgroup.procs)
echo "self $$"
mkdir /sys/fs/cgroup/c && echo 0 > /sys/fs/cgroup/c/cgroup.procs || exit 9
sleep 30 & s=$!
echo $s > /sys/fs/cgroup/c/cgroup.procs || exit 10
echo "sleep $s"
echo "c" $(cat /sys/fs/cgroup/c/cgroup.procs)
echo "root" $(cat /sys/fs/cgroup/cgroup.procs)
echo 1 > /sys/fs/cgroup/cgroup.procs 2>/dev/null && echo "moved 1"
kill $s; wait $s
echo "host pid $PPID"; hostname
ls /sys/fs/cgroup | grep -c '^cgroup.procs$'
"""
    result = epcfs_run("--capacity", CAPACITY, "--time-scale", "0", "--rootfs", str(rootfs),
                       "--", "sh", "-c", script, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    out = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert out["self"] == "2"  # bwrap is the container's init (1), CMD is 2
    me, sleeper = int(out["self"]), int(out["sleep"])
    members = set(map(int, out["c"].split()))  # and the $(…) subshell reading it
    assert {me, sleeper} <= members and max(members) < 50
    assert out["root"].split() == ["1"]  # the host's processes are not listed
    assert out["moved"] == "1"  # "1" names the container's init, not the host's
    assert "epcfs" in result.stdout.splitlines()  # its own hostname
    assert not epcfs_at_cgroup_root()


def _read_until(p: subprocess.Popen, word: str, timeout: float = 60) -> list[str]:
    """Lines from p's stdout up to one starting with `word` (read in a thread: a
    buffered pipe and select() do not mix)."""
    lines: list[str] = []

    def reader() -> None:
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith(word):
                return

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    t.join(timeout)
    if not lines or not lines[-1].startswith(word):
        raise AssertionError(f"no {word!r} from the container: {lines}")
    return lines


def _nspid(pid: int) -> list[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return [int(n) for n in line.split()[1:]]
    raise AssertionError(f"no NSpid for {pid}")


def _usage(cg: Path) -> int:
    for line in (cg / "misc.current").read_text().splitlines():
        name, value = line.split()
        if name == "sgx_epc":
            return int(value)
    raise AssertionError(f"no sgx_epc in {cg}/misc.current")


def test_two_containers_on_one_daemon_are_charged_separately(rootfs, mount_epcfs, tmp_path):
    sock = tmp_path / "sgx_enclave"
    daemon = mount_epcfs("--capacity", CAPACITY, "--time-scale", "0",
                         "--enclave-socket", str(sock))
    mnt = daemon.path
    (mnt / "p").mkdir()
    (mnt / "p" / "cgroup.subtree_control").write_text("+misc\n")
    sizes = {"a": 1 << 20, "b": 3 << 20}
    for name, limit in (("a", "4194304"), ("b", "8388608")):
        (mnt / "p" / name).mkdir()
        (mnt / "p" / name / "misc.max").write_text(f"sgx_epc {limit}\n")
    script = r"""
cg=/sys/fs/cgroup/p/$NAME
echo 0 > $cg/cgroup.procs || exit 9
python -m epcfs.cli load --size $SIZE > /tmp/load.out 2>&1 &
load=$!
until grep -q holds /tmp/load.out; do kill -0 $load || exit 10; sleep 0.05; done
echo "mine" $(cat $cg/cgroup.procs)
echo "load $load"
echo "root" $(cat /sys/fs/cgroup/cgroup.procs)
echo ready
read -r go
kill $load; wait $load
"""
    containers = {}
    try:
        for name, size in sizes.items():
            containers[name] = subprocess.Popen(
                [*EPCFS, "run", "--rootfs", str(rootfs), "--python", "--attach", str(mnt),
                 "--enclave-socket", str(sock), "--env", f"NAME={name}",
                 "--env", f"SIZE={size}", "--", "sh", "-c", script],
                cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        seen = {name: _read_until(p, "ready") for name, p in containers.items()}
        usage = {name: _usage(mnt / "p" / name) for name in sizes}
        for name, size in sizes.items():
            assert size <= usage[name] < size + (1 << 20), usage  # heap plus SECS/VA/TCS
            out = dict(line.split(" ", 1) for line in seen[name] if " " in line)
            inside = sorted(map(int, out["mine"].split()))
            assert 2 in inside and int(out["load"]) in inside
            assert out["root"].split() == ["1"]
            # the host lists the same processes by their host pids
            host_view = (mnt / "p" / name / "cgroup.procs").read_text().split()
            inner = {_nspid(int(pid))[-1] for pid in host_view}
            assert {2, int(out["load"])} <= inner <= set(inside)
            assert all(len(_nspid(int(pid))) == 2 for pid in host_view)
        assert _usage(mnt / "p") == usage["a"] + usage["b"]
        for p in containers.values():
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in containers.values():
            assert p.wait(60) == 0
        assert _usage(mnt / "p") == 0
        for name in sizes:
            (mnt / "p" / name).rmdir()
        (mnt / "p").rmdir()
    finally:
        for p in containers.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    assert (mnt / "misc.capacity").exists()  # the daemon outlives its containers


def test_run_rejects_container_options_without_rootfs():
    result = epcfs_run("--attach", "/nonexistent", "--", "true", timeout=30)
    assert result.returncode == 2 and "--rootfs" in result.stderr


def test_daemon_inside_its_own_pid_namespace(tmp_path):
    """The daemon itself in a container (a new pid namespace with its own /proc): pids
    written and listed are that namespace's, `echo 0` moves the writer, an exit leaves
    cgroup.procs at once, and test_sgx is charged through the enclave socket. The
    mount lives in the namespace's private mount table and goes with it."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = tmp_path / "sgx.sock"
    script = f"""
        {sys.executable} -m epcfs.cli mount --time-scale 0 --capacity 16M \
            --enclave-socket {sock} {mnt} || exit 1
        mkdir {mnt}/x
        sleep 30 & s=$!
        echo $s > {mnt}/x/cgroup.procs && echo "listed $(cat {mnt}/x/cgroup.procs) for $s"
        sh -c 'echo 0 > {mnt}/x/cgroup.procs
               echo "self $$: $(tr "\\n" " " < {mnt}/x/cgroup.procs)"'
        kill $s; wait $s
        echo "after exit: [$(cat {mnt}/x/cgroup.procs)]"
        EPCFS_SOCKET={sock} sh -c 'echo 0 > {mnt}/x/cgroup.procs; \
            exec {Path(sys.executable).parent}/test_sgx -t unclobbered_vdso' | tail -n 1
        awk '$1 == "sgx_epc" {{ print "peak", $2 }}' {mnt}/x/misc.peak
        fusermount3 -u {mnt}  # the daemon sees its mount go and exits
    """
    result = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount", "--propagation", "private", "--mount-proc",
         "sh", "-c", script],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    listed = next(line for line in lines if line.startswith("listed"))
    assert listed.split()[1] == listed.split()[3]  # the namespace's own pid, as written
    assert int(listed.split()[1]) < 100  # a fresh namespace's small pid, not the host's
    selfline = next(line for line in lines if line.startswith("self"))
    assert selfline.split()[1].rstrip(":") in selfline.split()[2:]
    assert "after exit: []" in lines
    assert "# Totals: pass:1 fail:0 xfail:0 xpass:0 skip:0 error:0" in lines
    assert any(line.startswith("peak ") and int(line.split()[1]) > 0 for line in lines)
    with open("/proc/self/mountinfo") as f:
        assert str(mnt) not in f.read()
