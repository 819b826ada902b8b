"""`epcfs run [mount options] -- CMD…`: run CMD where /sys/fs/cgroup is epcfs.

A private mount namespace holds everything: the daemon mounted at /sys/fs/cgroup (the
host's cgroup mounts sit out of sight beneath it), /proc/mounts showing it as cgroup2
so Debian's cgroup-tools work unchanged (`--cgroup-version 1`: as a tmpfs holding misc
and memory cgroup mounts, with /proc/cgroups listing the two controllers), and the
enclave socket in a private directory named by $EPCFS_SOCKET. On exit the daemon
unmounts and the namespace goes away; the host's mounts were never touched. The exit
status is CMD's (128+N if a signal ended it).

With `--rootfs DIR`, CMD runs in a container made by bubblewrap: new mount, pid, uts
and ipc namespaces, DIR as its root (scripts/make-rootfs builds a busybox one), a fresh
/proc and /dev, epcfs bound at /sys/fs/cgroup and the enclave socket at
/run/epcfs/sgx_enclave ($EPCFS_SOCKET names it). Nothing of the host's cgroups is
visible. The container's pids are its own: cgroup.procs takes and shows them (the
daemon maps them through NSpid). Its /proc/mounts is the kernel's and shows
`fuse.epcfs` at /sys/fs/cgroup: busybox does not care; cgroup-tools would not accept it.
`--attach MOUNTPOINT` joins a daemon that is already serving MOUNTPOINT (its socket:
--enclave-socket, or the daemon's default) instead of starting one, so several
containers can share one simulated machine, each in its own cgroup. `--python` binds
/usr, this Python and its venv and the epcfs sources read-only at their own paths and
puts the venv's bin first on PATH, so test_sgx and `python -m epcfs.cli` run inside.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence

from ..host.mountns import (
    CGROUP_ROOT,
    enter_private_mount_namespace,
    fake_proc_cgroups,
    fake_proc_mounts,
)
from ..protocol import default_socket
from ..service.daemon import MountConfig, add_mount_options, config_from_args, start_detached
from .plot import add_plot_option, plotted

KSFT_SKIP = 4
"""kselftest's "skipped" status: what the kernel's SGX scripts exit with when not root."""

CONTAINER_SOCKET = "/run/epcfs/sgx_enclave"
"""Where the enclave socket appears inside a container."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_mount_options(p)
    add_plot_option(p)
    p.add_argument("--rootfs", metavar="DIR", default=None,
                   help="run CMD in a container (bubblewrap: new mount, pid, uts and ipc "
                        "namespaces) whose root is DIR (see scripts/make-rootfs)")
    p.add_argument("--attach", metavar="MOUNTPOINT", default=None,
                   help="with --rootfs: use the epcfs already mounted at MOUNTPOINT (and "
                        "its enclave socket) instead of starting a daemon")
    p.add_argument("--python", action="store_true",
                   help="with --rootfs: bind /usr, this Python, its venv and the epcfs "
                        "sources read-only, so test_sgx and python -m epcfs.cli run inside")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="with --rootfs: set a variable in the container (repeatable)")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD …",
                   help="the command to run, with its arguments")


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("epcfs run: no command given (epcfs run [options] -- CMD …)", file=sys.stderr)
        return 2
    if args.rootfs is None:
        if args.attach or args.python or args.env:
            print("epcfs run: --attach, --python and --env need --rootfs", file=sys.stderr)
            return 2
        return run_in_epcfs(args, command)
    return run_in_container(args, command)


def run_in_epcfs(args: argparse.Namespace, command: Sequence[str], *, cwd: str | None = None,
                 path_prefix: str | None = None, runner=None,
                 marks: Sequence[tuple[float, str]] = ()) -> int:
    """Mount epcfs at /sys/fs/cgroup in a new mount namespace, run `command`, tear down.

    `path_prefix` goes first on CMD's PATH (selftest's stand-ins for host-changing tools).
    `runner(command, socket, env=…, cwd=…)` runs it instead of `call` (selftest's output
    pump); `marks`, (wall time, line) pairs of CMD's output, label --plot's figure.
    """
    if os.geteuid() != 0:
        print("epcfs: needs root (it creates a mount namespace): skipping", file=sys.stderr)
        return KSFT_SKIP
    try:
        with plotted(args, marks) as trace, private_epcfs(args, trace) as cfg:
            env = dict(os.environ, EPCFS_SOCKET=cfg.enclave_socket)
            # A venv's scripts (test_sgx, epcfs) first: `.venv/bin/epcfs run -- test_sgx`
            # finds them without an activated venv. Outside one, the interpreter's
            # directory (/usr/bin) must not jump ahead of the user's own PATH order.
            venv = sys.prefix != sys.base_prefix
            prefix = [p for p in (path_prefix, venv and os.path.dirname(sys.executable)) if p]
            env["PATH"] = ":".join([*prefix, env.get("PATH", "/usr/bin:/bin")])
            try:
                if runner is not None:
                    return runner(command, cfg.enclave_socket, env=env, cwd=cwd)
                return call(command, env=env, cwd=cwd)
            except OSError as e:
                print(f"epcfs run: {command[0]}: {e.strerror}", file=sys.stderr)
                return 127
    except DaemonFailed as e:
        print(f"epcfs run: {e}", file=sys.stderr)
        return 1


class DaemonFailed(RuntimeError):
    """The daemon did not come up (its exit status is in the message)."""


