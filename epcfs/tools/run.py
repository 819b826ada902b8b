"""`epcfs run [mount options] -- CMD…`: run CMD where /sys/fs/cgroup is epcfs.

A private mount namespace holds everything: the daemon mounted at /sys/fs/cgroup (the
host's cgroup mounts sit out of sight beneath it), /proc/mounts showing it as cgroup2
so Debian's cgroup-tools work unchanged, and the enclave socket in a private directory
named by $EPCFS_SOCKET. On exit the daemon unmounts and the namespace goes away; the
host's mounts were never touched. The exit status is CMD's (128+N if a signal ended it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence

from ..namespace import CGROUP_ROOT, enter_private_mount_namespace, fake_proc_mounts
from ..service.daemon import add_mount_options, config_from_args, start_detached


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_mount_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD …",
                   help="the command to run, with its arguments")


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("epcfs run: no command given (epcfs run [options] -- CMD …)", file=sys.stderr)
        return 2
    return run_in_epcfs(args, command)


def run_in_epcfs(args: argparse.Namespace, command: Sequence[str], *, cwd: str | None = None,
                 path_prefix: str | None = None) -> int:
    """Mount epcfs at /sys/fs/cgroup in a new mount namespace, run `command`, tear down.

    `path_prefix` goes first on CMD's PATH (selftest's stand-ins for host-changing tools).
    """
    if os.geteuid() != 0:
        print("epcfs run: needs root (it creates a mount namespace)", file=sys.stderr)
        return 1
    enter_private_mount_namespace()
    workdir = tempfile.mkdtemp(prefix="epcfs-run-")
    cfg = config_from_args(args, CGROUP_ROOT)
    cfg.enclave_socket = os.path.join(workdir, "sgx_enclave")
    try:
        daemon = start_detached(cfg)
    except RuntimeError as e:
        print(f"epcfs run: {e}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)
        return 1
    try:
        fake_proc_mounts(workdir)
        env = dict(os.environ, EPCFS_SOCKET=cfg.enclave_socket)
        if path_prefix:
            env["PATH"] = f"{path_prefix}:{env.get('PATH', '/usr/bin:/bin')}"
        # Ctrl-C reaches CMD (same process group); we stay to tear down after it.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            status = subprocess.call(list(command), env=env, cwd=cwd)
        except OSError as e:
            print(f"epcfs run: {command[0]}: {e.strerror}", file=sys.stderr)
            status = 127
        finally:
            signal.signal(signal.SIGINT, previous)
    finally:
        os.kill(daemon, signal.SIGTERM)
        os.waitpid(daemon, 0)
        shutil.rmtree(workdir, ignore_errors=True)
    return 128 - status if status < 0 else status
