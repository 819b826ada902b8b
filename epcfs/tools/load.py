"""`epcfs load --size SIZE [--hold SECONDS]`: hold an enclave in the current cgroup.

Builds an enclave of SIZE bytes through the simulated /dev/sgx_enclave (pages over the
cgroup's limit are reclaimed as the kernel would), initializes it, holds it, and
releases it on exit, so a user can watch misc.current rise and fall with `cat`. The
charge goes to this process's cgroup: move it first (`echo $$ > …/cgroup.procs`).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from ..units import parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=parse_size, required=True, metavar="SIZE",
                   help="enclave heap size in bytes, K/M/G suffixes allowed")
    p.add_argument("--hold", type=float, default=None, metavar="SECONDS",
                   help="how long to hold the enclave (default: until interrupted)")
    p.add_argument("--socket", metavar="PATH",
                   help="the daemon's enclave socket (default: $EPCFS_SOCKET, else the "
                        "daemon behind /sys/fs/cgroup)")


def run(args: argparse.Namespace) -> int:
    from ..client import Enclave
    from ..protocol import PAGE_SIZE

    pages = -(-args.size // PAGE_SIZE)
    encl_size = PAGE_SIZE
    while encl_size < pages * PAGE_SIZE:
        encl_size *= 2
    try:
        encl = Enclave(args.socket)
    except OSError as e:
        print(f"epcfs load: cannot reach the epcfs daemon: {e.strerror}", file=sys.stderr)
        return 1
    with encl:
        try:
            encl.create(encl_size)
            encl.add(0, pages, measured=False)
            encl.init()
        except OSError as e:
            done = getattr(e, "count", 0)
            print(f"epcfs load: {e.strerror} after {done * PAGE_SIZE} bytes", file=sys.stderr)
            return 1
        print(f"epcfs load: pid {os.getpid()} holds an enclave of {pages * PAGE_SIZE} bytes",
              flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            if args.hold is None:
                signal.pause()
            else:
                time.sleep(args.hold)
        except KeyboardInterrupt:
            pass
    return 0