@contextlib.contextmanager
def private_epcfs(args: argparse.Namespace, trace: str | None = None) -> Iterator[MountConfig]:
    """Enter a new mount namespace with epcfs at /sys/fs/cgroup (shown as cgroup2 in
    /proc/mounts) and a private enclave socket; on exit the daemon unmounts and the
    private directory goes. Everything happens in this namespace only."""
    enter_private_mount_namespace()
    workdir = tempfile.mkdtemp(prefix="epcfs-run-")
    try:
        cfg = config_from_args(args, CGROUP_ROOT)
        if trace:
            cfg.trace = os.path.abspath(trace)
        cfg.enclave_socket = os.path.join(workdir, "sgx_enclave")
        try:
            daemon = start_detached(cfg)
        except RuntimeError as e:
            raise DaemonFailed(str(e)) from e
        try:
            fake_proc_mounts(workdir, version=cfg.cgroup_version)
            if cfg.cgroup_version == 1:
                fake_proc_cgroups(workdir)
            yield cfg
        finally:
            os.kill(daemon, signal.SIGTERM)
            os.waitpid(daemon, 0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def call(command: Sequence[str], **kwargs) -> int:
    """Run CMD to the end and return its status as a shell reports it (128+N for a
    signal). Ctrl-C reaches CMD (same process group); we stay to tear down after it."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        status = subprocess.call(list(command), preexec_fn=sigint_default, **kwargs)
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 - status if status < 0 else status


def sigint_default() -> None:
    """In a child about to exec: SIGINT back to its default. An ignored signal stays
    ignored across exec, and a non-interactive shell cannot take it back, so without
    this Ctrl-C would reach nobody while we wait out CMD."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def bwrap_command(rootfs: str, cgroupfs: str, socket: str, command: Sequence[str], *,
                  python: bool = False, env: Sequence[str] = ()) -> list[str]:
    """The bubblewrap command line for a container on `rootfs` that sees `cgroupfs` at
    /sys/fs/cgroup and `socket` at CONTAINER_SOCKET."""
    path = "/bin:/sbin"
    cmd = ["bwrap", "--bind", rootfs, "/", "--proc", "/proc", "--dev", "/dev",
           "--tmpfs", "/tmp", "--unshare-pid", "--unshare-uts", "--unshare-ipc",
           "--hostname", "epcfs", "--die-with-parent",
           "--bind", cgroupfs, CGROUP_ROOT, "--bind", socket, CONTAINER_SOCKET]
    if python:
        for src in _python_paths():
            cmd += ["--ro-bind", src, src]
        path = f"{os.path.dirname(sys.executable)}:{path}"
    cmd += ["--clearenv", "--setenv", "PATH", path, "--setenv", "HOME", "/root",
            "--setenv", "EPCFS_SOCKET", CONTAINER_SOCKET, "--chdir", "/"]
    for item in env:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ValueError(f"--env wants NAME=VALUE, not {item!r}")
        cmd += ["--setenv", name, value]
    return [*cmd, "--", *command]


def _python_paths() -> list[str]:
    """What this interpreter needs, outermost first and without duplicates: /usr (libc
    and the loader, via the rootfs's lib -> usr/lib links), the base installation, the
    venv, and the directory holding the epcfs package (an editable install)."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    candidates = ["/usr", sys.base_prefix, sys.prefix, os.path.dirname(package_parent)]
    out: list[str] = []
    for path in sorted({os.path.realpath(p) for p in candidates}, key=len):
        if not any(path == kept or path.startswith(kept + "/") for kept in out):
            out.append(path)
    return out


def run_in_container(args: argparse.Namespace, command: Sequence[str]) -> int:
    """`--rootfs`: CMD in a bubblewrap container, on a daemon of its own or `--attach`ed."""
    if os.geteuid() != 0:
        print("epcfs: needs root (it creates namespaces): skipping", file=sys.stderr)
        return KSFT_SKIP
    if shutil.which("bwrap") is None:
        print("epcfs run: --rootfs needs bubblewrap (bwrap)", file=sys.stderr)
        return 1
    if not os.path.isdir(args.rootfs):
        print(f"epcfs run: {args.rootfs}: not a directory", file=sys.stderr)
        return 1
    rootfs = os.path.abspath(args.rootfs)
    if args.attach and (args.plot or args.trace):
        print("epcfs run: --plot and --trace need a daemon of its own, not --attach",
              file=sys.stderr)
        return 2
    if args.attach:
        cgroupfs = os.path.abspath(args.attach)
        if not any(os.path.exists(os.path.join(cgroupfs, *sub, "misc.capacity"))
                   for sub in ((), ("misc",))):
            print(f"epcfs run: no epcfs mounted at {cgroupfs}", file=sys.stderr)
            return 1
        return _contain(args, rootfs, cgroupfs,
                        args.enclave_socket or default_socket(cgroupfs), command)
    try:
        with plotted(args, ()) as trace, private_epcfs(args, trace) as cfg:
            return _contain(args, rootfs, CGROUP_ROOT, cfg.enclave_socket, command)
    except DaemonFailed as e:
        print(f"epcfs run: {e}", file=sys.stderr)
        return 1


def _contain(args: argparse.Namespace, rootfs: str, cgroupfs: str, socket: str,
             command: Sequence[str]) -> int:
    try:
        cmd = bwrap_command(rootfs, cgroupfs, socket, command, python=args.python,
                            env=args.env)
    except ValueError as e:
        print(f"epcfs run: {e}", file=sys.stderr)
        return 2
    return call(cmd)
