"""How fast epcfs answers `cat`: open+read+close of an interface file.

Measures, in one run and with the same reader loop (pure Python: os.open, os.read,
os.close, each reader in its own process, no C helper):

- µs per open+read+close with one reader,
- total ops/s with 4 concurrent readers,

for epcfs's misc.current and misc.capacity, the kernel's own cgroup2 file
(/sys/fs/cgroup/unified/cgroup.controllers, when that hierarchy exists) and a tmpfs file,
so the epcfs figures can be read against the machine they ran on.

    sudo .venv/bin/python bench/fs_bench.py [--seconds 3] [--readers 4]
                                            [--file-size MODE | --mountpoint DIR]

Without --mountpoint it mounts a fresh epcfs (with `--file-size MODE`, default auto) on a
temporary directory and unmounts it after. `content` costs a lookup per open: the kernel
may not cache sized files' names.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNEL_FILE = "/sys/fs/cgroup/unified/cgroup.controllers"


def reader(path: str, seconds: float, start, result) -> None:
    """Open, read, close in a loop until the deadline; report the count."""
    o_rdonly = os.O_RDONLY
    open_, read, close = os.open, os.read, os.close
    start.wait()
    n = 0
    deadline = time.perf_counter() + seconds
    while True:
        for _ in range(64):
            fd = open_(path, o_rdonly)
            read(fd, 4096)
            close(fd)
        n += 64
        if time.perf_counter() >= deadline:
            break
    result.put(n)


def measure(path: str, readers: int, seconds: float) -> float:
    """Total open+read+close per second over `readers` processes."""
    ctx = mp.get_context("fork")
    start = ctx.Event()
    result = ctx.Queue()
    procs = [ctx.Process(target=reader, args=(path, seconds, start, result))
             for _ in range(readers)]
    for p in procs:
        p.start()
    time.sleep(0.1)
    t0 = time.perf_counter()
    start.set()
    try:
        total = sum(result.get(timeout=seconds + 30) for _ in procs)
    except queue.Empty:
        raise SystemExit(f"a reader of {path} failed") from None
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
    elapsed = time.perf_counter() - t0
    return total / max(elapsed, seconds)


def tmpfs_file() -> tuple[str, callable]:
    for base in ("/dev/shm", "/run", "/tmp"):
        try:
            if os.statvfs(base) and _fstype(base) == "tmpfs":
                fd, path = tempfile.mkstemp(dir=base, prefix="epcfs-bench-")
                os.write(fd, b"sgx_epc 0\n")
                os.close(fd)
                return path, functools.partial(os.unlink, path)
        except OSError:
            continue
    return "", lambda: None


def _fstype(path: str) -> str:
    best, kind = "", ""
    real = os.path.realpath(path)
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            mnt = fields[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, kind = mnt, fields[2]
    return kind


def mount_epcfs(file_size: str) -> tuple[str, callable]:
    mp_dir = tempfile.mkdtemp(prefix="epcfs-bench-")
    log = open(os.path.join(mp_dir + ".log"), "wb")  # noqa: SIM115
    daemon = subprocess.Popen([sys.executable, "-m", "epcfs.cli", "mount", "-f", mp_dir,
                               "--file-size", file_size],
                              cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while not os.path.exists(os.path.join(mp_dir, "misc.capacity")):
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"epcfs did not come up; see {log.name}")
        time.sleep(0.05)

    def stop() -> None:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(10)
        except subprocess.TimeoutExpired:
            daemon.kill()
            subprocess.run(["fusermount3", "-u", "-z", mp_dir], check=False)
        log.close()
        os.rmdir(mp_dir)
        os.unlink(log.name)

    return mp_dir, stop


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    p.add_argument("--readers", type=int, default=4, help="concurrent readers (default 4)")
    p.add_argument("--mountpoint", help="an epcfs already mounted there")
    p.add_argument("--file-size", choices=("auto", "zero", "content"), default="auto",
                   help="the mount's --file-size (default auto)")
    args = p.parse_args()

    cleanups = []
    if args.mountpoint:
        mnt = args.mountpoint
    else:
        mnt, stop = mount_epcfs(args.file_size)
        cleanups.append(stop)
    tmp, rm = tmpfs_file()
    cleanups.append(rm)
    targets = [("epcfs misc.current", os.path.join(mnt, "misc.current")),
               ("epcfs misc.capacity", os.path.join(mnt, "misc.capacity"))]
    if os.path.exists(KERNEL_FILE):
        targets.append(("kernel cgroup2 cgroup.controllers", KERNEL_FILE))
    if tmp:
        targets.append(("tmpfs file", tmp))
    try:
        print(f"{'file':36} {'1 reader µs/op':>15} {args.readers} readers ops/s")
        for label, path in targets:
            measure(path, 1, 0.3)  # warm caches (dentries, attrs, page cache)
            one = measure(path, 1, args.seconds)
            many = measure(path, args.readers, args.seconds)
            print(f"{label:36} {1e6 / one:15.1f} {many:16,.0f}", flush=True)
    finally:
        for cleanup in cleanups:
            cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
