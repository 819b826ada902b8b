"""`epcfs selftest [mount options] PATH/TO/run_epc_cg_selftests.sh`.

Runs a kernel tree's SGX cgroup selftest script unchanged, as root, where /sys/fs/cgroup
is epcfs (see `epcfs run`), from a scratch working directory holding the script's
sibling files from the user's tree (ash_cgexec.sh and friends) and our simulated
./test_sgx in place of the real binary.

The final scripts run `swapoff -a` and `swapon -a`; on a user's machine that would turn
the host's swap off and on for real, so stand-ins that do nothing come first on PATH.
Swap is not modelled anyway: epcfs's memory controller never swaps.
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
import tempfile

from ..service.daemon import add_mount_options
from .run import KSFT_SKIP, run_in_epcfs

STAND_INS = ("swapoff", "swapon")
"""Host-changing commands the scripts call that must not reach the host."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_mount_options(p)
    p.add_argument("--shell", metavar="SHELL",
                   help="run the script with this shell (e.g. bash, dash, 'busybox ash') "
                        "instead of its #! line")
    p.add_argument("--keep", action="store_true",
                   help="keep the scratch directory (logs the script writes) and print it")
    p.add_argument("script", metavar="SCRIPT", help="path to run_epc_cg_selftests.sh")


def run(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:  # first, as the kernel's scripts check it before anything
        print("epcfs: needs root (it creates a mount namespace): skipping", file=sys.stderr)
        return KSFT_SKIP
    script = os.path.abspath(args.script)
    if not os.path.isfile(script):
        print(f"epcfs selftest: {args.script}: no such file", file=sys.stderr)
        return 1
    scratch = tempfile.mkdtemp(prefix="epcfs-selftest-")
    try:
        prepare(script, scratch)
        name = "./" + os.path.basename(script)
        # Through a shell, as the kselftest runner does: a script whose first line is not
        # a valid #! (one version starts with "##!") still runs, with sh.
        command = [*args.shell.split(), name] if args.shell else ["/bin/sh", "-c", name]
        return run_in_epcfs(args, command, cwd=scratch,
                            path_prefix=os.path.join(scratch, ".epcfs-bin"))
    finally:
        if args.keep:
            print(f"epcfs selftest: scratch directory kept at {scratch}", file=sys.stderr)
        else:
            shutil.rmtree(scratch, ignore_errors=True)


def prepare(script: str, scratch: str) -> None:
    """Copy the script's directory (files only), then put our test_sgx and stand-ins in."""
    source = os.path.dirname(script)
    for entry in os.scandir(source):
        if entry.is_file() and entry.name != "test_sgx":
            shutil.copy2(entry.path, os.path.join(scratch, entry.name))
    test_sgx = shutil.which("test_sgx", path=os.path.dirname(sys.executable))
    if test_sgx is None:
        raise SystemExit("epcfs selftest: the test_sgx console script is not installed")
    os.symlink(test_sgx, os.path.join(scratch, "test_sgx"))
    bin_dir = os.path.join(scratch, ".epcfs-bin")
    os.mkdir(bin_dir)
    for name in STAND_INS:
        path = os.path.join(bin_dir, name)
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\n# epcfs selftest: {name} would change the host; do nothing.\n")
        os.chmod(path, stat.S_IRWXU | stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH)
