"""Soak: mixed load on one daemon for a long time; no errors, nothing left, no leak.

A daemon (--capacity 64M, --time-scale 0) serves a temporary mountpoint. For --seconds:
- WORKERS cgroups, each with an enclave process that builds enclaves of random sizes
  (some over its cgroup's limit, so pages go through reclaim; some fail with ENOMEM, or
  their touch with SIGBUS, under a tight limit: expected outcomes), touches them and
  drops them; every few seconds
  one of them is SIGKILLed mid-build and a new one started in its cgroup;
- a reader walking the whole tree, reading every readable file;
- a writer changing the workers' misc.max and memory.max, and making and removing
  scratch cgroups (with children) under a cgroup of its own.
An error is anything the kernel would not answer: a failed read, a limit write refused,
mkdir/rmdir of an empty cgroup failing, an enclave call failing with anything other
than ENOMEM or SIGBUS, a worker dying of anything but a SIGKILL (ours, or its memcg's
OOM killer: workers declare memory that stays charged until they exit), or the daemon
exiting.

At the end every worker stops; then misc.current and memory.current of every cgroup
must read 0 and the daemon's RSS (VmRSS, after a warm-up of WARMUP seconds) must have
grown by less than --max-rss-growth percent. Exit 0 only if all holds. Run as root:

    .venv/bin/python bench/soak.py [--seconds 600] [--workers 4]
"""

from __future__ import annotations

import argparse
import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAPACITY = 64 << 20
"""Small enough that four workers oversubscribe it; large enough for builds of 32 MiB."""
WARMUP = 10.0
"""Seconds before the starting RSS is taken: imports, first allocations, caches."""
KILL_EVERY = 3.0
"""Seconds between SIGKILLs of a random enclave worker (a new one replaces it)."""

WORKER = """
import errno, os, random, sys
from epcfs.client import Enclave, SignalOutcome
cg, sock, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
with open(os.path.join(cg, "cgroup.procs"), "w") as f:
    f.write("0")
rng = random.Random(seed)
while True:
    pages = rng.choice((16, 256, 2048, 8192))
    try:
        with Enclave(sock) as e:
            size = 4096
            while size < (pages + 8) * 4096:
                size *= 2
            e.create(size)
            e.add(0, pages, measured=rng.random() < 0.5)
            e.init()
            e.touch(0, min(pages, 64))
            e.declare(rng.choice((0, 4096, 1 << 20)))
    except SignalOutcome:
        pass  # a fault the kernel answers with SIGBUS: under a lowered limit, expected
    except OSError as err:
        if err.errno != errno.ENOMEM:
            print(f"worker {cg}: {err!r}", file=sys.stderr, flush=True)
            sys.exit(3)
"""


