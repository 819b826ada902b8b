"""What exact membership costs: a cgroup.procs write and an enclave connect, per mode.

For each --membership mode (cgroup: real cgroups in a mirror; events: fork events), on a
fresh daemon at --time-scale 0 (no simulated SGX time):

- a `cgroup.procs` write: one process moved back and forth between two cgroups,
  open+write+close per move (the mirror mode writes the real cgroup.procs too);
- an enclave connect: a process in a non-root cgroup connects to the enclave socket,
  creates an enclave (the first request looks up its cgroup: /proc/PID/cgroup in the
  mirror mode, the tracker's table in the events mode) and closes.

For reference, in this process: the kernel's own cost of a move (open+write+close of
cgroup.procs in two scratch cgroups of the cgroup2 hierarchy this process is in,
removed after), and each tracker's lookup of one pid's cgroup (`cgroup_of`).

    sudo .venv/bin/python bench/membership_bench.py [--count 2000]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from epcfs.client import Enclave  # noqa: E402
from epcfs.host.caller import Caller  # noqa: E402
from epcfs.host.cgroup_tracker import MirrorTracker  # noqa: E402
from epcfs.host.events import EventTracker  # noqa: E402
from epcfs.host.mirror import Mirror, own_cgroup_dir  # noqa: E402
from epcfs.model.cgroup import Hierarchy  # noqa: E402


def mount(mountpoint: Path, sock: Path, mode: str) -> subprocess.Popen:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "epcfs.cli", "mount", "-f", str(mountpoint), "--membership",
         mode, "--time-scale", "0", "--enclave-socket", str(sock)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (mountpoint / "misc.capacity").exists() or not sock.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"epcfs ({mode}) did not come up")
        time.sleep(0.05)
    return daemon


def moves(procs_files: list[Path], count: int) -> float:
    """µs per write of a process's pid to `procs_files` in turn: a move each time."""
    sleeper = subprocess.Popen(["sleep", "600"])
    targets = [os.fsencode(p) for p in procs_files]
    pid = str(sleeper.pid).encode()
    try:
        start = time.perf_counter()
        for i in range(count):
            fd = os.open(targets[i % len(targets)], os.O_WRONLY)
            os.write(fd, pid)
            os.close(fd)
        return (time.perf_counter() - start) / count * 1e6
    finally:
        sleeper.kill()
        sleeper.wait()


def procs_write(root: Path, count: int) -> float:
    """µs per cgroup.procs write."""
    return moves([root / name / "cgroup.procs" for name in ("a", "b")], count)


def enclave_connect(root: Path, sock: Path, count: int) -> float:
    """µs per connect + create + close, from a process in cgroup a."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        with open(root / "a" / "cgroup.procs", "w") as f:
            f.write("0")
        start = time.perf_counter()
        for _ in range(count):
            with Enclave(str(sock)) as encl:
                encl.create(1 << 16)
        os.write(w, str((time.perf_counter() - start) / count * 1e6).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        result = float(f.read())
    os.waitpid(pid, 0)
    return result


def kernel_move(count: int) -> float:
    """µs per move between two scratch cgroups of the kernel's cgroup2 hierarchy."""
    directory, _ = own_cgroup_dir()
    scratch = [Path(directory) / f"epcfs-bench-{os.getpid()}-{i}" for i in range(2)]
    for d in scratch:
        d.mkdir()
    try:
        return moves([d / "cgroup.procs" for d in scratch], count)
    finally:
        for d in scratch:
            d.rmdir()


def lookup(mode: str, count: int) -> float:
    """µs per tracker.cgroup_of of a process in a non-root cgroup."""
    h = Hierarchy({"sgx_epc": 1 << 20})
    tracker = MirrorTracker(h, Mirror()) if mode == "cgroup" else EventTracker(h)
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        tracker.attach(sleeper.pid, tracker.mkdir(h.root, "a"), Caller(os.getpid(), 0, 0))
        start = time.perf_counter()
        for _ in range(count):
            tracker.cgroup_of(sleeper.pid)
        return (time.perf_counter() - start) / count * 1e6
    finally:
        sleeper.kill()
        sleeper.wait()
        tracker.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=2000)
    args = p.parse_args()
    print("| mode | cgroup.procs write, µs | enclave connect+create+close, µs |")
    print("|---|---|---|")
    for mode in ("cgroup", "events"):
        with tempfile.TemporaryDirectory() as tmp:
            mountpoint, sock = Path(tmp) / "mnt", Path(tmp) / "sgx.sock"
            mountpoint.mkdir()
            daemon = mount(mountpoint, sock, mode)
            try:
                for name in ("a", "b"):
                    (mountpoint / name).mkdir()
                write = procs_write(mountpoint, args.count)
                connect = enclave_connect(mountpoint, sock, args.count // 4)
            finally:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(30)
        print(f"| {mode} | {write:.0f} | {connect:.0f} |")
    print(f"\nkernel cgroup2 move alone: {kernel_move(args.count):.0f} µs")
    for mode in ("cgroup", "events"):
        print(f"{mode} tracker, one pid's cgroup_of: {lookup(mode, args.count):.1f} µs")


if __name__ == "__main__":
    main()
