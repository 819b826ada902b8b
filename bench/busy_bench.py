"""Latency of reading misc.current while the model is busy reclaiming.

The fs and the reclaimers share one trio loop, so a model step that held it long would
show here. A daemon runs at --time-scale 0 (no sleeping: the model works flat out);
LOADERS processes build enclaves of twice a cgroup's limit over and over, so every page
goes through synchronous reclaim; meanwhile this process opens, reads and closes
misc.current every millisecond. Run as root:

    .venv/bin/python bench/busy_bench.py [--seconds 10] [--loaders 2]
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
CAPACITY = 64 << 20
LIMIT = 16 << 20
"""The loaders' cgroup limit: each enclave is 2x this, so half its pages are evicted."""

LOADER = """
import os, sys
from epcfs.client import Enclave
cg, sock, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(os.path.join(cg, "cgroup.procs"), "w") as f:
    f.write("0")
while True:
    with Enclave(sock) as e:
        e.create(2 * size)
        e.add(0, size // 4096, measured=False)
"""


def sample(path: str, seconds: float) -> list[float]:
    out = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        fd = os.open(path, os.O_RDONLY)
        os.read(fd, 4096)
        os.close(fd)
        out.append(time.perf_counter() - t0)
        time.sleep(0.001)
    return out


def percentiles(xs: list[float]) -> str:
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))] * 1e6  # noqa: E731
    return (f"n={len(xs)}  p50 {pick(0.50):7.0f} µs  p99 {pick(0.99):7.0f} µs  "
            f"max {xs[-1] * 1e6:7.0f} µs")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--loaders", type=int, default=2)
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="epcfs-busy-"))
    mnt, sock = tmp / "mnt", str(tmp / "sgx.sock")
    mnt.mkdir()
    daemon = subprocess.Popen(
        [sys.executable, "-m", "epcfs.cli", "mount", "-f", "--capacity", str(CAPACITY),
         "--time-scale", "0", "--enclave-socket", sock, str(mnt)],
        cwd=REPO, stderr=subprocess.DEVNULL)
    loaders: list[subprocess.Popen] = []
    try:
        while not (mnt / "misc.capacity").exists():
            time.sleep(0.02)
        cg = mnt / "busy"
        cg.mkdir()
        (cg / "misc.max").write_text(f"sgx_epc {LIMIT}\n")
        target = str(mnt / "misc.current")
        print("idle:", percentiles(sample(target, min(3.0, args.seconds))))
        loaders = [subprocess.Popen([sys.executable, "-c", LOADER, str(cg), sock, str(2 * LIMIT)],
                                    cwd=REPO) for _ in range(args.loaders)]
        time.sleep(1.0)
        before = (cg / "misc.events").read_text().split()[1]
        busy = sample(target, args.seconds)
        after = (cg / "misc.events").read_text().split()[1]
        print(f"busy ({args.loaders} loaders, {int(after) - int(before)} failed charges "
              f"→ reclaim rounds):", percentiles(busy))
    finally:
        for proc in loaders:
            proc.kill()
            proc.wait()
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(10)
        os.rmdir(mnt)
        os.rmdir(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