class Soak:
    def __init__(self, mnt: Path, sock: str, workers: int, seed: int) -> None:
        self.mnt = mnt
        self.sock = sock
        self.rng = random.Random(seed)
        self.cgroups = [mnt / f"w{i}" for i in range(workers)]
        self.procs: dict[Path, subprocess.Popen] = {}
        self.errors: list[str] = []
        self.counts = {"reads": 0, "limit writes": 0, "mkdir+rmdir": 0, "kills": 0, "oom kills": 0,
                       "tree walks": 0}
        self.stop = threading.Event()
        self.killed: set[int] = set()

    def error(self, what: str) -> None:
        if len(self.errors) < 50:
            print(f"soak: ERROR {what}", file=sys.stderr, flush=True)
        self.errors.append(what)

    def start_worker(self, cg: Path) -> None:
        self.procs[cg] = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(cg), self.sock, str(self.rng.randrange(1 << 30))],
            cwd=REPO)

    def check_workers(self) -> None:
        for cg, proc in list(self.procs.items()):
            if proc.poll() is not None:
                if proc.returncode == -signal.SIGKILL and proc.pid not in self.killed:
                    self.counts["oom kills"] += 1  # its memcg's OOM killer (declare)
                elif proc.pid not in self.killed:
                    self.error(f"worker in {cg.name} exited with {proc.returncode}")
                if not self.stop.is_set():
                    self.start_worker(cg)

    def reader(self) -> None:
        while not self.stop.is_set():
            for dirpath, _, files in os.walk(self.mnt):
                for name in files:
                    path = os.path.join(dirpath, name)
                    try:
                        if os.stat(path).st_mode & 0o444:
                            with open(path, "rb") as f:
                                f.read()
                            self.counts["reads"] += 1
                    except FileNotFoundError:
                        pass  # a scratch cgroup went away mid-walk
                    except OSError as e:
                        if e.errno != errno.ENODEV:  # ... after the open: kernfs's ENODEV
                            self.error(f"read {path}: {e}")
            self.counts["tree walks"] += 1

    def writer(self) -> None:
        scratch = self.mnt / "scratch"
        scratch.mkdir()
        n = 0
        while not self.stop.is_set():
            cg = self.rng.choice(self.cgroups)
            misc = self.rng.choice(("max", str(self.rng.choice((1, 4, 8, 16, 32)) << 20)))
            memory = self.rng.choice(("max", str(512 << 20)))
            for name, value in (("misc.max", f"sgx_epc {misc}\n"), ("memory.max", memory)):
                try:
                    (cg / name).write_text(value)
                    self.counts["limit writes"] += 1
                except OSError as e:
                    self.error(f"write {value.strip()!r} to {cg.name}/{name}: {e}")
            n += 1
            path = scratch / f"s{n}"
            try:
                path.mkdir()
                (path / "child").mkdir()
                (path / "child").rmdir()
                path.rmdir()
                self.counts["mkdir+rmdir"] += 1
            except OSError as e:
                self.error(f"mkdir/rmdir {path}: {e}")
            time.sleep(0.01)

    def run(self, seconds: float) -> None:
        for cg in self.cgroups:
            cg.mkdir()
            self.start_worker(cg)
        threads = [threading.Thread(target=t) for t in (self.reader, self.writer)]
        for t in threads:
            t.start()
        end = time.monotonic() + seconds
        next_kill = time.monotonic() + KILL_EVERY
        try:
            while time.monotonic() < end:
                time.sleep(0.1)
                self.check_workers()
                if time.monotonic() >= next_kill:
                    victim = self.procs[self.rng.choice(self.cgroups)]
                    self.killed.add(victim.pid)
                    victim.kill()
                    self.counts["kills"] += 1
                    next_kill += KILL_EVERY
        finally:
            self.stop.set()
            for proc in self.procs.values():
                self.killed.add(proc.pid)
                proc.kill()
            for proc in self.procs.values():
                proc.wait()
            for t in threads:
                t.join()
            (self.mnt / "scratch").rmdir()  # after the reader: it may be reading in it

    def leftovers(self) -> list[str]:
        """Every non-zero usage once all is stopped (the daemon releases at hang-up and
        sees exits through the process connector: allow it a moment)."""
        deadline = time.monotonic() + 10
        while True:
            left = []
            for cg in self.cgroups:
                for name, zero in (("misc.current", "sgx_epc 0\n"), ("memory.current", "0\n")):
                    value = (cg / name).read_text()
                    if value != zero:
                        left.append(f"{cg.name}/{name} = {value.strip()}")
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=600.0)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--max-rss-growth", type=float, default=10.0, metavar="PERCENT")
    args = p.parse_args()
    if os.geteuid() != 0:
        print("soak: needs root (it mounts)", file=sys.stderr)
        return 4
    tmp = Path(tempfile.mkdtemp(prefix="epcfs-soak-"))
    mnt, sock = tmp / "mnt", str(tmp / "sgx.sock")
    mnt.mkdir()
    log = open(tmp / "daemon.log", "wb")  # noqa: SIM115 (closed below)
    daemon = subprocess.Popen(
        [sys.executable, "-m", "epcfs", "mount", "-f", "--capacity", str(CAPACITY),
         "--time-scale", "0", "--file-size", "zero", "--enclave-socket", sock, str(mnt)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not (mnt / "misc.capacity").exists():
            if daemon.poll() is not None or time.monotonic() > deadline:
                print("soak: the daemon did not come up", file=sys.stderr)
                return 1
            time.sleep(0.02)
        soak = Soak(mnt, sock, args.workers, args.seed)
        warmup = min(WARMUP, args.seconds / 4)
        result: dict[str, int] = {}

        def sample_start() -> None:
            time.sleep(warmup)
            result["start"] = rss_kib(daemon.pid)

        sampler = threading.Thread(target=sample_start)
        sampler.start()
        t0 = time.monotonic()
        soak.run(args.seconds)
        elapsed = time.monotonic() - t0
        sampler.join()
        if daemon.poll() is not None:
            soak.error(f"the daemon exited with {daemon.returncode}")
            return 1
        left = soak.leftovers()
        for cg in soak.cgroups:
            cg.rmdir()
        end_rss = rss_kib(daemon.pid)
        growth = 100.0 * (end_rss - result["start"]) / result["start"]
        print(f"soak: {elapsed:.0f} s, {args.workers} enclave workers, seed {args.seed}")
        for name, n in soak.counts.items():
            print(f"  {name:14} {n}")
        print(f"  errors         {len(soak.errors)}")
        print(f"  final usage    {'0' if not left else '; '.join(left)}")
        print(f"  daemon RSS     {result['start']} KiB after {warmup:.0f} s -> {end_rss} KiB "
              f"at the end ({growth:+.1f}%)")
        ok = not soak.errors and not left and growth < args.max_rss_growth
        print(f"soak: {'PASS' if ok else 'FAIL'}")
        return 0 if ok else 1
    finally:
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], stderr=subprocess.DEVNULL,
                       check=False)
        log.close()
        if "Traceback" in (tmp / "daemon.log").read_text(errors="replace"):
            print(f"soak: the daemon logged a traceback: {tmp / 'daemon.log'}", file=sys.stderr)
        elif not mounted(mnt):
            shutil.rmtree(tmp, ignore_errors=True)


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


if __name__ == "__main__":
    sys.exit(main())
