"""`epcfs load --size SIZE [--hold SECONDS]`: hold an enclave in the current cgroup.

Builds an enclave of SIZE bytes through the simulated /dev/sgx_enclave (pages over the
cgroup's limit are reclaimed as the kernel would), initializes it, holds it, and
releases it on exit, so a user can watch misc.current rise and fall with `cat`. The
charge goes to this process's cgroup: move it first (`echo $$ > …/cgroup.procs`).
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import time

from ..units import parse_nonnegative, parse_size


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", type=parse_size, required=True, metavar="SIZE",
                   help="enclave heap size in bytes, K/M/G suffixes allowed")
    p.add_argument("--hold", type=parse_nonnegative, default=None, metavar="SECONDS",
                   help="how long to hold the enclave (default: until interrupted)")
    p.add_argument("--socket", metavar="PATH",
                   help="the daemon's enclave socket (default: $EPCFS_SOCKET, else the "
                        "daemon behind /sys/fs/cgroup)")


def wait_for_hangup(sock, seconds: float | None) -> bool:
    """Wait `seconds` (None: for ever) or until the daemon closes the connection; True
    if it did. The daemon never sends unasked, so anything readable is the hang-up."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLHUP | select.POLLRDHUP)
    deadline = None if seconds is None else time.monotonic() + seconds
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        # poll takes an int of milliseconds: wait in pieces it can hold.
        if poller.poll(None if left is None else min(int(left * 1000) + 1, POLL_MAX_MS)):
            return True


POLL_MAX_MS = 2**31 - 1
"""poll(2)'s timeout is a C int of milliseconds (about 24 days)."""

GONE = "epcfs load: the epcfs daemon went away"


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
        except ConnectionError:
            print(GONE, file=sys.stderr)
            return 1
        except OSError as e:
            done = getattr(e, "count", 0)
            print(f"epcfs load: {e.strerror} after {done * PAGE_SIZE} bytes", file=sys.stderr)
            return 1
        print(f"epcfs load: pid {os.getpid()} holds an enclave of {pages * PAGE_SIZE} bytes",
              flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        try:
            if wait_for_hangup(encl.sock, args.hold):
                print(GONE, file=sys.stderr)
                return 1
        except KeyboardInterrupt:
            pass
    return 0
